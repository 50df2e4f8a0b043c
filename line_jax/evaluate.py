"""Evaluates every registered OOD scorer on a benchmark: metrics, table, plots.

    python -m line_jax.evaluate --out DIR            # Fashion-MNIST, committed checkpoint
    python -m line_jax.evaluate --out DIR --extra-ood mine=my_images.npy
    python -m line_jax.evaluate --out DIR --benchmark cifar10 --id-folder cifar10-jpeg
        --torch-checkpoint dice_densenet100_cifar10.pth.tar

A thin shell over `line_jax.evaluation.run_evaluation` (see there for the
files it writes); this module only parses flags. Features come from the
feature cache `fit` and `tune` share (`--cache-dir`), and the scorers take
the benchmark's settings by the rule `fit` follows (`--hparam` over them).

Multi-host: the same command in every process with `--coordinator HOST:PORT
--num-processes N --process-id I`: each process extracts and scores its own
shard of every set, the fits merge across processes, and process 0 writes
the outputs.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
import sys
import time

import jax

from line_jax import _cli
from line_jax import _protocols
from line_jax import scorers as _scorers
from line_jax.evaluation import DEFAULT_CHECKPOINT
from line_jax.evaluation import METRICS  # noqa: F401  Re-exported for callers.
from line_jax.evaluation import Inputs  # noqa: F401
from line_jax.evaluation import fashion_mnist_inputs  # noqa: F401
from line_jax.evaluation import format_table
from line_jax.evaluation import paper_inputs  # noqa: F401
from line_jax.evaluation import run_evaluation
from line_jax.evaluation import score_all  # noqa: F401


def _parser() -> argparse.ArgumentParser:
  p = _cli.parser("python -m line_jax.evaluate", __doc__)
  p.add_argument("--out", required=True, help="output folder")
  p.add_argument("--benchmark", default="fashion_mnist", choices=list(_protocols.PROTOCOLS),
                 help="the protocol: data, model, OOD sets and settings")
  _cli.add_data(p, scorers_default=None, scorers_help="default: all registered")
  p.add_argument("--extra-ood", action="append", default=[], metavar="NAME=PATH",
                 help="add an OOD set: a uint8 [N, H, W(, C)] .npy or a folder of images; "
                      "repeatable")
  p.add_argument("--data-dir", default=None, help="TFDS data and the paper's OOD sets")
  p.add_argument("--id-folder", default=None,
                 help="ID images as <folder>/{train,test}/<class>/<image> (else TFDS)")
  p.add_argument("--torch-checkpoint", default=None, help="PyTorch state_dict (paper benchmarks)")
  p.add_argument("--max-train", type=int, default=None, help="evenly spaced training subset")
  p.add_argument("--max-test", type=int, default=None, help="evenly spaced test subset")
  p.add_argument("--ood-size", type=int, default=2000, help="images per offline OOD set")
  p.add_argument("--hparam", action="append", default=[],
                 help="SCORER.NAME=VALUE over the benchmark's settings (a JSON value), repeatable")
  p.add_argument("--ablation", action="store_true", help="also run LINe's ablation")
  p.add_argument("--no-plots", action="store_true", help="skip the PNGs")
  _cli.add_cache(p)
  _cli.add_common(p)
  _cli.add_distributed(p)
  return p


def main(argv: Sequence[str] | None = None) -> None:
  args = _parser().parse_args(argv)
  start = time.perf_counter()
  with _cli.user_errors():
    _cli.init_distributed(args)
    methods = None if args.scorers is None else _cli.scorer_names(args.scorers)
    result = run_evaluation(
        args.out, benchmark=args.benchmark, checkpoint=args.checkpoint,
        methods=methods, hparams=_cli.parse_hparams(args.hparam, methods or _scorers.names()),
        extra_ood=args.extra_ood, batch_size=args.batch_size, data_dir=args.data_dir,
        torch_checkpoint=args.torch_checkpoint, id_folder=args.id_folder,
        max_train=args.max_train, max_test=args.max_test, ood_size=args.ood_size,
        cache_dir=_cli.cache_dir(args), workers=args.workers, ablation=args.ablation,
        make_plots=not args.no_plots, progress=not args.quiet)
  if jax.process_index() == 0:
    print(format_table(result))
    if not args.quiet:
      print(f"wrote {args.out} in {time.perf_counter() - start:.1f} s", file=sys.stderr)


if __name__ == "__main__":
  main()
