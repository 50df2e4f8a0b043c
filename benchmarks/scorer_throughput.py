"""Scoring throughput of every registered scorer, line_jax vs. PyTorch.

For each head shape `(classes, features)` every scorer is fitted once on
random training features through the registry (default hyperparameters,
except KNN: its bank is the small training set, so k = 50, the paper's
CIFAR value). The PyTorch version of the same method
(`benchmarks.torch_baselines`, eval mode, `no_grad`) is built from the same
fitted state, and both score the same batch. After a warm-up call
(compilation) of every implementation of every cell (method and shape),
`rounds` rounds each run one block of `repeats` calls of each, cell after
cell, line_jax's block next to PyTorch's (`timing.interleaved_blocks`). Each
block starts with `WAKE_S` seconds of untimed calls of the same
implementation, both sides alike, so the figure is that of steady scoring (a
stream of batches): on this project's 2-core VM a call of a few hundred
microseconds stays up to 1.7x slower for the first tens of milliseconds
after its framework was idle, more so for XLA's workers than for PyTorch's
spinning OpenMP ones (`--wake-s 0` times those first calls). Every
call is waited for (`block_until_ready`), and a cell's median call time gives
its samples/s. A round visits all cells, so a spell of a few seconds in which
a shared machine runs slow falls into one round of many cells rather than into
every round of one. JAX runs with synchronous CPU dispatch here, as PyTorch
does (see `run`). Each round also gives a ratio of its own (line_jax's median
call time over PyTorch's in the two adjacent blocks); the lowest of them
shows how far such a spell moves the figure.

On a shared CPU run it while nothing else does: PyTorch's OpenMP barriers
slow down far more than XLA under foreign load.

Run from the repository root (about 27 minutes on 2 cores for batches of
256 and 1,024):

    python -m benchmarks.scorer_throughput [--batches 256 1024] [--wake-s 0.05] [--out benchmarks/results]

`--out DIR` writes `DIR/<device>/scorers.json` (records and environment) and
`scorers.md` (the table).
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

import jax
import numpy as np
import torch

if __package__ in (None, ""):  # `python benchmarks/scorer_throughput.py`
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks import report  # pylint: disable=wrong-import-position
from benchmarks import timing  # pylint: disable=wrong-import-position
from benchmarks import torch_baselines  # pylint: disable=wrong-import-position
from line_jax import scorers  # pylint: disable=wrong-import-position

SHAPES = ((10, 342), (100, 342), (1000, 2048))
# Each block starts with this long a spell of untimed calls, so that it times
# steady scoring (a stream of batches), not the wake-up of idle workers.
WAKE_S = 0.05


def _problem(num_classes: int, num_features: int, train: int, batch: int, seed: int):
  rng = np.random.default_rng(seed)
  labels = np.arange(train) % num_classes
  features = np.abs(rng.normal(size=(train, num_features))).astype(np.float32)
  kernel = (rng.normal(size=(num_features, num_classes)) / np.sqrt(num_features)).astype(np.float32)
  bias = (0.1 * rng.normal(size=(num_classes,))).astype(np.float32)
  test = np.abs(rng.normal(size=(batch, num_features))).astype(np.float32)
  return features, labels, kernel, bias, test


def run(shapes=SHAPES, batch: int = 256, repeats: int = 10, *, rounds: int = 7,
        train: int = 2048, knn_k: int = 50, names=None, seed: int = 0,
        wake_s: float = WAKE_S) -> list[dict]:
  """Measures samples/s of every scorer in line_jax and in PyTorch.

  Args:
    shapes: `(classes, features)` head shapes.
    batch: test samples per score call.
    repeats: timed calls per block.
    rounds: blocks per implementation and measurement (median of all calls).
    train: training samples each scorer is fitted on (also the KNN bank).
    knn_k: KNN's k (its default 1000 suits a full ImageNet bank, not this).
    names: scorers to measure (default: all registered).
    seed: seed of the random problem.
    wake_s: untimed calls before each block, in seconds
      (`timing.interleaved_blocks`); 0 for one call.

  Returns:
    One dict per (scorer, shape, implementation): what, method, classes,
    features, batch, implementation ("line_jax" or "torch"), samples_per_s;
    line_jax's also has `round_ratios`, its speed over PyTorch's per round.
    PyTorch runs on the GPU when there is one (synchronised after each call).
  """
  # Every call here is waited for, so on CPU asynchronous dispatch would only
  # add a hand-off to a worker thread and back per call (tens of
  # microseconds, as much as the whole of a small head's work); PyTorch
  # runs on the calling thread too. Restored on exit.
  async_dispatch = jax.config.read("jax_cpu_enable_async_dispatch")
  jax.config.update("jax_cpu_enable_async_dispatch", False)
  try:
    return _run(shapes, batch, repeats, rounds, train, knn_k, names, seed, wake_s)
  finally:
    jax.config.update("jax_cpu_enable_async_dispatch", async_dispatch)


def _run(shapes, batch, repeats, rounds, train, knn_k, names, seed, wake_s) -> list[dict]:
  cells, fns = [], []  # cells: (method, classes, features, implementations)
  for num_classes, num_features in shapes:
    features, labels, kernel, bias, test = _problem(
        num_classes, num_features, max(train, num_classes), batch, seed)
    test_jax = jax.device_put(test)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    test_torch = torch.from_numpy(test).to(device)
    for name in names or scorers.names():
      scorer = scorers.get(name)
      hparams = {"k": knn_k} if name == "knn" else {}
      state = scorer.fit(features, labels, kernel, bias, **hparams)
      module = torch_baselines.from_state(name, state).to(device)

      def jax_call(state=state, scorer=scorer, test_jax=test_jax):
        scorer.score(state, test_jax).block_until_ready()

      def torch_call(module=module, test_torch=test_torch, device=device):
        with torch.no_grad():
          module(test_torch)
        if device == "cuda":
          torch.cuda.synchronize()

      implementations = [("line_jax", jax_call), ("torch", torch_call)]
      try:
        torch_call()
      except RuntimeError as error:  # a baseline that is not device-clean
        print(f"torch {name} failed on {device}: {error}", file=sys.stderr)
        implementations = implementations[:1]
      cells.append((name, num_classes, num_features, [i for i, _ in implementations]))
      fns += [fn for _, fn in implementations]
  # One round visits every cell, so a slow spell of the machine lasting a
  # few seconds lands in one round of many cells, not in every round of one.
  times = iter(timing.interleaved_blocks(fns, repeats=repeats, rounds=rounds, wake_s=wake_s))
  records = []
  for name, num_classes, num_features, implementations in cells:
    blocks_of = {implementation: next(times) for implementation in implementations}
    for implementation, blocks in blocks_of.items():
      records.append({
          "what": "scorer", "method": name, "classes": num_classes,
          "features": num_features, "batch": batch, "implementation": implementation,
          "samples_per_s": batch / statistics.median(t for b in blocks for t in b),
      })
      if implementation == "line_jax" and "torch" in blocks_of:
        records[-1]["round_ratios"] = [statistics.median(pt) / statistics.median(jx)
                                       for jx, pt in zip(blocks, blocks_of["torch"])]
  return records


def table(records: list[dict]) -> str:
  """Markdown table: one row per method and shape, both implementations."""
  rows = {}
  for r in records:
    key = (r["method"], r["classes"], r["features"], r["batch"])
    rows.setdefault(key, {})[r["implementation"]] = r["samples_per_s"]
  lowest = {(r["method"], r["classes"], r["features"], r["batch"]): min(r["round_ratios"])
            for r in records if r.get("round_ratios")}
  lines = ["| method | classes x features | batch | line_jax samples/s | torch samples/s "
           "| ratio | lowest round ratio |", "|---|---|---:|---|---|---|---|"]
  for key, rates in rows.items():
    method, c, m, batch = key
    jx, pt = rates.get("line_jax", float("nan")), rates.get("torch", float("nan"))
    low = f"{lowest[key]:.2f}" if key in lowest else "-"
    lines.append(f"| {method} | {c} x {m} | {batch} | {jx:,.0f} | {pt:,.0f} | {jx / pt:.2f} "
                 f"| {low} |")
  return "\n".join(lines)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", help="write <out>/<device>/scorers.{json,md}")
  parser.add_argument("--rounds", type=int, default=7, help="blocks per implementation")
  parser.add_argument("--repeats", type=int, default=10, help="timed calls per block")
  parser.add_argument("--batches", type=int, nargs="+", default=[256, 1024],
                      help="test samples per score call, one run each")
  parser.add_argument("--wake-s", type=float, default=WAKE_S,
                      help="seconds of untimed calls before each timed block")
  args = parser.parse_args(argv)
  start = time.perf_counter()
  records = [r for batch in args.batches
             for r in run(batch=batch, rounds=args.rounds, repeats=args.repeats,
                          wake_s=args.wake_s)]
  markdown = table(records)
  env = timing.environment()
  footer = (f"{jax.default_backend()} backend ({env['device']}), torch threads "
            f"{torch.get_num_threads()}, rounds {args.rounds} x {args.repeats} calls after "
            f"{args.wake_s * 1e3:.0f} ms of untimed calls, "
            f"{time.perf_counter() - start:.0f} s")
  print(markdown + "\n\n" + footer)
  if args.out:
    folder = report.write_table(
        args.out, "scorers",
        {"environment": env, "settings": {"rounds": args.rounds, "repeats": args.repeats,
                                          "batches": args.batches, "wake_s": args.wake_s},
         "records": records},
        title=f"Every scorer, line_jax vs PyTorch, batch "
              f"{' and '.join(map(str, args.batches))} (samples/s)",
        command=(f"python -m benchmarks.scorer_throughput --batches "
                 f"{' '.join(map(str, args.batches))} --wake-s {args.wake_s} --out {args.out}"),
        footer=footer, table=markdown)
    print(f"wrote {folder}/scorers.json and scorers.md")


if __name__ == "__main__":
  main()
