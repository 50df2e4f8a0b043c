"""Fit time of every registered scorer, line_jax against PyTorch, same statistics.

At 50,000 training samples x 342 features (random non-negative features, a
random head) with 10 and 100 classes, every registered scorer is fitted
through the registry (`scorers.get(name).fit`, default hyperparameters, JAX
arrays already on the device) and next to it a straightforward PyTorch
implementation of the same statistics on the same data (torch tensors):

* MSP, MaxLogit, Energy, GradNorm, ASH, SCALE (nothing learnt from data): the
  head, copied;
* ReAct: the percentile of all activations (`torch.kthvalue` of the flattened
  features, NumPy's linear interpolation; `torch.quantile` refuses inputs of
  more than 2**24 values);
* DICE: the mean feature in float64, the percentile of the contributions
  `mean[j] W[c, j]` (`torch.quantile`), the mask;
* Mahalanobis: class means, the pooled class-centred covariance and its
  pseudo-inverse, in float64 (as the official code, through sklearn);
* KNN: the normalised bank `h / (||h|| + 1e-10)`;
* ViM: the origin `-pinv(W) b`, the float64 covariance around it and its
  eigendecomposition, the residual norms and alpha (float64, as the official
  code's NumPy);
* LINe: the class means of `h * W[y]` (float32 products, float64 sums) and the
  masks: `contrib[c] > percentile(contrib[c], p_a)` and the official
  `[C, C, m]` weight mask `|contrib[c, j]| W[k, j] > percentile_c`; with a
  clip given as a percentile of the training activations (the default
  `TrainPercentile(90)`), that percentile as for ReAct.

* RMDS: Mahalanobis's statistics plus the pseudo-inverse of the covariance of
  all features (float64).

Beside them, for Mahalanobis, RMDS, ViM, KNN and NNGuide, pytorch-ood 0.4.0's
own float32 computation (`TORCH_OOD`, a third side): its time, and how far
its statistics lie from the float64 ones (`ood_accuracy`).

A scorer registered without a PyTorch counterpart here is timed alone.
After one untimed call of each, the two sides take turns call by call for a
few rounds (`timing.interleaved_blocks`, every cell in every round, so a slow
spell of a shared machine lands in one round of many cells), each call after
a pause of `SETTLE_S`: PyTorch's MKL / OpenMP threads and the LAPACK threads
behind JAX's `eigh` spin for a while after their work, and a call made while
the other library's threads still spin ran up to 10x slower on 2 cores (both
`eigh`s at 342 features: 30-140 ms back to back, 7-11 ms after a 0.3 s
pause). The table gives
median seconds per fit and the ratio (PyTorch's time over line_jax's: above
1, line_jax is faster). Each cell also checks that the two sides agree
(`agreement`): masks and thresholds exactly, float statistics to a stated
relative tolerance. `checks_s` is the part of line_jax's fit spent on the
input checks (`_common.check_train`: finite features, labels in range), which
the PyTorch side does not do.

    python -m benchmarks.fit_throughput [--out benchmarks/results] [--rounds 3]

`benchmarks.nearest_neighbours` runs the same comparison on real features.

`--out DIR` writes `DIR/<device>/fits.json` and `fits.md`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
import os
import pathlib
import statistics
import sys
import time
from typing import Any

import jax
import numpy as np
import torch

if __package__ in (None, ""):  # `python benchmarks/fit_throughput.py`
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks import report  # pylint: disable=wrong-import-position
from benchmarks import timing  # pylint: disable=wrong-import-position
from line_jax import scorers  # pylint: disable=wrong-import-position
from line_jax.scorers import _common  # pylint: disable=wrong-import-position
from line_jax.scorers import _vim  # pylint: disable=wrong-import-position

SAMPLES = 50_000
FEATURES = 342
CLASSES = (10, 100)
# Relative tolerance of the float statistics (the states are float32).
RTOL = 1e-5
# Seconds of pause before each timed call (see above).
SETTLE_S = 0.3


def problem(num_samples: int, num_features: int, num_classes: int, seed: int = 0):
  """Random non-negative `[n, m]` float32 features, labels covering every
  class, a random `[m, C]` kernel and `[C]` bias (NumPy)."""
  rng = np.random.default_rng(seed)
  features = np.abs(rng.normal(size=(num_samples, num_features))).astype(np.float32)
  labels = rng.permutation(np.arange(num_samples) % num_classes).astype(np.int32)
  kernel = (rng.normal(size=(num_features, num_classes)) / np.sqrt(num_features)).astype(
      np.float32)
  bias = (0.1 * rng.normal(size=(num_classes,))).astype(np.float32)
  return features, labels, kernel, bias


# PyTorch: each takes (x [n, m] float32, y [n] int64, weight [C, m] float32,
# bias [C] float32, hparams) and returns its statistics as a dict of tensors.


def _torch_head(x, y, weight, bias, hp):
  del x, y, hp
  return {"weight": weight.clone(), "bias": bias.clone()}


def _torch_percentile(values: torch.Tensor, p: float) -> torch.Tensor:
  """NumPy's linear `percentile` of a flat float tensor, by `kthvalue`."""
  n = values.numel()
  position = p / 100.0 * (n - 1)
  below = int(np.floor(position))
  low = torch.kthvalue(values, below + 1).values.double()
  if below + 1 >= n or position == below:
    return low
  high = torch.kthvalue(values, below + 2).values.double()
  t = position - below  # NumPy's lerp: from the nearer end
  return high - (high - low) * (1 - t) if t >= 0.5 else low + (high - low) * t


