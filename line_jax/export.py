"""Fit, calibrate and export a detector: `python -m line_jax.export`.

    python -m line_jax.export --out DET --dataset TRAIN_FOLDER --calibrate ID_FOLDER
    python -m line_jax.export --out DET --dataset train/ --calibrate held_out/ \
        --torch-checkpoint resnet18.pth --arch resnet18 --scorer line --tpr 0.95
    python -m line_jax.predict DET images/ --output decisions.csv

The scorer is fitted on --dataset, the threshold set on the held-out ID
images of --calibrate (keeping --tpr of them, or letting --fpr of
--calibrate-ood through), and DET written as StableHLO with a symbolic
batch size, weights and a manifest. A shell over `line_jax.runs.export`.
In Python, with jax and numpy alone: `line_jax.export.load(DET)(images)`
(uint8 [n, H, W, C]) -> `.score`, `.is_ood`, `.pred`.
"""

from __future__ import annotations

from collections.abc import Sequence
import sys

from line_jax._exported import Decisions
from line_jax._exported import ExportedDetector
from line_jax._exported import load

__all__ = ("Decisions", "ExportedDetector", "load", "main")


def _parser():
  # The CLI's imports stay here: `load` must not import model or scorer code.
  from line_jax import _cli  # pylint: disable=g-import-not-at-top
  from line_jax import detector  # pylint: disable=g-import-not-at-top
  from line_jax import scorers  # pylint: disable=g-import-not-at-top
  p = _cli.parser("python -m line_jax.export", __doc__)
  p.add_argument("--out", required=True, help="the exported detector's folder (must be new)")
  p.add_argument("--dataset", required=True, help=f"training images: {_cli.DATASET_HELP}")
  p.add_argument("--calibrate", required=True,
                 help="held-out in-distribution images (a folder, or as --dataset: its test split)")
  p.add_argument("--scorer", default="line", choices=scorers.names(), help="the OOD score")
  _cli.add_hparams(p, "the registry defaults")
  p.add_argument("--tpr", type=float, default=0.95, help="share of ID inputs kept")
  p.add_argument("--fpr", type=float, default=None,
                 help="share of --calibrate-ood inputs let through, instead of --tpr")
  p.add_argument("--calibrate-ood", default=None, help="validation OOD images (a folder)")
  p.add_argument("--confidence", type=float, default=0.95, help="of the interval reported")
  p.add_argument("--max-examples", type=int, default=None,
                 help=f"N training images: {_cli.SUBSET_RULE}")
  p.add_argument("--max-calibrate", type=int, default=None,
                 help=f"N calibration images: {_cli.SUBSET_RULE}")
  p.add_argument("--platforms", default=",".join(detector.EXPORT_PLATFORMS),
                 help="comma-separated platforms to lower for (cpu, cuda, rocm, tpu)")
  p.add_argument("--checkpoint", default=None, help="line_jax checkpoint (default: committed)")
  p.add_argument("--batch-size", type=int, default=256, help="images per network call")
  p.add_argument("--workers", type=int, default=None, help="decoding threads")
  _cli.add_network(p)
  _cli.add_common(p)
  return p


def main(argv: Sequence[str] | None = None) -> None:
  from line_jax import _cli  # pylint: disable=g-import-not-at-top
  from line_jax.runs import Runtime  # pylint: disable=g-import-not-at-top
  from line_jax.runs import export  # pylint: disable=g-import-not-at-top
  args = _parser().parse_args(argv)
  with _cli.user_errors():
    config = export.Config(
        dataset=args.dataset, calibrate=args.calibrate, network=_cli.network(args),
        scorer=args.scorer, hparams=_cli.parse_hparams(args.hparam, [args.scorer]).get(
            args.scorer, {}), tpr=args.tpr, fpr=args.fpr, calibrate_ood=args.calibrate_ood,
        confidence=args.confidence, max_examples=args.max_examples,
        max_calibrate=args.max_calibrate, batch_size=args.batch_size,
        platforms=tuple(p.strip() for p in args.platforms.split(",") if p.strip()))
    export.run(config, args.out, runtime=Runtime(workers=args.workers,
                                                 progress=not args.quiet))
  if not args.quiet:
    print(f"exported to {args.out}: python -m line_jax.predict {args.out} IMAGES... "
          "--output decisions.csv", file=sys.stderr)


if __name__ == "__main__":
  main()
