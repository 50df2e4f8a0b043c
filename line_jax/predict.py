"""Decisions for image files with an exported detector: `python -m line_jax.predict`.

    python -m line_jax.predict DET photo.jpg more_images/ --output decisions.csv
    python -m line_jax.predict DET images/ --output decisions.jsonl

DET is a folder `python -m line_jax.export` (or `Detector.export`) wrote, or
one `Detector.save` wrote. Every INPUT (an image file, or a folder searched
recursively) gets one row: `path`, `score` (higher = more in-distribution),
`is_ood`, `pred` (the classifier's class), `error`. An input that cannot be
read keeps its row, with the error and no score, is listed on stderr, and
the command exits 1: nothing is dropped silently. A shell over
`line_jax.runs.predict`.
"""

from __future__ import annotations

from collections.abc import Sequence
import sys

from line_jax import _cli
from line_jax.runs import predict


def _parser():
  p = _cli.parser("python -m line_jax.predict", __doc__)
  p.add_argument("detector", help="an exported (or saved) detector folder")
  p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders")
  p.add_argument("--output", required=True, help="FILE.csv or FILE.jsonl")
  p.add_argument("--batch-size", type=int, default=64, help="images per call")
  p.add_argument("--workers", type=int, default=None, help="decoding threads")
  _cli.add_common(p)
  return p


def main(argv: Sequence[str] | None = None) -> None:
  args = _parser().parse_args(argv)
  with _cli.user_errors():
    if not args.output.endswith((".csv", ".jsonl")):
      raise ValueError(f"--output must end in .csv or .jsonl, got {args.output}")
    paths = predict.image_paths(args.inputs)
    rows = predict.run(args.detector, paths, batch_size=args.batch_size,
                       workers=args.workers, progress=not args.quiet)
    predict.write(rows, args.output)
  bad = [row for row in rows if row["error"]]
  if not args.quiet or bad:
    flagged = sum(bool(row["is_ood"]) for row in rows if not row["error"])
    print(f"wrote {len(rows)} rows to {args.output}: {flagged} out-of-distribution",
          file=sys.stderr)
  if bad:
    print(f"{len(bad)} input(s) could not be read (rows kept with their error):\n"
          + "\n".join(f"  {row['path']}: {row['error']}" for row in bad), file=sys.stderr)
    raise SystemExit(1)


if __name__ == "__main__":
  main()