def _torch_react(x, y, weight, bias, hp):
  del y, weight, bias
  return {"threshold": _torch_percentile(x.reshape(-1), hp.get("percentile", 90.0)).float()}


def _torch_dice(x, y, weight, bias, hp):
  del y, bias
  mean = x.mean(dim=0, dtype=torch.float64)
  contrib = mean[None, :] * weight.double()  # [C, m]
  keep = contrib > torch.quantile(contrib.reshape(-1), hp.get("p", 70.0) / 100.0)
  return {"keep": keep}


def _torch_mahalanobis(x, y, weight, bias, hp):
  del weight, bias, hp
  num_classes = int(y.max()) + 1
  x = x.double()
  counts = torch.bincount(y, minlength=num_classes).double()
  means = torch.zeros(num_classes, x.shape[1], dtype=torch.float64).index_add_(0, y, x)
  means /= counts[:, None]
  centred = x - means[y]
  covariance = centred.T @ centred / x.shape[0]
  return {"means": means, "precision": torch.linalg.pinv(covariance, hermitian=True)}


def _torch_knn(x, y, weight, bias, hp):
  del y, weight, bias, hp
  return {"bank": x / (torch.linalg.vector_norm(x, dim=1, keepdim=True) + 1e-10)}


def _torch_vim(x, y, weight, bias, hp):
  del y
  dim = hp.get("dim") or _vim.default_dim(x.shape[1])
  origin = -torch.linalg.pinv(weight.double()) @ bias.double()
  centred = x.double() - origin
  _, vectors = torch.linalg.eigh(centred.T @ centred / x.shape[0])
  residual = vectors[:, : x.shape[1] - dim]
  max_logit = (x @ weight.T + bias).max(dim=1).values.double().mean()
  alpha = max_logit / torch.linalg.vector_norm(centred @ residual, dim=1).mean()
  return {"residual": residual, "alpha": alpha}


def _torch_line(x, y, weight, bias, hp):
  del bias
  p_w, p_a, clip = hp.get("p_w", 10.0), hp.get("p_a", 10.0), hp.get("clip")
  num_classes = weight.shape[0]
  taylor = (x * weight[y]).double()  # float32 products, float64 sums
  sums = torch.zeros(num_classes, x.shape[1], dtype=torch.float64).index_add_(0, y, taylor)
  contrib = sums / torch.bincount(y, minlength=num_classes).double()[:, None]
  neuron = contrib > torch.quantile(contrib, p_a / 100.0, dim=1, keepdim=True)
  importance = contrib.abs()[:, None, :] * weight.double()[None]  # [C, C, m]
  threshold = torch.quantile(importance.reshape(num_classes, -1), p_w / 100.0, dim=1)
  out = {"neuron_mask": neuron, "weight_mask": importance > threshold[:, None, None]}
  if hasattr(clip, "percentile"):  # a percentile of every training activation
    out["clip"] = _torch_percentile(x.reshape(-1), clip.percentile).float()
  return out


