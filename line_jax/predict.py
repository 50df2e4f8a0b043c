"""Decisions for image files with an exported detector: `python -m line_jax.predict`.

    python -m line_jax.predict DET photo.jpg more_images/ --output decisions.csv
    python -m line_jax.predict DET images/ --output decisions.jsonl

DET is a folder `python -m line_jax.export` (or `Detector.export`) wrote, or
one `Detector.save` wrote. Every INPUT (an image file, or a folder searched
recursively) gets one row: `path`, `score` (higher = more in-distribution),
`is_ood`, `pred` (the classifier's class), `error`. An input that cannot be
read keeps its row, with the error and no score, is listed on stderr, and
the command exits 1: nothing is dropped silently.
"""

from __future__ import annotations

from collections.abc import Sequence
import csv
import json
import os
import sys

from line_jax import _cli
from line_jax import _exported
from line_jax import data
from line_jax.runs._shared import atomic_file

COLUMNS = ("path", "score", "is_ood", "pred", "error")


def _parser():
  p = _cli.parser("python -m line_jax.predict", __doc__)
  p.add_argument("detector", help="an exported (or saved) detector folder")
  p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders")
  p.add_argument("--output", required=True, help="FILE.csv or FILE.jsonl")
  p.add_argument("--batch-size", type=int, default=64, help="images per call")
  p.add_argument("--workers", type=int, default=None, help="decoding threads")
  _cli.add_common(p)
  return p


def image_paths(inputs: Sequence[str]) -> list[str]:
  """The image files `inputs` name: files as given, folders searched (sorted)."""
  paths = []
  for item in inputs:
    if os.path.isdir(item):
      found = data.ImageFolderSource(item, flat=True).paths
      paths.extend(found)
    elif os.path.isfile(item):
      paths.append(item)
    else:
      raise FileNotFoundError(f"input {item}: no such file or folder")
  return paths


def _decider(folder: str):
  """`(decide(images) -> Decisions, data.Preprocess)` of an exported or saved detector."""
  if os.path.isfile(os.path.join(folder, _exported.MANIFEST)):
    exported = _exported.load(folder)
    spec = exported.manifest["input"]
    return exported, data.Preprocess(spec["height"], spec.get("resize_size"), spec["channels"])
  from line_jax.detector import Detector  # pylint: disable=g-import-not-at-top
  detector = Detector.load(folder)
  return detector.predict, detector.backbone.preprocess


def predict(folder: str, paths: Sequence[str], *, batch_size: int = 64,
            workers: int | None = None, progress: bool = True) -> list[dict]:
  """One row per path (`COLUMNS`), in order; unreadable images carry `error`."""
  decide, preprocess = _decider(folder)
  records = [(path, data.NO_LABEL) for path in paths]
  batches = data.image_batches(records, preprocess, batch_size=max(1, min(batch_size,
                                                                         len(records))),
                               workers=workers, skip_bad_images=True)
  from line_jax import _progress  # pylint: disable=g-import-not-at-top
  outputs = []
  with _progress.counting(len(records), "predict", enabled=progress) as on_batch:
    for images, _ in batches:
      out = decide(images)
      outputs.extend(zip(*(out.score.tolist(), out.is_ood.tolist(), out.pred.tolist())))
      on_batch(len(images))
    on_batch(len(batches.skipped))  # Read, if not decoded: the bar ends at the total.
  errors = {s.index: s.error for s in batches.skipped}
  rows, kept = [], iter(outputs)
  for index, path in enumerate(paths):
    if index in errors:
      rows.append({"path": path, "score": None, "is_ood": None, "pred": None,
                   "error": errors[index]})
    else:
      score, is_ood, pred = next(kept)
      rows.append({"path": path, "score": score, "is_ood": is_ood, "pred": pred, "error": None})
  return rows


def write(rows: Sequence[dict], output: str) -> None:
  """`rows` as CSV or JSON lines (by `output`'s extension), atomically."""
  with atomic_file(output, unique=True) as tmp, open(tmp, "w", newline="") as f:
    if output.endswith(".jsonl"):
      for row in rows:
        f.write(json.dumps(row) + "\n")
    else:
      writer = csv.DictWriter(f, COLUMNS)
      writer.writeheader()
      writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)


def main(argv: Sequence[str] | None = None) -> None:
  args = _parser().parse_args(argv)
  with _cli.user_errors():
    if not args.output.endswith((".csv", ".jsonl")):
      raise ValueError(f"--output must end in .csv or .jsonl, got {args.output}")
    paths = image_paths(args.inputs)
    if not paths:
      raise ValueError(f"no image under {', '.join(args.inputs)}")
    rows = predict(args.detector, paths, batch_size=args.batch_size, workers=args.workers,
                   progress=not args.quiet)
    write(rows, args.output)
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
