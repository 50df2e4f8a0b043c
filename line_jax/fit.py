"""Fit every scorer on a training set, streaming and resumable: `python -m line_jax.fit`.

    python -m line_jax.fit --out fits/fmnist                 # all scorers
    python -m line_jax.fit --out DIR --dataset path/to/imagefolder --scorers line,knn

Images stream through the grain pipeline (`--workers` decoding threads) and a
checkpoint's model; the checkpoint's config decides the size and channels,
so a folder of colour JPEGs of any size feeds a 28x28 grayscale model. Every
scorer folds over the one stream (`line_jax.fold`); `DIR/<scorer>` holds
each fitted state (`line_jax.load`). Killed at any moment and run again with
the same arguments, the run resumes from its last saved batch to
bit-identical states; other arguments on a resume are refused.

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
import json
import os
import sys
from typing import Any

from line_jax import _cli
from line_jax import fold
from line_jax import io
from line_jax import scorers

DEFAULT_CHECKPOINT = _cli.DEFAULT_CHECKPOINT
ARGS_FILE = "args.json"
FEATURES_FILE = fold.FEATURES_FILE
PROGRESS_DIR = fold.PROGRESS_DIR


def _parser() -> argparse.ArgumentParser:
  p = _cli.parser("python -m line_jax.fit", __doc__)
  p.add_argument("--out", required=True, help="output folder (resumed if present)")
  p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="line_jax checkpoint folder")
  p.add_argument("--dataset", default="fashion_mnist", help=_cli.DATASET_HELP)
  p.add_argument("--scorers", default=",".join(scorers.names()), help="comma-separated")
  p.add_argument("--hparam", action="append", default=[],
                 help="SCORER.NAME=VALUE (a JSON value), repeatable")
  p.add_argument("--batch-size", type=int, default=256, help="images per model call")
  p.add_argument("--save-every", type=int, default=20, help="batches between saves")
  p.add_argument("--max-examples", type=int, default=None, help="only the first N images")
  p.add_argument("--workers", type=int, default=os.cpu_count(), help="decoding threads")
  _cli.add_common(p)
  _cli.add_distributed(p)
  return p


def _resolve(args: argparse.Namespace) -> dict[str, Any]:
  """The arguments as stored in args.json (paths absolute, names checked)."""
  names = _cli.scorer_names(args.scorers)
  for flag in ("batch_size", "save_every", "max_examples"):
    value = getattr(args, flag)
    if value is not None and value < 1:
      raise ValueError(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
  dataset = args.dataset if not os.path.isdir(args.dataset) else os.path.abspath(args.dataset)
  config = dict(checkpoint=os.path.abspath(args.checkpoint), dataset=dataset, scorers=names,
                hparams=_cli.parse_hparams(args.hparam, names), batch_size=args.batch_size,
                save_every=args.save_every, max_examples=args.max_examples)
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() > 1:  # A resume must keep the process count (the shards).
    config["num_processes"] = jax.process_count()
  return config


def _claim(out: str, config: dict[str, Any]) -> None:
  """Writes args.json (process 0), or checks that a resumed run has the same arguments."""
  import jax  # pylint: disable=g-import-not-at-top
  path = os.path.join(out, ARGS_FILE)
  resumed = os.path.exists(path)
  _cli.barrier("line_jax.fit:claim")  # Everyone has looked before process 0 writes.
  if jax.process_index() == 0 and not resumed:
    os.makedirs(out, exist_ok=True)
    _cli.write_json(path, config)
  _cli.barrier("line_jax.fit:claimed")
  if resumed:
    with open(path) as f:
      stored = json.load(f)
    if stored != config:
      diff = [f"{k}: {stored.get(k)!r} -> {config.get(k)!r}"
              for k in sorted(set(stored) | set(config)) if stored.get(k) != config.get(k)]
      raise ValueError(
          f"{out} holds a run started with other arguments ({'; '.join(diff)}); "
          "run again with the same arguments to resume, or choose another --out")


def run(config: dict[str, Any], out: str, *, workers: int | None = None,
        quiet: bool = False) -> dict[str, Any]:
  """Streams the training set, folds every scorer, saves the states in `out`."""
  out = os.path.abspath(out)
  model = _cli.open_model(config["checkpoint"])
  batches = model.batches(config["dataset"], "train", config["batch_size"], workers=workers,
                          limit=config["max_examples"])
  _claim(out, config)
  with _cli.progress(batches.num_records, "features", quiet=quiet) as bar:
    states = fold.fit_stream({n: config["hparams"].get(n, {}) for n in config["scorers"]},
                             model.kernel, model.bias, model.features(batches), out,
                             save_every=config["save_every"], on_batch=bar)
  for name, state in states.items():
    io.save(os.path.join(out, name), state)
  return states


def load_state(out: str | os.PathLike, name: str) -> Any:
  """The state `python -m line_jax.fit --out OUT` wrote for scorer `name`."""
  path = os.path.join(os.fspath(out), name)
  if not os.path.isdir(path):
    raise ValueError(f"{out} holds no fitted state {name!r} (run python -m "
                     "line_jax.fit to the end first)")
  return io.load(path)


def main(argv: Sequence[str] | None = None) -> None:
  args = _parser().parse_args(argv)
  with _cli.user_errors(resumable=True):
    _cli.init_distributed(args)
    config = _resolve(args)
    run(config, args.out, workers=args.workers, quiet=args.quiet)
  print(f"wrote {', '.join(config['scorers'])} to {os.path.abspath(args.out)}", file=sys.stderr)


if __name__ == "__main__":
  main()
