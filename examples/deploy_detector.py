"""From folders of images to an exported detector and its decisions.

    python examples/deploy_detector.py                 # Fashion-MNIST folders made here
    python examples/deploy_detector.py --train TRAIN/ --calibrate HELD_OUT/ --inputs NEW/ \
        --torch-checkpoint resnet18.pth --arch resnet18

Without folders, Fashion-MNIST images (Debian's `dataset-fashion-mnist`) are
written as PNGs: `train/<class>/`, a held-out `calibrate/`, and `inputs/`
holding fresh Fashion-MNIST images and handwritten digits (out of
distribution). Then the two commands a user runs:

    python -m line_jax.export --out DET --dataset train/ --calibrate calibrate/
    python -m line_jax.predict DET inputs/ --output decisions.csv

(called in this process through their `main`), and the share of each kind of
input flagged. Under a minute on a laptop CPU.
"""

from __future__ import annotations

import argparse
import csv
import os
import tempfile
import time

import numpy as np
from PIL import Image

from line_jax import data
from line_jax import export
from line_jax import predict


def write_folders(root: str, train: int = 3000, held_out: int = 1000, fresh: int = 500) -> None:
  """Fashion-MNIST PNGs: `train/<class>/`, `calibrate/`, `inputs/{fmnist,digits}_*.png`."""
  train_set = data.subset_of(data.open_source("fashion_mnist", "train"), train)
  test_set = data.subset_of(data.open_source("fashion_mnist", "test"), held_out + fresh)
  prep = data.Preprocess(28, None, 1)
  for i in range(len(train_set)):
    image, label = prep(train_set[i])
    _save(image, os.path.join(root, "train", data.FASHION_MNIST_CLASSES[label]), f"{i:05d}")
  for i in range(len(test_set)):
    image, _ = prep(test_set[i])
    folder, name = (("calibrate", f"{i:05d}") if i < held_out
                    else ("inputs", f"fmnist_{i:05d}"))
    _save(image, os.path.join(root, folder), name)
  for i, image in enumerate(data.ood_set("digits", fresh)):
    _save(image, os.path.join(root, "inputs"), f"digits_{i:05d}")


def _save(image: np.ndarray, folder: str, name: str) -> None:
  os.makedirs(folder, exist_ok=True)
  Image.fromarray(np.asarray(image, np.uint8).reshape(image.shape[:2])).save(
      os.path.join(folder, f"{name}.png"))


def main(argv=None) -> dict[str, float]:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--train", help="training images in class folders (default: made here)")
  p.add_argument("--calibrate", help="held-out in-distribution images")
  p.add_argument("--inputs", help="images to decide on")
  p.add_argument("--torch-checkpoint", help="a PyTorch state_dict (with --arch)")
  p.add_argument("--arch", help="its network, e.g. resnet18")
  p.add_argument("--scorer", default="line")
  args = p.parse_args(argv)
  start = time.perf_counter()
  with tempfile.TemporaryDirectory() as tmp:
    if not args.train:
      write_folders(tmp)
      args.train, args.calibrate, args.inputs = (os.path.join(tmp, k)
                                                 for k in ("train", "calibrate", "inputs"))
      print(f"wrote Fashion-MNIST folders under {tmp}")
    det, table = os.path.join(tmp, "detector"), os.path.join(tmp, "decisions.csv")
    network = (["--torch-checkpoint", args.torch_checkpoint, "--arch", args.arch]
               if args.torch_checkpoint else [])
    export.main(["--out", det, "--dataset", args.train, "--calibrate", args.calibrate,
                 "--scorer", args.scorer, "--platforms", "cpu", "--quiet", *network])
    loaded = export.load(det)
    print(f"exported {loaded}")
    print(loaded.manifest["calibration"] and
          "calibrated: " + _summary(loaded.manifest["calibration"]))
    try:
      predict.main([det, args.inputs, "--output", table, "--quiet"])
    except SystemExit as e:  # Exit 1: some input could not be read (listed on stderr).
      if e.code:
        print("some inputs could not be read; their rows carry the error")
    with open(table) as f:
      rows = list(csv.DictReader(f))
  flagged = {}
  for kind in sorted({os.path.basename(r["path"]).split("_")[0] for r in rows}):
    mine = [r for r in rows if os.path.basename(r["path"]).startswith(kind) and not r["error"]]
    flagged[kind] = float(np.mean([r["is_ood"] == "True" for r in mine]))
    print(f"{kind:>8}: {len(mine)} inputs, {flagged[kind]:.1%} flagged out-of-distribution")
  print(f"first rows: {[(os.path.basename(r['path']), r['score'][:6], r['is_ood'], r['pred']) for r in rows[:2]]}")
  print(f"done in {time.perf_counter() - start:.1f} s")
  return flagged


def _summary(cal: dict) -> str:
  low, high = cal["interval"]
  return (f"threshold {cal['threshold']:.4g} keeps {cal['achieved']:.1%} of "
          f"{cal['count']} held-out ID images (95 % interval {low:.1%}-{high:.1%})")


if __name__ == "__main__":
  main()
