"""Fit every scorer on a training set, streaming and resumable: `python -m line_jax.fit`.

    python -m line_jax.fit --out fits/fmnist                 # all scorers
    python -m line_jax.fit --out DIR --dataset path/to/imagefolder --scorers line,knn
    python -m line_jax.fit --out DIR --dataset FOLDER --torch-checkpoint r18.pth --arch resnet18

Images stream through a network (a line_jax `--checkpoint`, whose config
decides the size and channels, or a PyTorch `--torch-checkpoint` of any
`--arch` the import supports) and every scorer folds over the one stream. `DIR/<scorer>`
holds each state (`line_jax.load`), `DIR/hparams.json` the settings each ran
with, resolved: registry defaults, then `--benchmark`'s, then `--hparam`'s,
the rule `evaluate` follows too. Killed and run again with the same
arguments, a run resumes to bit-identical states. Where the feature cache
(`--cache-dir`) holds the network's features of the data set, it does not
run at all. Multi-host: the same command in every process, with
`--coordinator HOST:PORT --num-processes N --process-id I` (or `auto`).
A shell over `line_jax.runs.fit`.
"""

from __future__ import annotations

from collections.abc import Sequence
import os
import sys

from line_jax import _cli
from line_jax import suites
from line_jax.runs import fit


def _parser():
  p = _cli.parser("python -m line_jax.fit", __doc__)
  p.add_argument("--out", required=True,
                 help=f"output folder, resumed if present; {_cli.OUT_RULE}")
  p.add_argument("--dataset", default="fashion_mnist", help=_cli.DATASET_HELP)
  _cli.add_data(p, scorers_default=None, scorers_help="default: all registered")
  _cli.add_network(p)
  p.add_argument("--benchmark", default=None, choices=[*suites.SUITES, suites.NO_BENCHMARK],
                 help="whose settings the scorers take, as evaluate's --benchmark (default: "
                      "fashion_mnist for the committed checkpoint on --dataset fashion_mnist, "
                      "else none: the registry's)")
  _cli.add_hparams(p, "the benchmark's settings")
  p.add_argument("--save-every", type=int, default=20, help="batches between saves")
  p.add_argument("--max-examples", type=int, default=None,
                 help=f"only N images: {_cli.SUBSET_RULE}")
  _cli.add_cache(p)
  _cli.add_common(p)
  _cli.add_distributed(p)
  return p


def main(argv: Sequence[str] | None = None) -> None:
  args = _parser().parse_args(argv)
  with _cli.user_errors(resumable=True):
    _cli.init_distributed(args)
    names = _cli.scorer_names(args.scorers) if args.scorers else ()
    config = fit.Config(
        checkpoint=args.checkpoint, network=_cli.network(args), dataset=args.dataset,
        scorers=tuple(names), benchmark=args.benchmark,
        hparams=_cli.parse_hparams(args.hparam, names or None),
        batch_size=args.batch_size, save_every=args.save_every,
        max_examples=args.max_examples, skip_bad_images=args.skip_bad_images)
    states = fit.run(config, args.out, runtime=_cli.runtime(args))
  if not args.quiet:
    print(f"wrote {', '.join(states)} to {os.path.abspath(args.out)}", file=sys.stderr)


if __name__ == "__main__":
  main()
