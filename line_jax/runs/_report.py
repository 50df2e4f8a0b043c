"""What an evaluation writes: metrics.json, table.md, hparams, timings, plots,
every input's scores (`scores/<set>.csv`) and each scorer's threshold
(`thresholds.json`).

Each file is written whole or not at all (a temporary file, then
`os.replace`), into a folder that holds nothing else (`OWN_FILES`).
"""

from __future__ import annotations

from collections.abc import Mapping
import csv
import dataclasses
import os
from typing import Any

import jax
import numpy as np

from line_jax import _progress
from line_jax import calibration
from line_jax import plots
from line_jax.runs import _shared

# What evaluate (and its ablation) write in a folder: any other file there is
# the user's, and the folder is refused (`_shared.check_out`).
SCORES_DIR = "scores"  # `<set>.csv` each: one row per input (`write_scores`).
THRESHOLDS_FILE = "thresholds.json"
OWN_FILES = ("metrics.json", "hparams.json", "timings.json", "table.md", "roc.png",
             "hist_*.png", "ablation.json", "ablation.md", "ablation.png", SCORES_DIR,
             THRESHOLDS_FILE)
# The files that show an evaluation (or an ablation) wrote a folder.
OWN_MARKS = {"metrics.json": _shared.has_keys("id_accuracy", "methods"),
             "ablation.json": _shared.has_keys("settings", "variants")}


def format_table(result: Mapping[str, Any]) -> str:
  """Markdown table: methods as rows, OOD sets (then average) as columns.

  Each cell is `FPR95 / AUROC` in percent (lower / higher is better).
  """
  methods = result["methods"]
  sets = list(next(iter(methods.values())))
  header = "| method | " + " | ".join(sets) + " |"
  lines = [
      f"ID accuracy: {100 * result['id_accuracy']:.2f} %. "
      "Cells: FPR95 / AUROC in % (FPR95 lower is better, AUROC higher).",
      "",
      header,
      "|---|" + "---|" * len(sets),
  ]
  for method, rows in methods.items():
    cells = [f"{100 * rows[s]['fpr95']:.2f} / {100 * rows[s]['auroc']:.2f}" for s in sets]
    lines.append(f"| {method} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def timings(cached: Mapping[str, Any], fit_seconds: Mapping[str, Any],
            total_seconds: float) -> dict[str, Any]:
  """Feature extraction per set (images, seconds, images/s), fits, total.

  `fit_seconds` is `fit_and_score`'s: the one fold of every scorer
  (`fold_s`), then each scorer's finalize and scores.

  A set read back from the cache reports the time its extraction took in the
  run that wrote it (`"cached": true`); `extracted_now` counts the images
  this run put through the network, and `total_s` is this run's time.
  """
  sets = {name: {"images": len(c), "seconds": c.seconds,
                 "images_per_s": len(c) / c.seconds if c.seconds else None,
                 "cached": c.cached}
          for name, c in cached.items()}
  images = sum(s["images"] for s in sets.values())
  seconds = sum(s["seconds"] for s in sets.values())
  return {
      "device": f"{jax.devices()[0].platform} x {jax.device_count()}, {os.cpu_count()} CPU cores",
      "total_s": total_seconds,
      "extraction": {"images": images, "seconds": seconds,
                     "images_per_s": images / seconds if seconds else None,
                     "extracted_now": sum(s["images"] for s in sets.values() if not s["cached"]),
                     "sets": sets},
      **fit_seconds,
  }


def _jsonable(value: Any) -> Any:
  # A hyperparameter left for the fold to resolve (e.g. a TrainPercentile
  # default) is written as its fields under its class name.
  if dataclasses.is_dataclass(value) and not isinstance(value, type):
    return {type(value).__name__: dataclasses.asdict(value)}
  return repr(value)


def write_json(path: str, value: Any) -> None:
  """`value` as JSON, in its own key order; a hyperparameter left for the
  fold to resolve is written as its fields (`_jsonable`)."""
  _shared.write_json(path, value, sort_keys=False, default=_jsonable)


def write_scores(out_dir, scores: Mapping[str, Mapping[str, np.ndarray]],
                 rows: Mapping[str, Any], thresholds: Mapping[str, Mapping[str, Any]]
                 ) -> None:
  """`scores/<set>.csv` of each set in `rows` (`runs._benchmark.SetRows`):
  one line per input in the set's order, columns `index` (in its data set),
  `path` (empty for pixels), `label` (-1: none), then per scorer its score
  (float64, exact) and `<scorer>_ood`: 1 where it is out at the scorer's
  threshold (`thresholds`, `calibration.decide`), 0 where in, empty where
  none was set. Files of sets no longer evaluated are removed."""
  folder = os.path.join(os.fspath(out_dir), SCORES_DIR)
  os.makedirs(folder, exist_ok=True)
  header = ["index", "path", "label", *(c for n in scores for c in (n, f"{n}_ood"))]
  for set_name, r in rows.items():
    columns = [r.index.tolist(), r.paths or [""] * len(r.index), r.labels.tolist()]
    for name, by_set in scores.items():
      values = np.asarray(by_set[set_name], np.float64)
      threshold = thresholds[name].get("threshold")
      columns.append(values.tolist())
      columns.append([""] * values.size if threshold is None else
                     calibration.decide(values, threshold).astype(int).tolist())
    with _shared.atomic_file(os.path.join(folder, f"{set_name}.csv")) as tmp:
      with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(zip(*columns))
  for name in os.listdir(folder):
    if name.endswith(".csv") and name[:-len(".csv")] not in rows:
      os.remove(os.path.join(folder, name))


def write_outputs(out_dir, result, scores, used, timing=None, *, make_plots=True,
                  progress=True, rows=None, thresholds=None) -> None:
  """Writes metrics.json, hparams.json, table.md, timings.json, with `rows`
  and `thresholds` (`write_scores`) scores/ and thresholds.json, and
  (optionally) the PNGs into `out_dir`."""
  out_dir = os.fspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  files = {"metrics.json": result, "hparams.json": used}
  if timing is not None:
    files["timings.json"] = timing
  if thresholds is not None:
    files[THRESHOLDS_FILE] = thresholds
  for name, value in files.items():
    write_json(os.path.join(out_dir, name), value)
  if rows is not None:
    write_scores(out_dir, scores, rows, thresholds)
  _shared.write_text(os.path.join(out_dir, "table.md"), format_table(result))
  if not make_plots:
    return
  with _shared.atomic_file(os.path.join(out_dir, "roc.png")) as tmp:
    plots.plot_roc(scores, tmp)
  for method, _ in _progress.iterate(scores, "plots", enabled=progress):
    with _shared.atomic_file(os.path.join(out_dir, f"hist_{method}.png")) as tmp:
      plots.plot_histograms(method, scores[method], tmp)
