"""One picture of line_jax's speed against PyTorch on one device, from committed results.

Reads `<results>/<device>/scorers.json` (`benchmarks.scorer_throughput`),
`network_passes.json` (`benchmarks.network_passes`) and
`predict_throughput.json` (`benchmarks.predict_throughput`), whichever exist,
and draws `speed.png` beside them:

* left, every scorer at every head shape and batch: line_jax's samples/s over
  PyTorch's, a grid coloured on a log scale around 1 (blue faster, red
  slower), the ratio written in each cell;
* right, networks (one batch of uint8 images to features) and
  `Detector.predict` (images to decisions) at each batch measured: bars of
  the same ratio, the line at 1x.

Nothing is measured here; rerun the benchmarks to refresh the numbers.

    python -m benchmarks.speed_chart [--results benchmarks/results/cpu]
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np


def _load(folder: str, stem: str) -> list[dict]:
  path = os.path.join(folder, f"{stem}.json")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return json.load(f)["records"]


def scorer_grid(records: list[dict]) -> tuple[list[str], list[str], np.ndarray]:
  """`(methods, columns, ratios [methods, columns])`: line_jax over torch
  samples/s per method and "classes x features, batch" column (NaN where a
  side is missing), in the records' order."""
  rates: dict[tuple, dict[str, float]] = {}
  methods, columns = [], []
  for r in records:
    column = f"{r['classes']}x{r['features']}\nb{r['batch']}"
    methods += [r["method"]] if r["method"] not in methods else []
    columns += [column] if column not in columns else []
    rates.setdefault((r["method"], column), {})[r["implementation"]] = r["samples_per_s"]
  grid = np.full((len(methods), len(columns)), np.nan)
  for (method, column), sides in rates.items():
    if "line_jax" in sides and "torch" in sides:
      grid[methods.index(method), columns.index(column)] = sides["line_jax"] / sides["torch"]
  return methods, columns, grid


def network_bars(passes: list[dict], predict: list[dict]) -> list[tuple[str, float]]:
  """`(label, ratio)` per network call and per predict batch, line_jax over PyTorch."""
  bars = [(f"{r['model']} b{r['batch']}: features", r["tuned_vs_torch"])
          for r in passes if "tuned_vs_torch" in r]
  for r in predict:
    if r.get("what") == "predict" and r.get("implementation") == "line_jax_predict":
      torch_rate = next((t["images_per_s"] for t in predict
                         if t.get("what") == "predict" and t.get("implementation") == "torch"
                         and t["model"] == r["model"] and t["batch"] == r["batch"]), None)
      if torch_rate:
        bars.append((f"{r['model']} b{r['batch']}: predict", r["images_per_s"] / torch_rate))
  return bars


def draw(folder: str, out: str | None = None) -> str:
  """Writes the chart of `folder`'s results to `out` (default `folder/speed.png`)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib.colors import LogNorm

  methods, columns, grid = scorer_grid(_load(folder, "scorers"))
  bars = network_bars(_load(folder, "network_passes"), _load(folder, "predict_throughput"))
  if not methods and not bars:
    raise ValueError(f"no scorers.json, network_passes.json or predict_throughput.json "
                     f"in {folder}")
  fig, (left, right) = plt.subplots(
      1, 2, figsize=(13, max(4.0, 0.27 * len(methods) + 1.5)),
      gridspec_kw={"width_ratios": [max(len(columns), 1), 4]})
  if methods:
    image = left.imshow(grid, cmap="RdBu", norm=LogNorm(vmin=0.25, vmax=4.0), aspect="auto")
    for (i, j), value in np.ndenumerate(grid):
      if np.isfinite(value):  # White on the darkest cells.
        left.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6.5,
                  color="white" if abs(np.log2(value)) > 1.2 else "black")
    left.set_xticks(range(len(columns)), columns, fontsize=7)
    left.set_yticks(range(len(methods)), methods, fontsize=7)
    left.set_title(f"scorers: line_jax / PyTorch samples/s ({np.sum(grid >= 1)} of "
                   f"{np.sum(np.isfinite(grid))} cells at 1x or more)", fontsize=9)
    bar = fig.colorbar(image, ax=left, fraction=0.04, pad=0.02)
    ticks = [0.25, 0.5, 1.0, 2.0, 4.0]
    bar.set_ticks(ticks, labels=[f"{t:g}x" for t in ticks])
    bar.minorticks_off()
  else:
    left.axis("off")
  if bars:
    labels, ratios = zip(*bars)
    colours = ["tab:blue" if r >= 1 else "tab:red" for r in ratios]
    right.barh(range(len(bars)), ratios, color=colours)
    right.axvline(1.0, color="black", linewidth=0.8)
    right.set_yticks(range(len(bars)), labels, fontsize=7)
    right.invert_yaxis()
    for i, r in enumerate(ratios):
      right.text(r, i, f" {r:.2f}x", va="center", fontsize=7)
    right.set_xlabel("line_jax / PyTorch images/s", fontsize=8)
    right.set_title("networks and Detector.predict", fontsize=9)
  else:
    right.axis("off")
  fig.tight_layout()
  out = out or os.path.join(folder, "speed.png")
  fig.savefig(out, dpi=110)
  plt.close(fig)
  return out


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--results", default=os.path.join("benchmarks", "results", "cpu"),
                      help="a device's results folder")
  args = parser.parse_args(argv)
  print(f"wrote {draw(args.results)}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
