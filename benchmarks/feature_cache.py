"""What the shared feature cache saves: one fit without it, then with it.

`python -m line_jax.fit`, `tune` and `evaluate` read a training set's
features from `line_jax.features.cache` when an earlier run extracted them.
This runs `line_jax.runs.fit.run` three times in one process on the
committed Fashion-MNIST checkpoint, each into a fresh output folder, after an
untimed warm-up fit that compiles the model and the folds:

1. `--no-cache`: the model runs over every image (the baseline);
2. with an empty cache: the model runs and the rows are published;
3. with that cache: the model does not run, the scorers fold the cached rows.

It records the wall time of each, the ratio baseline / cached, and whether
run 3's states equal run 2's bit for bit (the same rows, folded the same way).

    python -m benchmarks.feature_cache [--max-examples 20000] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import sys
import tempfile
import time

import jax
import numpy as np

if __package__ in (None, ""):  # `python benchmarks/feature_cache.py`
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks import report  # pylint: disable=wrong-import-position
from benchmarks import timing  # pylint: disable=wrong-import-position
from line_jax import models  # pylint: disable=wrong-import-position
from line_jax.runs import Runtime  # pylint: disable=wrong-import-position
from line_jax.runs import fit  # pylint: disable=wrong-import-position

SCORERS = ("line", "react", "vim", "knn", "mahalanobis", "energy")


def run(max_examples: int, scorers=SCORERS, batch_size: int = 256) -> dict:
  """The three fits; `{"runs": [{"run", "seconds"}], "ratio", "identical"}`."""
  config = fit.Config(checkpoint=models.DEFAULT_CHECKPOINT, dataset="fashion_mnist",
                      scorers=tuple(scorers), benchmark="fashion_mnist", hparams={},
                      batch_size=batch_size, save_every=10 ** 6, max_examples=max_examples)
  runs, states = [], {}
  with tempfile.TemporaryDirectory(prefix="line_jax_cache_bench_") as tmp:
    # Untimed: compiles the model and the folds at the batch shape first.
    fit.run(dataclasses.replace(config, max_examples=min(2 * batch_size, max_examples)),
            os.path.join(tmp, "warm_up"), runtime=Runtime(progress=False))
    cache = os.path.join(tmp, "cache")
    for name, cache_dir in (("no cache", None), ("cache, empty", cache),
                            ("cache, filled", cache)):
      start = time.perf_counter()
      states[name] = fit.run(config, os.path.join(tmp, name.replace(" ", "_")),
                             runtime=Runtime(cache_dir=cache_dir, progress=False))
      runs.append({"run": name, "seconds": time.perf_counter() - start})
  identical = all(
      all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(states["cache, empty"][n]),
                                               jax.tree.leaves(states["cache, filled"][n])))
      for n in scorers)
  return {"images": max_examples, "scorers": list(scorers), "runs": runs,
          "ratio": runs[0]["seconds"] / runs[2]["seconds"], "identical": identical}


def table(result: dict) -> str:
  lines = ["| run | wall s |", "|---|---|"]
  lines += [f"| {r['run']} | {r['seconds']:.1f} |" for r in result["runs"]]
  lines += ["", f"{result['images']:,} images, scorers {', '.join(result['scorers'])}: "
                f"the filled cache fits {result['ratio']:.1f}x faster than no cache; states "
                f"{'bit-identical' if result['identical'] else 'DIFFERENT'} to the run that "
                "filled it."]
  return "\n".join(lines)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--max-examples", type=int, default=20_000)
  parser.add_argument("--out", help="write <out>/<device>/feature_cache.{json,md}")
  args = parser.parse_args(argv)
  result = run(args.max_examples)
  markdown = table(result)
  print(markdown)
  if args.out:
    env = timing.environment()
    env["loadavg"] = os.getloadavg()
    report.write_table(args.out, "feature_cache", {"environment": env, **result},
                       title="Fit with and without the shared feature cache",
                       command=f"python -m benchmarks.feature_cache --max-examples "
                               f"{args.max_examples} --out {args.out}",
                       footer=f"load average {env['loadavg'][0]:.1f}", table=markdown)


if __name__ == "__main__":
  main()
