"""Fits and nearest-neighbour scoring on real features, line_jax against PyTorch.

The features are real: DenseNet-BC-100 (the LINe paper's CIFAR-10
checkpoint, `../shared/weights`) over CIFAR-10's 50,000 training images
(342 features each) and, as queries, its test images, read through the
library's feature cache (`Backbone.read`: extracted once, several minutes on
2 cores, then memory-mapped). Two tables, in one process:

1. **Fits** (`fit_throughput.run` on these arrays): KNN, NNGuide, RMDS,
   Mahalanobis, ViM and the rest, line_jax's `Scorer.fit` against a
   straightforward PyTorch computation of the same float64 statistics
   (agreement checked) and against pytorch-ood 0.4.0's float32 computation
   (`fit_throughput.TORCH_OOD`; its distance from the float64 statistics is
   reported too).
2. **Nearest-neighbour scoring**: banks of the first 10,000 and of all
   50,000 training rows, every k in the scorer's tuning grid, the queries in
   batches of 256 and of all of them at once, through the public
   `Scorer.score`. KNN against PyTorch (`topk` of `2 z.b - ||b||^2` over the
   normalised bank) and against scikit-learn's `NearestNeighbors`, the index
   pytorch-ood's KNN scores with; NNGuide against pytorch-ood's computation
   in PyTorch (the energy times the mean of the k largest `z . b`). Scores
   must agree to `RTOL` of their largest magnitude.

The implementations take turns call by call (`timing.interleaved_blocks`);
the table gives the median seconds to score all queries and the ratios.

    python -m benchmarks.nearest_neighbours --id-folder ../shared/data/cifar10 \\
        --torch-checkpoint ../shared/weights/dice_densenet100_cifar10.pth.tar \\
        [--cache-dir DIR] [--queries 2000] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
import os
import pathlib
import statistics
import sys
import time

import jax
import numpy as np
import torch

if __package__ in (None, ""):  # `python benchmarks/nearest_neighbours.py`
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks import fit_throughput  # pylint: disable=wrong-import-position
from benchmarks import report  # pylint: disable=wrong-import-position
from benchmarks import timing  # pylint: disable=wrong-import-position
from line_jax import features as features_lib  # pylint: disable=wrong-import-position
from line_jax import scorers  # pylint: disable=wrong-import-position
from line_jax import suites  # pylint: disable=wrong-import-position

BANKS = (10_000, 50_000)
BATCHES = (256, None)  # None: every query in one call
RTOL = 1e-4
FIT_SCORERS = ("knn", "nnguide", "rmds", "mahalanobis", "vim", "msp", "react", "dice", "line")


def real_features(id_folder: str, torch_checkpoint: str, cache_dir: str):
  """`(train features, train labels, test features, kernel, bias)` NumPy arrays
  of the CIFAR-10 DenseNet-BC-100, through the feature cache."""
  inputs = suites.paper_inputs(suites.get("cifar10"), None, torch_checkpoint,
                               id_folder=id_folder)
  read = lambda source, what: inputs.backbone.read(  # noqa: E731
      source, cache_dir=cache_dir, description=what, progress=what)
  train, test = read(inputs.train, "train"), read(inputs.test, "test")
  kernel, bias = inputs.backbone.head_params()
  # Read into memory (writable: PyTorch takes the arrays as they are).
  return (np.array(train.features), np.array(train.labels, np.int32),
          np.array(test.features), np.array(kernel, np.float32), np.array(bias, np.float32))


def _torch_knn(bank: torch.Tensor, k: int) -> Callable[[torch.Tensor], torch.Tensor]:
  b = bank / (torch.linalg.vector_norm(bank, dim=1, keepdim=True) + 1e-10)
  sq = (b * b).sum(dim=1)

  def score(q):
    z = q / (torch.linalg.vector_norm(q, dim=1, keepdim=True) + 1e-10)
    kth = torch.topk(2.0 * z @ b.T - sq, k, dim=1).values[:, -1]
    return -torch.sqrt(torch.clamp((z * z).sum(dim=1) - kth, min=0.0))
  return score


def _sklearn_knn(bank: np.ndarray, k: int) -> Callable[[np.ndarray], np.ndarray]:
  import sklearn.neighbors  # pylint: disable=g-import-not-at-top
  index = sklearn.neighbors.NearestNeighbors(n_jobs=-1).fit(
      bank / (np.linalg.norm(bank, axis=1, keepdims=True) + 1e-10))

  def score(q):
    z = q / (np.linalg.norm(q, axis=1, keepdims=True) + 1e-10)
    return -index.kneighbors(z, n_neighbors=k, return_distance=True)[0][:, -1]
  return score


def _torch_nnguide(bank, weight, bias, k):
  energy = lambda h: torch.logsumexp(h @ weight.T + bias, dim=1)  # noqa: E731
  guide = torch.nn.functional.normalize(bank, dim=1) * energy(bank)[:, None]

  def score(q):
    z = torch.nn.functional.normalize(q, dim=1)
    return energy(q) * torch.topk(z @ guide.T, k, dim=1).values.mean(dim=1)
  return score


def _chunks(x, batch):
  return [x[i:i + batch] for i in range(0, len(x), batch)]


def scoring(train, test, kernel, bias, *, banks=BANKS, batches=BATCHES, rounds: int = 3,
            settle_s: float = 0.1, knn_k=None, nnguide_k=None) -> list[dict]:
  """Times KNN's and NNGuide's scoring of `test` against banks of `train`'s rows.

  Returns one dict per (method, bank, k, batch): seconds per side (median
  over `rounds` of scoring every query), ratios (theirs / line_jax's) and
  the largest score difference relative to the largest score.
  """
  knn_k = knn_k or scorers.get("knn").grid["k"]
  nnguide_k = nnguide_k or scorers.get("nnguide").grid["k"]
  weight_t, bias_t = torch.from_numpy(np.ascontiguousarray(kernel.T)), torch.from_numpy(bias)
  cells, fns = [], []
  for rows in banks:
    bank = train[:rows]
    bank_t = torch.from_numpy(bank)
    for name, grid in (("knn", knn_k), ("nnguide", nnguide_k)):
      scorer = scorers.get(name)
      for k in grid:
        hp = {"k": k} if name == "knn" else {"k": k, "bank_size": rows}
        state = scorer.fit(bank, None, kernel, bias, **hp)
        others = ({"torch": _torch_knn(bank_t, k), "sklearn": _sklearn_knn(bank, k)}
                  if name == "knn" else
                  {"torch": _torch_nnguide(bank_t, weight_t, bias_t, k)})
        for batch in batches:
          size = batch or len(test)
          parts = _chunks(test, size)
          jax_parts = [jax.device_put(p) for p in parts]
          torch_parts = [torch.from_numpy(p) for p in parts]

          def jax_call(state=state, scorer=scorer, jax_parts=jax_parts):
            return [jax.block_until_ready(scorer.score(state, p)) for p in jax_parts]

          sides = {"line_jax": jax_call}
          for side, fn in others.items():
            inputs = parts if side == "sklearn" else torch_parts

            def call(fn=fn, inputs=inputs):
              with torch.no_grad():
                return [fn(p) for p in inputs]
            sides[side] = call
          ours = np.concatenate([np.asarray(s) for s in jax_call()])
          agree = {side: fit_throughput.max_rel_diff(
                       ours, np.concatenate([np.asarray(s) for s in call()]))
                   for side, call in sides.items() if side != "line_jax"}
          cells.append(dict(method=name, bank=rows, k=k, batch=size, queries=len(test),
                            sides=list(sides), rel_diff=agree,
                            agree=all(v <= RTOL for v in agree.values())))
          fns += list(sides.values())
  times = iter(timing.interleaved_blocks(fns, repeats=1, rounds=rounds, settle_s=settle_s,
                                         wake=False))
  for cell in cells:
    cell["seconds"] = {side: statistics.median(b[0] for b in next(times))
                       for side in cell.pop("sides")}
    cell["ratios"] = {side: s / cell["seconds"]["line_jax"]
                      for side, s in cell["seconds"].items() if side != "line_jax"}
  return cells


def scoring_table(records: list[dict]) -> str:
  """Markdown: one row per (method, bank, k, batch)."""
  lines = ["| method | bank rows | k | batch | line_jax s | torch s | torch / line_jax | "
           "sklearn s | sklearn / line_jax | agree (largest rel. diff) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for r in records:
    s, q = r["seconds"], r["ratios"]
    sk = (f"{s['sklearn']:.3f} | {q['sklearn']:.2f}" if "sklearn" in s else "- | -")
    diff = ", ".join(f"{k} {v:.1e}" for k, v in r["rel_diff"].items())
    lines.append(f"| {r['method']} | {r['bank']:,} | {r['k']} | {r['batch']:,} | "
                 f"{s['line_jax']:.3f} | {s['torch']:.3f} | {q['torch']:.2f} | {sk} | "
                 f"{'yes' if r['agree'] else 'NO'} ({diff}) |")
  return "\n".join(lines)


def chart(fits: list[dict], scores: list[dict], out: str) -> str:
  """`out` (PNG): each fit's and each scoring cell's speed over line_jax's,
  against PyTorch and against pytorch-ood's way (scikit-learn for KNN's
  scoring); above 1, line_jax is faster."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  labels, ratios = zip(*chart_rows(fits, scores))
  fig, axis = plt.subplots(figsize=(8, 0.16 * len(labels) + 1.2))
  axis.barh(range(len(labels)), ratios,
            color=["tab:blue" if r >= 1 else "tab:red" for r in ratios])
  axis.axvline(1.0, color="black", linewidth=0.8)
  axis.set_yticks(range(len(labels)), labels, fontsize=5.5)
  axis.set_ylim(len(labels) - 0.5, -0.5)  # First row on top, no margins.
  axis.set_xlabel("their seconds / line_jax's (above 1: line_jax faster)", fontsize=8)
  axis.set_title("Fits and nearest-neighbour scoring on DenseNet-BC-100 CIFAR-10 features",
                 fontsize=9)
  fig.tight_layout()
  fig.savefig(out, dpi=110)
  plt.close(fig)
  return out


