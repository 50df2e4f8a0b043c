"""Fit every scorer on a training set, streaming and resumable: `python -m line_jax.fit`.

    python -m line_jax.fit --out fits/fmnist                 # all scorers
    python -m line_jax.fit --out DIR --dataset path/to/imagefolder --scorers line,knn

Images stream through the grain pipeline (`--workers` decoding threads) and a
checkpoint's model; the checkpoint's config decides the size and channels,
so a folder of colour JPEGs of any size feeds a 28x28 grayscale model. Every
scorer folds over the one stream (`line_jax.fold`); `DIR/<scorer>` holds
each fitted state (`line_jax.load`) and `DIR/hparams.json` the settings each
ran with, resolved (they paste into `--hparam` and `Scorer.fit`). The
settings follow the one rule `evaluate` follows too
(`_protocols.hparams_for`): registry defaults, then `--benchmark`'s, then
`--hparam`'s; so `fit --dataset fashion_mnist` and `evaluate` (both
`--benchmark fashion_mnist` by default) fit the same detectors. Killed at any
moment and run again with the same arguments, the run resumes from its last
saved batch to bit-identical states; other arguments on a resume are refused.

Features go to the feature cache `tune` and `evaluate` share
(`line_jax.feature_cache`, `--cache-dir`): where it already holds this
checkpoint's features of this dataset, the model does not run at all.

Multi-host: run the same command in every process with `--coordinator
HOST:PORT --num-processes N --process-id I` (or `--coordinator auto` on Cloud
TPU, SLURM, Open MPI). Each process reads its own contiguous shard of the
dataset into the shared `--out` (`features.pI.npy`); each progress save is
one orbax step holding every process's accumulators and position (process 0
writes it); the accumulators are merged across processes at the end of each
pass, and process 0 writes args.json and the states.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
import os
import sys
from typing import Any

import jax

from line_jax import _cli
from line_jax import _protocols
from line_jax import fitting
from line_jax import fold
from line_jax import scorers
# The library side, under the names the CLI's users know.
from line_jax.fitting import ARGS_FILE
from line_jax.fitting import CACHED_DIR
from line_jax.fitting import HPARAMS_FILE
from line_jax.fitting import fit_checkpoint as run
from line_jax.fitting import load_state

DEFAULT_CHECKPOINT = _cli.DEFAULT_CHECKPOINT
FEATURES_FILE = fold.FEATURES_FILE
PROGRESS_DIR = fold.PROGRESS_DIR


def _parser() -> argparse.ArgumentParser:
  p = _cli.parser("python -m line_jax.fit", __doc__)
  p.add_argument("--out", required=True, help="output folder (resumed if present)")
  p.add_argument("--dataset", default="fashion_mnist", help=_cli.DATASET_HELP)
  _cli.add_data(p, scorers_default=None, scorers_help="default: all registered")
  p.add_argument("--benchmark", default=None,
                 choices=[*_protocols.PROTOCOLS, _protocols.NO_BENCHMARK],
                 help="whose settings the scorers take, as evaluate's --benchmark (default: "
                      "fashion_mnist for --dataset fashion_mnist, else none: the registry's)")
  p.add_argument("--hparam", action="append", default=[],
                 help="SCORER.NAME=VALUE (a JSON value), repeatable")
  p.add_argument("--save-every", type=int, default=20, help="batches between saves")
  p.add_argument("--max-examples", type=int, default=None, help="only the first N images")
  _cli.add_cache(p)
  _cli.add_common(p)
  _cli.add_distributed(p)
  return p


def _resolve(args: argparse.Namespace) -> dict[str, Any]:
  """The arguments as stored in args.json (paths absolute, names checked)."""
  names = _cli.scorer_names(args.scorers or ",".join(scorers.names()))
  for flag in ("batch_size", "save_every", "max_examples"):
    value = getattr(args, flag)
    if value is not None and value < 1:
      raise ValueError(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
  dataset = args.dataset if not os.path.isdir(args.dataset) else os.path.abspath(args.dataset)
  benchmark = args.benchmark or (
      "fashion_mnist" if args.dataset == "fashion_mnist" else _protocols.NO_BENCHMARK)
  config = dict(checkpoint=os.path.abspath(args.checkpoint), dataset=dataset, scorers=names,
                benchmark=benchmark,
                hparams=_cli.parse_hparams(args.hparam, names), batch_size=args.batch_size,
                save_every=args.save_every, max_examples=args.max_examples)
  if jax.process_count() > 1:  # A resume must keep the process count (the shards).
    config["num_processes"] = jax.process_count()
  return config


def main(argv: Sequence[str] | None = None) -> None:
  args = _parser().parse_args(argv)
  with _cli.user_errors(resumable=True):
    _cli.init_distributed(args)
    config = _resolve(args)
    fitting.fit_checkpoint(config, args.out, workers=args.workers, quiet=args.quiet,
                           cache_dir=_cli.cache_dir(args))
  if not args.quiet:
    print(f"wrote {', '.join(config['scorers'])} to {os.path.abspath(args.out)}",
          file=sys.stderr)


if __name__ == "__main__":
  main()