def _torch_rmds(x, y, weight, bias, hp):
  out = _torch_mahalanobis(x, y, weight, bias, hp)
  x = x.double()
  mean = x.mean(dim=0)
  centred = x - mean
  out["background_precision"] = torch.linalg.pinv(centred.T @ centred / x.shape[0],
                                                   hermitian=True)
  return out


TORCH: dict[str, Callable[..., dict]] = {
    "react": _torch_react, "dice": _torch_dice, "mahalanobis": _torch_mahalanobis,
    "rmds": _torch_rmds, "knn": _torch_knn, "vim": _torch_vim, "line": _torch_line,
}


# pytorch-ood 0.4.0's detectors compute these statistics in float32 (its
# `fit_features`, as documented there; written here from that description,
# since its package needs a torchvision build this machine's CPU torch lacks):
# the per-class scatter of class-centred features plus a 1e-6 ridge, not
# divided by n, and `torch.linalg.inv`; ViM's covariance around `-pinv(W) b`
# and `eigh`; KNN's bank `z / max(||z||, 1e-12)` handed to scikit-learn's
# `NearestNeighbors`; NNGuide's bank of every training row, `F.normalize(z)`
# times its energy, in chunks of 4,096 rows.


def _ood_scatter(x, y, num_classes):
  means = torch.zeros(num_classes, x.shape[1])
  scatter = torch.zeros(x.shape[1], x.shape[1])
  for c in range(num_classes):
    rows = x[y == c]
    means[c] = rows.mean(dim=0)
    scatter += (rows - means[c]).T @ (rows - means[c])
  return means, scatter + 1e-6 * torch.eye(x.shape[1])


def _ood_mahalanobis(x, y, weight, bias, hp):
  del weight, bias, hp
  means, scatter = _ood_scatter(x, y, int(y.max()) + 1)
  return {"means": means, "precision": torch.linalg.inv(scatter)}


def _ood_rmds(x, y, weight, bias, hp):
  out = _ood_mahalanobis(x, y, weight, bias, hp)
  centred = x - x.mean(dim=0)
  background = centred.T @ centred + 1e-6 * torch.eye(x.shape[1])
  out["background_precision"] = torch.linalg.inv(background)
  return out


def _ood_vim(x, y, weight, bias, hp):
  del y
  dim = hp.get("dim") or _vim.default_dim(x.shape[1])
  centred = x - (-torch.linalg.pinv(weight) @ bias)
  _, vectors = torch.linalg.eigh(centred.T @ centred / x.shape[0])
  residual = vectors[:, : x.shape[1] - dim]
  max_logit = (x @ weight.T + bias).max(dim=1).values.mean()
  return {"residual": residual,
          "alpha": max_logit / torch.linalg.vector_norm(centred @ residual, dim=1).mean()}


def _ood_knn(x, y, weight, bias, hp):
  del y, weight, bias, hp
  import sklearn.neighbors  # pylint: disable=g-import-not-at-top
  bank = x / x.norm(dim=1, keepdim=True).clamp(min=1e-12)
  return {"index": sklearn.neighbors.NearestNeighbors(n_jobs=-1).fit(bank.numpy())}


def _ood_nnguide(x, y, weight, bias, hp, chunk=4096):
  del y, hp
  rows = []
  for start in range(0, x.shape[0], chunk):
    z = x[start:start + chunk]
    energy = torch.logsumexp(z @ weight.T + bias, dim=1)
    rows.append(torch.nn.functional.normalize(z, dim=1) * energy[:, None])
  return {"bank": torch.cat(rows)}


TORCH_OOD: dict[str, Callable[..., dict]] = {
    "mahalanobis": _ood_mahalanobis, "rmds": _ood_rmds, "vim": _ood_vim, "knn": _ood_knn,
    "nnguide": _ood_nnguide,
}


