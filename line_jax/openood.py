"""OpenOOD v1.5's protocol on an OpenOOD-layout folder, offline.

    python -m line_jax.evaluate --benchmark openood_cifar10 --data-dir images_classic
        --torch-checkpoint dice_densenet100_cifar10.pth.tar --partial-sets --out DIR
    python -m line_jax.evaluate --benchmark openood_cifar10 --data-dir DIR
        --checkpoint my_line_jax_checkpoint --near mine=my_images/ --out DIR

`--data-dir` is OpenOOD's `images_classic/` root with its `benchmark_imglist/`
beside the image folders. Every scorer is fitted on `train_cifar10`, tuned on
`val_cifar10` vs `val_tin` (OpenOOD's search, best AUROC) and evaluated on
`test_cifar10` against near-OOD (CIFAR-100, TinyImageNet) and far-OOD
(MNIST, SVHN, Textures, Places365); a set absent entirely is skipped and
named, one absent in part needs `--partial-sets`. `python -m line_jax.evaluate
--benchmark openood_cifar10` is this command. A shell over
`line_jax.runs.openood`.
"""

from __future__ import annotations

from collections.abc import Sequence
import sys
import time

from line_jax import _cli
from line_jax import distributed
from line_jax import suites
from line_jax.runs import openood


def _parser():
  p = _cli.parser("python -m line_jax.evaluate --benchmark openood_cifar10", __doc__)
  p.add_argument("--out", required=True, help=f"output folder; {_cli.OUT_RULE}")
  p.add_argument("--benchmark", default="openood_cifar10", choices=list(suites.OPENOOD))
  p.add_argument("--data-dir", required=True,
                 help="OpenOOD's images_classic/ root, holding benchmark_imglist/")
  _cli.add_data(p, scorers_default=None, scorers_help="default: all registered")
  p.set_defaults(checkpoint=None)  # The network is named: no default one.
  p.add_argument("--torch-checkpoint", default=None, help="PyTorch state_dict of --arch")
  _cli.add_openood(p)
  _cli.add_hparams(p, "the untuned settings")
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
    names = _cli.scorer_names(args.scorers) if args.scorers else ()
    config = openood.Config(
        args.data_dir, args.benchmark, torch_checkpoint=args.torch_checkpoint,
        arch=args.arch, normalization=args.normalization, checkpoint=args.checkpoint,
        partial_sets=args.partial_sets, near=tuple(args.near), far=tuple(args.far),
        scorers=tuple(names), hparams=_cli.parse_hparams(args.hparam, names or None),
        tune=not args.no_tune, ablation=args.ablation, plots=not args.no_plots,
        batch_size=args.batch_size, skip_bad_images=args.skip_bad_images)
    result = openood.run(config, args.out, runtime=_cli.runtime(args))
  if distributed.is_primary():
    print(openood.format_table(result))
    if not args.quiet:
      print(f"wrote {args.out} in {time.perf_counter() - start:.1f} s", file=sys.stderr)


if __name__ == "__main__":
  main()
