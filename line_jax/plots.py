"""Figures of an evaluation: ROC curves and ID-vs-OOD score histograms.

Drawn with matplotlib's Agg backend (files only, no display needed). Scores
follow line_jax's convention, higher = more in-distribution, so a ROC curve
plots the true positive rate on ID against the false positive rate on OOD as
the threshold falls.
"""

from __future__ import annotations

from collections.abc import Mapping
import math
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import numpy as np  # noqa: E402


def roc_curve(score_id, score_ood) -> tuple[np.ndarray, np.ndarray]:
  """ROC points `(fpr, tpr)`, one per distinct threshold, from (0, 0) to (1, 1).

  Args:
    score_id: `[n_id]` scores of ID samples (the positives).
    score_ood: `[n_ood]` scores of OOD samples.
  """
  score_id = np.asarray(score_id, np.float64)
  score_ood = np.asarray(score_ood, np.float64)
  scores = np.concatenate([score_id, score_ood])
  positive = np.concatenate([np.ones(score_id.size), np.zeros(score_ood.size)])
  order = np.argsort(-scores, kind="stable")
  scores, positive = scores[order], positive[order]
  # One point per distinct score, so ties move both rates together.
  last = np.flatnonzero(np.diff(scores, append=-np.inf))
  tpr = np.cumsum(positive)[last] / score_id.size
  fpr = np.cumsum(1.0 - positive)[last] / score_ood.size
  return np.concatenate([[0.0], fpr]), np.concatenate([[0.0], tpr])


def _style(index: int, method: str) -> dict:
  """Ten colours, then the next line style: twenty-odd methods stay distinct.

  LINe, the method this library is about, is drawn thick and black.
  """
  if method == "line":
    return {"color": "black", "lw": 2.0, "ls": "-", "zorder": 5}
  return {"color": plt.get_cmap("tab10")(index % 10), "lw": 1.1,
          "ls": ("-", "--", ":")[(index // 10) % 3]}


def _grid(count: int) -> tuple[int, int]:
  cols = min(count, 4)
  return math.ceil(count / cols), cols


def _auroc(score_id, score_ood) -> float:
  from line_jax import metrics  # pylint: disable=g-import-not-at-top
  return metrics.ood_metrics(score_id, score_ood)["auroc"]


def plot_roc(scores: Mapping[str, Mapping[str, np.ndarray]], path: str | os.PathLike,
             *, id_key: str = "id") -> str:
  """One panel per OOD set, one ROC curve per method in each, and a last
  panel of all OOD sets pooled on a log FPR axis (where FPR95 differences
  live). The legend gives each method's AUROC averaged over the sets.

  Args:
    scores: method -> {"id": `[n_id]`, ood_set: `[n_ood]`, ...}.
    path: the PNG to write.
    id_key: key of the ID scores in each method's dict.

  Returns:
    `path` as a string.
  """
  methods = list(scores)
  sets = [k for k in scores[methods[0]] if k != id_key]
  rows, cols = _grid(len(sets) + 1)
  fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 4 * rows), squeeze=False)
  pooled_ax = axes.flat[len(sets)]
  for i, method in enumerate(methods):
    by_set = scores[method]
    average = np.mean([_auroc(by_set[id_key], by_set[name]) for name in sets])
    label = f"{method} (AUROC {100 * average:.1f})"
    for ax, name in zip(axes.flat, sets):
      fpr, tpr = roc_curve(by_set[id_key], by_set[name])
      ax.plot(fpr, tpr, **_style(i, method))
    fpr, tpr = roc_curve(by_set[id_key], np.concatenate([by_set[name] for name in sets]))
    keep = fpr > 0  # The log axis starts at the first false positive.
    pooled_ax.plot(fpr[keep], tpr[keep], label=label, **_style(i, method))
  for ax, name in zip(axes.flat, sets):
    ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls=":")
    ax.axhline(0.95, color="0.6", lw=0.6, ls="--")  # FPR95 is read here.
    ax.set(title=name, xlabel="FPR (OOD)", ylabel="TPR (ID)", xlim=(0, 1), ylim=(0, 1.01))
  pooled_ax.axhline(0.95, color="0.6", lw=0.6, ls="--")
  pooled_ax.set_xscale("log")
  pooled_ax.set(title="all OOD sets, log FPR", xlabel="FPR (OOD, log)", ylabel="TPR (ID)",
                xlim=(1e-3, 1), ylim=(0, 1.01))
  for ax in axes.flat[len(sets) + 1:]:
    ax.axis("off")
  handles, labels = pooled_ax.get_legend_handles_labels()
  fig.legend(handles, labels, loc="center right", fontsize=8)
  fig.tight_layout(rect=(0, 0, 0.82, 1))
  return _save(fig, path)


