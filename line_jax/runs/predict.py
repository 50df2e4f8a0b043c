"""Decisions for image files: one row per input, unreadable ones kept.

    rows = predict.run("det/", predict.image_paths(["photos/", "one.jpg"]))
    predict.write(rows, "decisions.csv")            # or .jsonl

What `python -m line_jax.predict` runs. `det/` is an export
(`line_jax.export.load`) or a saved `Detector`; files are decoded by the
grain pipeline as the detector's manifest says (Pillow, resize, center
crop), and an image that cannot be decoded keeps its row with the error.
"""

from __future__ import annotations

from collections.abc import Sequence
import csv
import json
import os

from line_jax import _exported
from line_jax import _progress
from line_jax import data
from line_jax.runs._shared import atomic_file

COLUMNS = ("path", "score", "is_ood", "pred", "error")


def image_paths(inputs: Sequence[str]) -> list[str]:
  """The image files `inputs` name: files as given, folders searched (sorted).

  Raises:
    FileNotFoundError: an input that is neither a file nor a folder.
    ValueError: a folder holding no image.
  """
  paths = []
  for item in inputs:
    if os.path.isdir(item):
      paths.extend(data.ImageFolderSource(item, flat=True).paths)
    elif os.path.isfile(item):
      paths.append(item)
    else:
      raise FileNotFoundError(f"input {item}: no such file or folder")
  return paths


def decider(folder: str):
  """`(decide(images) -> Decisions, data.Preprocess)` of an exported or saved detector."""
  if os.path.isfile(os.path.join(folder, _exported.MANIFEST)):
    exported = _exported.load(folder)
    spec = exported.manifest["input"]
    return exported, data.Preprocess(spec["height"], spec.get("resize_size"), spec["channels"])
  from line_jax.detector import Detector  # pylint: disable=g-import-not-at-top
  detector = Detector.load(folder)
  return detector.predict, detector.backbone.preprocess


def run(folder: str, paths: Sequence[str], *, batch_size: int = 64,
        workers: int | None = None, progress: bool = True) -> list[dict]:
  """One row per path (`COLUMNS`), in order; an unreadable image's row carries `error`."""
  decide, preprocess = decider(folder)
  records = [(path, data.NO_LABEL) for path in paths]
  batches = data.image_batches(records, preprocess, batch_size=max(1, min(batch_size,
                                                                         len(records))),
                               workers=workers, skip_bad_images=True)
  outputs = []
  with _progress.counting(len(records), "predict", enabled=progress) as on_batch:
    for images, _ in batches:
      out = decide(images)
      outputs.extend(zip(out.score.tolist(), out.is_ood.tolist(), out.pred.tolist()))
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
  if not output.endswith((".csv", ".jsonl")):
    raise ValueError(f"--output must end in .csv or .jsonl, got {output}")
  with atomic_file(output, unique=True) as tmp, open(tmp, "w", newline="") as f:
    if output.endswith(".jsonl"):
      for row in rows:
        f.write(json.dumps(row) + "\n")
    else:
      writer = csv.DictWriter(f, COLUMNS)
      writer.writeheader()
      writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