def chart_rows(fits: list[dict], scores: list[dict]) -> list[tuple[str, float]]:
  """`(label, their seconds / line_jax's)` of every bar of `chart`."""
  rows = []
  for r in fits:
    for side, key in (("PyTorch float64", "ratio"), ("pytorch-ood float32", "ood_ratio")):
      if r.get(key):
        rows.append((f"fit {r['method']} vs {side}", r[key]))
  for r in scores:
    for side, ratio in r["ratios"].items():
      name = "scikit-learn (pytorch-ood)" if side == "sklearn" else "PyTorch"
      rows.append((f"{r['method']} {r['bank'] // 1000}k rows k={r['k']} batch {r['batch']}"
                   f" vs {name}", ratio))
  return rows


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--id-folder", required=True, help="CIFAR-10 ImageFolder (train/, test/)")
  parser.add_argument("--torch-checkpoint", required=True, help="DenseNet-BC-100 state_dict")
  parser.add_argument("--cache-dir", default=features_lib.cache.default_dir())
  parser.add_argument("--queries", type=int, default=2000, help="test rows scored")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--out", help="write <out>/<device>/nearest_neighbours.{json,md}")
  args = parser.parse_args(argv)
  start = time.perf_counter()
  train, labels, test, kernel, bias = real_features(args.id_folder, args.torch_checkpoint,
                                                    args.cache_dir)
  test = np.ascontiguousarray(test[:: max(1, len(test) // args.queries)][: args.queries])
  fits = fit_throughput.run(data=(train, labels, kernel, bias), names=FIT_SCORERS,
                            rounds=args.rounds)
  scores = scoring(train, test, kernel, bias, rounds=args.rounds)
  env = timing.environment()
  footer = (f"{jax.default_backend()} backend ({env['device']}), torch threads "
            f"{torch.get_num_threads()}, DenseNet-BC-100 CIFAR-10 features: "
            f"{train.shape[0]:,} x {train.shape[1]} training rows, {len(test):,} test "
            f"queries; {args.rounds} rounds; load average {os.getloadavg()[0]:.1f} at the "
            f"end (a shared machine); {time.perf_counter() - start:.0f} s")
  markdown = ("## Fits (median seconds per fit)\n\n" + fit_throughput.table(fits)
              + "\n\n## Scoring every query against a bank (median seconds)\n\n"
              + scoring_table(scores))
  print(markdown + "\n\n" + footer)
  if args.out:
    folder = report.write_table(
        args.out, "nearest_neighbours",
        {"environment": env, "settings": {"rounds": args.rounds, "queries": len(test),
                                          "banks": BANKS, "batches": BATCHES},
         "fits": fits, "scoring": scores},
        title="Fits and nearest-neighbour scoring on real features, line_jax vs PyTorch",
        command=("python -m benchmarks.nearest_neighbours --id-folder ../shared/data/cifar10 "
                 "--torch-checkpoint ../shared/weights/dice_densenet100_cifar10.pth.tar "
                 f"--out {args.out}"),
        footer=footer, table=markdown)
    chart(fits, scores, os.path.join(folder, "nearest_neighbours.png"))
    print(f"wrote {folder}/nearest_neighbours.json, .md and .png")


if __name__ == "__main__":
  main()
