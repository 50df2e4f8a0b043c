"""Evaluates every registered OOD scorer on a benchmark: metrics, table, plots.

    python -m line_jax.evaluate --out DIR            # Fashion-MNIST, committed checkpoint
    python -m line_jax.evaluate --out DIR --extra-ood mine=my_images.npy
    python -m line_jax.evaluate --out DIR --benchmark cifar10 --id-folder cifar10
        --torch-checkpoint dice_densenet100_cifar10.pth.tar --ablation
    python -m line_jax.evaluate --out DIR --id-folder DIR --torch-checkpoint m.pth --arch resnet18

The network is `--checkpoint` or `--torch-checkpoint PATH --arch NAME` (a paper
benchmark's own: `--torch-checkpoint` alone). A shell over `line_jax.runs.evaluate` (its
files: metrics, each input's scores and decision) and, with `--ablation`, `runs.ablation`.
Features come from the cache `fit` and `tune` share; the scorers take the benchmark's
settings, `--hparam` over them. `--benchmark openood_cifar10` is `line_jax.openood`."""

from __future__ import annotations

from collections.abc import Sequence
import sys
import time

from line_jax import _cli
from line_jax import distributed
from line_jax import openood
from line_jax import suites
from line_jax.runs import BenchmarkData
from line_jax.runs import evaluate


def _parser():
  p = _cli.parser("python -m line_jax.evaluate", __doc__)
  p.add_argument("--out", required=True, help=f"output folder; {_cli.OUT_RULE}")
  p.add_argument("--benchmark", default="fashion_mnist", choices=[*suites.SUITES, *suites.OPENOOD],
                 help="the suite: data, model, OOD sets and settings (openood_cifar10 has "
                      "flags of its own: --benchmark openood_cifar10 --help)")
  _cli.add_data(p, scorers_default=None, scorers_help="default: all registered")
  p.add_argument("--extra-ood", action="append", default=[], metavar="NAME=PATH",
                 help="add an OOD set: a uint8 [N, H, W(, C)] .npy or an image folder; repeatable")
  p.add_argument("--data-dir", default=None, help="TFDS data and the paper's OOD sets")
  p.add_argument("--id-folder", default=None,
                 help="ID images as <folder>/{train,test}/<class>/<image> (else TFDS, or "
                      "Fashion-MNIST's files)")
  _cli.add_network(p)
  for split in ("train", "test"):
    p.add_argument(f"--max-{split}", type=int, default=None,
                   help=f"N {split} images: {_cli.SUBSET_RULE}")
  p.add_argument("--ood-size", type=int, default=2000, help="images per offline OOD set")
  _cli.add_hparams(p, "the benchmark's settings")
  p.add_argument("--ablation", action="store_true", help="also run LINe's ablation")
  p.add_argument("--no-plots", action="store_true", help="skip the PNGs")
  _cli.add_cache(p)
  _cli.add_common(p)
  _cli.add_distributed(p)
  return p


def main(argv: Sequence[str] | None = None) -> None:
  if _cli.benchmark_of(argv) in suites.OPENOOD:
    return openood.main(argv)
  args = _parser().parse_args(argv)
  start = time.perf_counter()
  with _cli.user_errors():
    _cli.init_distributed(args)
    names = _cli.scorer_names(args.scorers) if args.scorers else ()
    data = BenchmarkData(
        args.benchmark, **_cli.benchmark_network(args), data_dir=args.data_dir,
        id_folder=args.id_folder, max_train=args.max_train, max_test=args.max_test,
        ood_size=args.ood_size, extra_ood=tuple(args.extra_ood),
        batch_size=args.batch_size, skip_bad_images=args.skip_bad_images)
    config = evaluate.Config(data=data, scorers=tuple(names),
                             hparams=_cli.parse_hparams(args.hparam, names or None),
                             plots=not args.no_plots, ablation=args.ablation)
    result = evaluate.run(config, args.out, runtime=_cli.runtime(args))
  if distributed.is_primary():
    print(evaluate.format_table(result))
    if not args.quiet:
      print(f"wrote {args.out} in {time.perf_counter() - start:.1f} s", file=sys.stderr)


if __name__ == "__main__":
  main()
