"""Hyperparameter selection on held-out data, each grid in one vmapped call.

    python -m line_jax.tune --out tune.json
    python -m line_jax.tune --checkpoint CKPT --dataset FOLDER --methods line,knn
    python -m line_jax.tune --torch-checkpoint r18.pth --arch resnet18 --dataset FOLDER

Every scorer with a grid is fitted on the training images but `--val-size`
held out (every class in proportion, evenly spaced: `line_jax.data.hold_out`)
and scored on those and on a validation OOD set disjoint from every test
set; the best point (highest validation AUROC) is printed as `--hparam`
flags that paste into `fit` and `evaluate`. Features come from
the feature cache `fit` and `evaluate` share (`--cache-dir`). A shell over
`line_jax.runs.tune` (see there for the data and the grids).
"""

from __future__ import annotations

from collections.abc import Sequence

from line_jax import _cli
from line_jax.runs import tune


def _parser():
  p = _cli.parser("python -m line_jax.tune", __doc__)
  p.add_argument("--out", default=None,
                 help="JSON file for the results (replaced only if tune wrote it)")
  _cli.add_data(p, scorers_default=None, scorers_help="default: all with a grid")
  _cli.add_network(p)
  p.add_argument("--dataset", default="fashion_mnist", help=_cli.DATASET_HELP)
  p.add_argument("--val-size", type=int, default=5000,
                 help=f"training images held out as the ID validation set: {_cli.SUBSET_RULE}")
  p.add_argument("--ood-size", type=int, default=2000, help="validation OOD images")
  p.add_argument("--no-check", action="store_true", help="skip the Python-loop comparison")
  _cli.add_cache(p)
  _cli.add_common(p)
  return p


def main(argv: Sequence[str] | None = None) -> None:
  args = _parser().parse_args(argv)
  with _cli.user_errors():
    names = _cli.scorer_names(args.scorers) if args.scorers else ()
    config = tune.Config(scorers=tuple(names), checkpoint=args.checkpoint,
                         network=_cli.network(args), dataset=args.dataset, val_size=args.val_size,
                         ood_size=args.ood_size, check=not args.no_check,
                         batch_size=args.batch_size, skip_bad_images=args.skip_bad_images)
    results = tune.run(config, results_file=args.out, runtime=_cli.runtime(args))
  print(tune.format_table(results))


if __name__ == "__main__":
  main()