def plot_histograms(method: str, scores: Mapping[str, np.ndarray],
                    path: str | os.PathLike, *, id_key: str = "id") -> str:
  """One panel per OOD set: the ID score histogram against that set's,
  titled with that set's FPR95 and AUROC.

  Args:
    method: title of the figure.
    scores: {"id": `[n_id]`, ood_set: `[n_ood]`, ...} for this method.
    path: the PNG to write.
    id_key: key of the ID scores.

  Returns:
    `path` as a string.
  """
  from line_jax import metrics  # pylint: disable=g-import-not-at-top
  sets = [k for k in scores if k != id_key]
  rows, cols = _grid(len(sets))
  fig, axes = plt.subplots(rows, cols, figsize=(3.5 * cols, 2.8 * rows), squeeze=False)
  score_id = np.asarray(scores[id_key], np.float64)
  for ax, name in zip(axes.flat, sets):
    score_ood = np.asarray(scores[name], np.float64)
    both = np.concatenate([score_id, score_ood])
    low, high = np.percentile(both, [0.5, 99.5])  # Keep outliers from flattening it.
    bins = np.linspace(low, high if high > low else low + 1.0, 60)
    ax.hist(np.clip(score_id, low, high), bins, density=True, alpha=0.55, label="ID")
    ax.hist(np.clip(score_ood, low, high), bins, density=True, alpha=0.55, label=name)
    m = metrics.ood_metrics(score_id, score_ood)
    ax.set(title=f"{name}: FPR95 {100 * m['fpr95']:.1f}, AUROC {100 * m['auroc']:.1f}",
           xlabel="score (higher = ID)")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=7, loc="upper left")
  for ax in axes.flat[len(sets):]:
    ax.axis("off")
  fig.suptitle(method)
  fig.tight_layout()
  return _save(fig, path)


def _save(fig, path) -> str:
  path = os.fspath(path)
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return path


def plot_ablation(table: Mapping, path: str | os.PathLike) -> str:
  """LINe's ablation: average AUROC and FPR95 of each variant, as bars.

  Args:
    table: `line_jax.runs.ablation.line_ablation`'s result.
    path: the PNG to write.

  Returns:
    `path` as a string.
  """
  names = list(table["variants"])
  average = [table["variants"][n]["metrics"]["average"] for n in names]
  fig, axes = plt.subplots(1, 2, figsize=(10, 0.45 * len(names) + 1.2), sharey=True)
  y = np.arange(len(names))[::-1]  # First variant on top.
  for ax, key, label in ((axes[0], "auroc", "average AUROC % (higher is better)"),
                         (axes[1], "fpr95", "average FPR95 % (lower is better)")):
    values = [100 * a[key] for a in average]
    # The whole method stands out; its parts and Energy (none) are gray.
    ax.barh(y, values, color=["C0" if n == names[-1] else "0.6" for n in names])
    for yi, v in zip(y, values):
      ax.text(v, yi, f" {v:.1f}", va="center", fontsize=8)
    ax.set(xlabel=label, xlim=(0, 110))
  axes[0].set_yticks(y, names)
  fig.tight_layout()
  return _save(fig, path)


def plot_near_far(untuned: Mapping[str, Mapping], tuned: Mapping[str, Mapping],
                  path: str | os.PathLike, *, title: str = "AUROC %") -> str:
  """Near- vs far-OOD AUROC of every method: a hollow dot untuned, a filled
  one tuned, joined by an arrow (OpenOOD's two headline numbers at a glance).

  Args:
    untuned, tuned: scorer -> {"near": metrics, "far": metrics, ...}
      (`line_jax.runs.openood`'s "methods" and "tuned"); a scorer may be
      missing from `tuned`.
    path: the PNG to write.

  Returns:
    `path` as a string.
  """
  fig, ax = plt.subplots(figsize=(8, 7))
  for index, (name, rows) in enumerate(untuned.items()):
    style = _style(index, name)
    xy = (100 * rows["near"]["auroc"], 100 * rows["far"]["auroc"])
    ax.scatter(*xy, s=60 if name == "line" else 30, facecolors="none",
               edgecolors=[style["color"]], zorder=style.get("zorder", 3))
    ax.annotate(name, xy, textcoords="offset points", xytext=(4, 4), fontsize=7,
                color=style["color"], fontweight="bold" if name == "line" else "normal")
    if name in tuned:
      to = (100 * tuned[name]["near"]["auroc"], 100 * tuned[name]["far"]["auroc"])
      ax.scatter(*to, s=60 if name == "line" else 30, color=style["color"],
                 zorder=style.get("zorder", 3))
      ax.annotate("", to, xy, arrowprops={"arrowstyle": "->", "color": style["color"],
                                          "lw": 0.8})
  ax.set(xlabel="near-OOD AUROC % (higher is better)",
         ylabel="far-OOD AUROC % (higher is better)",
         title=f"{title}: hollow untuned, filled tuned on validation lists")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  return _save(fig, path)
