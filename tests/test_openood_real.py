"""OpenOOD v1.5's CIFAR-10 protocol on fixed small subsets of the real files.

`../shared/data` is laid out as OpenOOD's `images_classic/` with its lists
(see ../shared/data/README.md); skipped where it is absent. The subset is a
folder written here: every list of `benchmark_imglist/cifar10/` cut to evenly
spaced lines (the lists are in class order), beside links to the real image
folders, so the run reads OpenOOD's own paths. MNIST's list keeps its train
entries, which are absent here: the run needs `--partial-sets` and says so.
"""

import json
import os
import pathlib

import numpy as np
import pytest

from line_jax import evaluate

SHARED = pathlib.Path(__file__).resolve().parents[1].parent / "shared"
DATA = SHARED / "data"
WEIGHTS = SHARED / "weights" / "dice_densenet100_cifar10.pth.tar"
LINES = {"train_cifar10": 300, "val_cifar10": 100, "test_cifar10": 200, "test_tin": 100,
         "val_tin": 100, "test_mnist": 280}

pytestmark = pytest.mark.slow


def _require():
  for path in (DATA / "benchmark_imglist" / "cifar10", DATA / "cifar10", DATA / "tin",
               DATA / "mnist", WEIGHTS):
    if not path.exists():
      pytest.skip(f"{path} is absent: the real OpenOOD-layout data and the DICE weights "
                  "live in ../shared next to the repository (see ../shared/data/README.md)")


def _subset_layout(root: pathlib.Path) -> dict[str, tuple[int, int]]:
  """Writes the subset folder; `{list: (listed, present)}` of the cut lists."""
  lists = root / "benchmark_imglist" / "cifar10"
  lists.mkdir(parents=True)
  for folder in ("cifar10", "tin", "mnist"):
    os.symlink(DATA / folder, root / folder)
  counts = {}
  for path in sorted((DATA / "benchmark_imglist" / "cifar10").glob("*.txt")):
    lines = path.read_text().splitlines()
    keep = LINES.get(path.stem, 2)  # The absent sets: two lines, enough to name them.
    lines = [lines[i] for i in np.linspace(0, len(lines) - 1, keep).astype(int)]
    (lists / path.name).write_text("\n".join(lines) + "\n")
    present = sum((DATA / line.split(" ", 1)[0]).is_file() for line in lines)
    counts[path.stem] = (len(lines), present)
  return counts


def test_protocol_on_real_files(tmp_path, capsys):
  _require()
  counts = _subset_layout(tmp_path / "data")
  assert 0 < counts["test_mnist"][1] < counts["test_mnist"][0]  # MNIST test only, here.
  out = tmp_path / "out"
  evaluate.main(["--benchmark", "openood_cifar10", "--data-dir", str(tmp_path / "data"),
                 "--torch-checkpoint", str(WEIGHTS), "--partial-sets", "--out", str(out),
                 "--scorers", "energy,react,line", "--batch-size", "100", "--quiet",
                 "--ablation"])
  err = capsys.readouterr().err
  listed, present = counts["test_mnist"]
  assert f"mnist: {present:,} of {listed:,} listed images (test_mnist.txt)" in err
  result = json.loads((out / "metrics.json").read_text())
  assert result["model"] == {"torch_checkpoint": str(WEIGHTS), "arch": "densenet100",
                             "normalization": "cifar_line"}
  assert result["settings"] == "cifar10"
  assert {n: (c["listed"], c["used"]) for n, c in result["sets"].items()} == {
      "train": counts["train_cifar10"], "val_id": counts["val_cifar10"],
      "id": counts["test_cifar10"], "tin": counts["test_tin"],
      "mnist": counts["test_mnist"], "val_ood:tin": counts["val_tin"]}
  assert set(result["absent"]) == {"cifar100", "svhn", "texture", "places365"}
  # 82.3 % on all 10,000 test images of the JPEG copy; the band is about
  # 3 binomial standard deviations at n = 200.
  assert 0.74 <= result["id_accuracy"] <= 0.91
  line = result["methods"]["line"]
  assert line["near"] == line["tin"] and line["far"] == line["mnist"]
  # The paper's settings (p_w = p_a = 90, clip = 1.0) reach the untuned row.
  assert result["hparams"]["untuned"]["line"] == {"p_w": 90.0, "p_a": 90.0, "clip": 1.0}
  for rows in (result["methods"], result["tuned"]):
    for group in ("near", "far"):
      assert 0.6 < rows["line"][group]["auroc"] <= 1.0
  assert result["selection"]["line"]["selected_on"]["ood"] == ["val_tin.txt"]
  ablation = json.loads((out / "ablation.json").read_text())
  assert set(ablation) == {"untuned", "tuned"}
  assert ablation["untuned"]["variants"]["LINe (all)"]["metrics"]["near"] == pytest.approx(
      line["near"], abs=1e-9)
