"""LINe's ablation: each of its three parts switched on and off.

LINe (Ahn, Park, Kim, CVPR 2023, Sec. 4.4) combines activation clipping,
weight pruning (the class-wise mask of the head's weights) and neuron pruning
(the class-wise mask of the Shapley-approximated important neurons). Its
ablation scores every combination; with all three off LINe is Energy. Each
variant here is the registry's own LINe scorer with the parts left out set
to None, so nothing is reimplemented.

    table = line_ablation(train_batches, kernel, bias, {"id": f_id, "svhn": f_svhn},
                          p_w=90, p_a=90, clip=1.0)
    print(format_ablation(table))
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
import itertools
from typing import Any

import numpy as np

from line_jax import metrics as metrics_lib
from line_jax import scorers

PARTS = ("clip", "weights", "neurons")  # Activation clipping, weight pruning, neuron pruning.
_METRICS = ("fpr95", "auroc", "aupr_in", "aupr_out")


def variants() -> list[tuple[bool, bool, bool]]:
  """Every on/off combination of `PARTS`: none first, all last."""
  combos = list(itertools.product((False, True), repeat=3))
  return sorted(combos, key=lambda c: (sum(c), tuple(not x for x in c)))


def variant_name(on: tuple[bool, bool, bool]) -> str:
  """'energy (none)', 'clip', 'weights + neurons', 'LINe (all)', ..."""
  if not any(on):
    return "energy (none)"
  if all(on):
    return "LINe (all)"
  return " + ".join(part for part, flag in zip(PARTS, on) if flag)


def line_ablation(train_batches: Iterable, kernel, bias, sets: Mapping[str, Any], *,
                  p_w: float, p_a: float, clip: float) -> dict[str, Any]:
  """Fits and scores every LINe variant; metrics of each OOD set against "id".

  Args:
    train_batches: a re-iterable of `(features [b, m], labels [b])` (it is
      read once per variant).
    kernel: `[m, classes]`; bias: `[classes]`.
    sets: name -> `[n, m]` features; "id" is the ID test set, every other
      key an OOD set.
    p_w, p_a, clip: LINe's settings for the parts that are on.

  Returns:
    `{"settings": {p_w, p_a, clip}, "variants": {name: {"clip", "weights",
    "neurons": bool, "metrics": {ood_set: metrics, "average": ...}}}}`.
  """
  from line_jax.evaluation import score_all  # The evaluation's chunked scoring.

  if "id" not in sets:
    raise ValueError("sets needs the ID test features under 'id'")
  line = scorers.get("line")
  out = {}
  for on in variants():
    hp = dict(zip(("clip", "p_w", "p_a"), (clip, p_w, p_a)))
    hp = {k: (v if flag else None) for (k, v), flag in zip(hp.items(), on)}
    state = line.fit_from_batches(train_batches, kernel, bias, **hp)
    score_id = score_all(line, state, sets["id"])
    rows = {name: metrics_lib.evaluate(score_id, score_all(line, state, f))
            for name, f in sets.items() if name != "id"}
    rows["average"] = {m: float(np.mean([r[m] for r in rows.values()])) for m in _METRICS}
    out[variant_name(on)] = {**dict(zip(PARTS, on)), "metrics": rows}
  return {"settings": {"p_w": p_w, "p_a": p_a, "clip": clip}, "variants": out}


def format_ablation(table: Mapping[str, Any]) -> str:
  """Markdown: one row per variant, check marks for its parts, then the
  average and each set's FPR95 / AUROC in %."""
  settings = table["settings"]
  first = next(iter(table["variants"].values()))
  sets = ["average"] + [s for s in first["metrics"] if s != "average"]
  lines = [
      f"LINe ablation at p_w = {settings['p_w']}, p_a = {settings['p_a']}, "
      f"clip = {settings['clip']}. Cells: FPR95 / AUROC in %.",
      "",
      "| variant | clipping | weight pruning | neuron pruning | " + " | ".join(sets) + " |",
      "|---|:-:|:-:|:-:|" + "---|" * len(sets),
  ]
  for name, row in table["variants"].items():
    marks = ["x" if row[p] else "" for p in PARTS]
    cells = [f"{100 * row['metrics'][s]['fpr95']:.2f} / {100 * row['metrics'][s]['auroc']:.2f}"
             for s in sets]
    lines.append(f"| {name} | " + " | ".join(marks + cells) + " |")
  return "\n".join(lines) + "\n"