def torch_fit(name: str) -> Callable[..., dict] | None:
  """The PyTorch counterpart of scorer `name`, or None where there is none."""
  if name in TORCH:
    return TORCH[name]
  if not scorers.get(name).fold.reads_data:
    return _torch_head
  return None


def max_rel_diff(a, b) -> float:
  """The largest difference of `a` and `b` over `b`'s largest magnitude."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def agreement(name: str, state: Any, stats: dict, kernel: np.ndarray, bias: np.ndarray,
              hp: dict) -> dict:
  """How line_jax's state and PyTorch's statistics agree: `{"ok": bool, ...}`.

  Masks and thresholds must be equal; float statistics within `RTOL` (their
  largest difference over their largest entry); ViM's residual spaces are
  compared as projections (eigenvectors have arbitrary signs).
  """
  del bias
  t = {k: v.numpy() for k, v in stats.items()}
  if name in ("react",):
    got = float(np.asarray(state.threshold))
    return {"threshold": got, "torch": float(t["threshold"]), "ok": got == float(t["threshold"])}
  if name == "dice":
    keep = np.asarray(state.weight) != 0
    mismatches = int(np.sum(keep != t["keep"]))
    return {"mask_mismatches": mismatches, "ok": mismatches == 0}
  if name in ("mahalanobis", "rmds"):
    means = np.asarray(state.means, np.float64) + np.asarray(state.center, np.float64)
    out = {"means_rel": max_rel_diff(means, t["means"]),
           "precision_rel": max_rel_diff(state.precision, t["precision"])}
    if name == "rmds":
      out["background_precision_rel"] = max_rel_diff(state.background_precision,
                                                     t["background_precision"])
    out["ok"] = max(out.values()) <= RTOL
    return out
  if name == "knn":
    bank = np.asarray(state.bank).reshape(-1, state.bank.shape[-1])[: state.size]
    out = {"bank_rel": max_rel_diff(bank, t["bank"])}
    out["ok"] = out["bank_rel"] <= RTOL
    return out
  if name == "vim":
    r, q = np.asarray(state.residual, np.float64), t["residual"]
    out = {"alpha_rel": max_rel_diff(state.alpha, t["alpha"]),
           "residual_projection_max_diff": float(np.max(np.abs(r @ r.T - q @ q.T)))}
    out["ok"] = max(out.values()) <= RTOL
    return out
  if name == "line":
    floor = np.asarray(state.weight_floor)  # keep kernel[j, k] iff > floor[c, j]
    weight_mask = kernel.T[None, :, :] > floor[:, None, :]
    out = {"neuron_mask_mismatches": int(np.sum(np.asarray(state.neuron_mask)
                                                != t["neuron_mask"])),
           "weight_mask_mismatches": int(np.sum(weight_mask != t["weight_mask"]))}
    if "clip" in t:
      out["clip_equal"] = float(np.asarray(state.clip)) == float(t["clip"])
    out["ok"] = not out["neuron_mask_mismatches"] and not out["weight_mask_mismatches"] and (
        out.get("clip_equal", True))
    return out
  if "weight" in t:  # the head, copied
    out = {"weight_equal": bool(np.array_equal(np.asarray(state.weight), t["weight"]))}
    out["ok"] = out["weight_equal"]
    return out
  return {"ok": None}


def ood_accuracy(name: str, ood: dict, reference: dict, samples: int) -> dict:
  """How far pytorch-ood's float32 statistics lie from the float64 ones
  (`{}` where there is nothing to compare)."""
  if name in ("mahalanobis", "rmds"):
    # pytorch-ood's scatter is not divided by n: its precision is n times smaller.
    out = {"precision_rel": max_rel_diff(samples * ood["precision"].double().numpy(),
                                 reference["precision"].numpy())}
    if name == "rmds":
      out["background_precision_rel"] = max_rel_diff(
          samples * ood["background_precision"].double().numpy(),
          reference["background_precision"].numpy())
    return out
  if name == "vim":
    r, q = ood["residual"].double().numpy(), reference["residual"].numpy()
    return {"alpha_rel": max_rel_diff(ood["alpha"].double().numpy(),
                                      reference["alpha"].numpy()),
            "residual_projection_max_diff": float(np.max(np.abs(r @ r.T - q @ q.T)))}
  return {}


def _seconds(fn: Callable[[], object], repeats: int = 3) -> float:
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def run(classes=CLASSES, *, samples: int = SAMPLES, features: int = FEATURES,
        rounds: int = 3, names=None, hparams=None, seed: int = 0,
        settle_s: float = SETTLE_S, data=None) -> list[dict]:
  """Times every scorer's fit in line_jax, in PyTorch and pytorch-ood's way, in turns.

  Args:
    classes: class counts, one problem each.
    samples, features: training set size.
    rounds: timed calls per implementation and cell (median).
    names: scorers (default: every registered one).
    hparams: `{name: {hyperparameter: value}}` overrides (default: defaults).
    seed: seed of the random problem.
    settle_s: pause before each timed call.
    data: `(features, labels, kernel, bias)` NumPy arrays (real features)
      instead of the random problems; `classes`, `samples` and `features`
      are then theirs.

  Returns:
    One dict per (scorer, class count): method, classes, features, samples,
    line_jax_s (median seconds), torch_s (or None), ratio (torch_s /
    line_jax_s), round_ratios, ood_s and ood_ratio (pytorch-ood's float32
    way, or None), ood_accuracy, checks_s, agreement.
  """
  hparams = hparams or {}
  async_dispatch = jax.config.read("jax_cpu_enable_async_dispatch")
  # Every call is waited for; see benchmarks.scorer_throughput.
  jax.config.update("jax_cpu_enable_async_dispatch", False)
  try:
    cells, fns = [], []
    problems = ([data] if data is not None else
                [problem(samples, features, c, seed) for c in classes])
    for x, y, kernel, bias in problems:
      num_classes, samples, features = kernel.shape[1], x.shape[0], x.shape[1]
      xj, yj, kj, bj = (jax.device_put(a) for a in (x, y, kernel, bias))
      xt, yt = torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))
      wt, bt = torch.from_numpy(np.ascontiguousarray(kernel.T)), torch.from_numpy(bias)
      for name in names or scorers.names():
        scorer, hp, fit_t = scorers.get(name), dict(hparams.get(name, {})), torch_fit(name)

        def jax_call(scorer=scorer, hp=hp, xj=xj, yj=yj, kj=kj, bj=bj):
          return jax.block_until_ready(scorer.fit(xj, yj, kj, bj, **hp))

        # The PyTorch side sees every hyperparameter, the defaults included.
        def torch_call(fit_t=fit_t, hp={**scorer.defaults, **hp}, xt=xt, yt=yt, wt=wt, bt=bt):
          with torch.no_grad():
            return fit_t(xt, yt, wt, bt, hp)

        ood_t = TORCH_OOD.get(name)

        def ood_call(ood_t=ood_t, hp={**scorer.defaults, **hp}, xt=xt, yt=yt, wt=wt, bt=bt):
          with torch.no_grad():
            return ood_t(xt, yt, wt, bt, hp)

        state = jax_call()
        check, accuracy = {"ok": None}, {}
        if fit_t is not None:
          reference = torch_call()
          check = agreement(name, state, reference, kernel, bias, hp)
          if ood_t is not None:
            accuracy = ood_accuracy(name, ood_call(), reference, samples)
        checks_s = _seconds(lambda yj=yj, xj=xj, kj=kj, bj=bj, scorer=scorer: (
            _common.check_train(xj, yj, kj, bj, needs_labels=scorer.fold.needs_labels)))
        sides = [jax_call] + [f for f, t in ((torch_call, fit_t), (ood_call, ood_t))
                              if t is not None]
        cells.append(dict(method=name, classes=num_classes, features=features, samples=samples,
                          hparams=hp, checks_s=checks_s, agreement=check,
                          ood_accuracy=accuracy, sides=(fit_t is not None, ood_t is not None)))
        fns += sides
    times = iter(timing.interleaved_blocks(fns, repeats=1, rounds=rounds, settle_s=settle_s,
                                           wake=False))
    records = []
    for cell in cells:
      has_torch, has_ood = cell.pop("sides")
      jx = [b[0] for b in next(times)]
      pt = [b[0] for b in next(times)] if has_torch else None
      ood = [b[0] for b in next(times)] if has_ood else None
      cell["line_jax_s"] = statistics.median(jx)
      cell["torch_s"] = statistics.median(pt) if pt else None
      cell["ratio"] = cell["torch_s"] / cell["line_jax_s"] if pt else None
      cell["round_ratios"] = [b / a for a, b in zip(jx, pt)] if pt else None
      cell["ood_s"] = statistics.median(ood) if ood else None
      cell["ood_ratio"] = cell["ood_s"] / cell["line_jax_s"] if ood else None
      records.append(cell)
    return records
  finally:
    jax.config.update("jax_cpu_enable_async_dispatch", async_dispatch)


def _agree_text(check: dict) -> str:
  if check.get("ok") is None:
    return "-"
  detail = ", ".join(f"{k} {v:.1e}" if isinstance(v, float) else f"{k} {v}"
                     for k, v in check.items() if k not in ("ok", "torch", "threshold"))
  return ("yes" if check["ok"] else "NO") + (f" ({detail})" if detail else "")


def table(records: list[dict]) -> str:
  """Markdown: one row per scorer and class count."""
  lines = ["| method | classes | line_jax s | of which input checks s | torch s | "
           "torch / line_jax | lowest round | agree | pytorch-ood way s | "
           "pytorch-ood / line_jax | pytorch-ood's float32 error |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in records:
    torch_s = f"{r['torch_s']:.4f}" if r["torch_s"] else "-"
    ratio = f"{r['ratio']:.2f}" if r["ratio"] else "-"
    low = f"{min(r['round_ratios']):.2f}" if r["round_ratios"] else "-"
    ood_s = f"{r['ood_s']:.4f}" if r.get("ood_s") else "-"
    ood_ratio = f"{r['ood_ratio']:.2f}" if r.get("ood_ratio") else "-"
    error = ", ".join(f"{k} {v:.1e}" for k, v in r.get("ood_accuracy", {}).items()) or "-"
    lines.append(f"| {r['method']} | {r['classes']} | {r['line_jax_s']:.4f} | "
                 f"{r['checks_s']:.4f} | {torch_s} | {ratio} | {low} | "
                 f"{_agree_text(r['agreement'])} | {ood_s} | {ood_ratio} | {error} |")
  return "\n".join(lines)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", help="write <out>/<device>/fits.{json,md}")
  parser.add_argument("--rounds", type=int, default=3, help="timed calls per side and cell")
  parser.add_argument("--samples", type=int, default=SAMPLES)
  parser.add_argument("--features", type=int, default=FEATURES)
  parser.add_argument("--classes", default=",".join(map(str, CLASSES)), help="comma-separated")
  parser.add_argument("--scorers", default=None, help="comma-separated (default: all)")
  args = parser.parse_args(argv)
  start = time.perf_counter()
  classes = tuple(int(c) for c in args.classes.split(","))
  names = args.scorers.split(",") if args.scorers else None
  records = run(classes, samples=args.samples, features=args.features, rounds=args.rounds,
                names=names)
  markdown = table(records)
  env = timing.environment()
  footer = (f"{jax.default_backend()} backend ({env['device']}), torch threads "
            f"{torch.get_num_threads()}, {args.samples:,} x {args.features} features, "
            f"{args.rounds} rounds, {SETTLE_S} s pause before each call, load average "
            f"{os.getloadavg()[0]:.1f} at the end (a shared machine), "
            f"{time.perf_counter() - start:.0f} s")
  print(markdown + "\n\n" + footer)
  if args.out:
    folder = report.write_table(
        args.out, "fits",
        {"environment": env, "settings": {"rounds": args.rounds, "samples": args.samples,
                                          "features": args.features, "classes": classes},
         "records": records},
        title="Fit time of every scorer, line_jax vs PyTorch (median seconds per fit)",
        command=f"python -m benchmarks.fit_throughput --out {args.out}",
        footer=footer, table=markdown)
    print(f"wrote {folder}/fits.json and fits.md")


if __name__ == "__main__":
  main()
