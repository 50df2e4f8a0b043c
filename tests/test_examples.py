"""Every script in examples/ runs as a user would run it: a subprocess, defaults first.

Each is meant to finish in under a minute on a laptop CPU; the limit here is
looser because this machine's CPUs are shared.
"""

import os
import pathlib
import re
import subprocess
import sys

import pytest

# End to end, in subprocesses or at full scale: `-m 'not slow'` skips them.
pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
LIMIT_S = 180


def _run(script, *args, cwd=ROOT):
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  done = subprocess.run([sys.executable, str(EXAMPLES / script), *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=LIMIT_S)
  assert done.returncode == 0, done.stdout + done.stderr
  return done.stdout


def _aurocs(line):
  return [float(v) for v in re.findall(r" (\d\.\d{3})", line)]


def test_every_example_is_tested():
  tested = {"own_flax_model.py", "torchvision_checkpoint.py", "serving.py",
            "deploy_detector.py"}
  assert {p.name for p in EXAMPLES.glob("*.py")} == tested


def test_own_flax_model(tmp_path):
  fashion = pathlib.Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
  out = _run("own_flax_model.py", cwd=tmp_path)  # defaults, from outside the checkout
  if fashion.exists():
    assert "Fashion-MNIST not found" not in out
  assert re.search(r"features \(10000, 64\), head kernel \(64, 10\), train accuracy 0\.[6-9]",
                   out), out
  rows = {line.split()[0]: _aurocs(line) for line in out.splitlines() if "AUROC" in line}
  assert set(rows) == {"line", "energy"} and all(len(v) == 2 for v in rows.values())
  assert all(0.0 <= v <= 1.0 for v in rows["line"] + rows["energy"])
  assert max(rows["energy"]) > 0.6, out  # the trained network tells some OOD apart


def test_own_flax_model_on_random_data():
  out = _run("own_flax_model.py", "--random-data", "--steps", "60", "--train-size", "2000",
             "--test-size", "400", "--ood", "gaussian")
  assert "features (2000, 64)" in out
  energy = next(line for line in out.splitlines() if line.startswith("energy"))
  assert _aurocs(energy)[0] > 0.9, out  # learnt blocks vs gaussian noise


def test_torchvision_checkpoint():
  pytest.importorskip("torch")
  out = _run("torchvision_checkpoint.py")
  assert "imported a random torchvision ResNet-18: 11,181,642 parameters" in out
  difference, scale = map(float, re.search(
      r"max difference (\S+) \(scale (\S+)\)", out).groups())
  assert difference <= 1e-4 * scale, out
  auroc = re.search(r"^AUROC (.*)$", out, re.M).group(1)
  assert len(_aurocs(auroc)) == 4 and "react/gaussian" in auroc


def test_torchvision_checkpoint_from_a_file(tmp_path):
  torch = pytest.importorskip("torch")
  sys.path.insert(0, str(EXAMPLES))
  try:
    import torchvision_checkpoint  # pylint: disable=g-import-not-at-top
  finally:
    sys.path.remove(str(EXAMPLES))
  path = tmp_path / "r18.pth"
  torchvision_checkpoint.random_checkpoint(str(path), num_classes=7, seed=3)
  assert len(torch.load(path, weights_only=True)) == 122  # torchvision's resnet18 keys
  out = _run("torchvision_checkpoint.py", "--checkpoint", str(path), "--num-classes", "7",
             "--size", "64")
  assert f"imported {path}" in out and "AUROC energy/textures" in out


def test_serving():
  out = _run("serving.py")
  assert "loaded state scores identically to the fitted one" in out
  served = re.search(r"served 300 requests of 1\.\.300 rows \(45,150 rows\) .* with (\d+) "
                     r"compilations", out)
  assert served, out
  assert 1 <= int(served.group(1)) <= 7  # buckets 8, 16, ..., 512: 7, not 300


def test_serving_a_saved_state_of_another_scorer(tmp_path):
  import numpy as np  # pylint: disable=g-import-not-at-top
  import line_jax  # pylint: disable=g-import-not-at-top
  from line_jax import scorers  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  features = np.abs(rng.normal(size=(200, 16))).astype(np.float32)
  kernel = rng.normal(size=(16, 4)).astype(np.float32)
  state = scorers.get("knn").fit(features, None, kernel, None, k=5)
  line_jax.save(tmp_path / "knn", state)
  out = _run("serving.py", "--state", str(tmp_path / "knn"), "--method", "knn",
             "--num-features", "16", "--max-batch", "40")
  assert "loaded KnnState" in out
  assert "served 40 requests of 1..40 rows (820 rows)" in out


def test_deploy_detector(tmp_path):
  out = _run("deploy_detector.py", cwd=tmp_path)  # Fashion-MNIST folders made by the script
  flagged = {line.split(":")[0].strip(): float(re.search(r"([\d.]+)% flagged", line).group(1))
             for line in out.splitlines() if "flagged out-of-distribution" in line}
  assert set(flagged) == {"digits", "fmnist"}, out
  assert flagged["digits"] > 90 and flagged["fmnist"] < 12, out  # calibrated at 95 % TPR
  assert re.search(r"keeps 95\.0% of 1000 held-out ID images", out), out
