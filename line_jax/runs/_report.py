"""What an evaluation writes: metrics.json, table.md, hparams, timings, plots."""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
import os
from typing import Any

import jax

from line_jax import _progress
from line_jax import plots
from line_jax.runs import _shared


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


def write_outputs(out_dir, result, scores, used, timing=None, *, make_plots=True,
                  progress=True) -> None:
  """Writes metrics.json, hparams.json, table.md, timings.json and
  (optionally) the PNGs into `out_dir`."""
  out_dir = os.fspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  files = {"metrics.json": result, "hparams.json": used}
  if timing is not None:
    files["timings.json"] = timing
  for name, value in files.items():
    write_json(os.path.join(out_dir, name), value)
  with open(os.path.join(out_dir, "table.md"), "w") as f:
    f.write(format_table(result))
  if not make_plots:
    return
  plots.plot_roc(scores, os.path.join(out_dir, "roc.png"))
  for method, _ in _progress.iterate(scores, "plots", enabled=progress):
    plots.plot_histograms(method, scores[method], os.path.join(out_dir, f"hist_{method}.png"))
