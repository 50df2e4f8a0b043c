"""Bad inputs that reach the fit command line get errors that name the problem.

The table in docs/bad_inputs.md lists every bad input and its error; the cases
tested elsewhere (line.fit's validation, scorers, checkpoints, OOD .npy files)
are referenced there, the command-line ones are here. Every case fails before
any batch is streamed, so each costs about a checkpoint load.
"""

import json
import os
import re
import shutil

import numpy as np
import pytest

from line_jax import fit
from line_jax import models
from line_jax import runs

COMMITTED = models.DEFAULT_CHECKPOINT
# After a failed restore, orbax's background event loop reports a callback on
# a closed loop at garbage collection; it is noise, not the error under test.
pytestmark = pytest.mark.filterwarnings(
    "ignore::pytest.PytestUnraisableExceptionWarning")


def _main(capsys, *argv):
  """Runs the CLI in this process; returns the message of its exit status 2."""
  with pytest.raises(SystemExit) as e:
    fit.main(list(argv))
  assert e.value.code == 2
  return capsys.readouterr().err


def _dataset(tmp_path, images, labels):
  folder = tmp_path / "data"
  folder.mkdir()
  np.save(folder / "images.npy", images)
  np.save(folder / "labels.npy", labels)
  return str(folder)


@pytest.mark.parametrize("images, labels, message", [
    (np.zeros((4, 28, 28), np.float32), np.zeros(4, np.int64),
     r"images.npy has dtype float32; expected uint8"),
    (np.zeros((4, 28), np.uint8), np.zeros(4, np.int64),
     r"images.npy has shape \(4, 28\); expected \[N, H, W\] or \[N, H, W, C\]"),
    (np.zeros((4, 28, 28), np.uint8), np.zeros(3, np.int64),
     r"labels.npy has shape \(3,\); expected \[4\]"),
    (np.zeros((4, 28, 28), np.uint8), np.zeros(4, np.float32),
     r"labels must be integers"),
    (np.zeros((4, 28, 28), np.uint8), np.full(4, 10),
     r"labels of .* must lie in \[0, 10\) for this model, got \[10, 10\]"),
])
def test_images_of_the_wrong_shape_or_dtype(tmp_path, capsys, images, labels, message):
  err = _main(capsys, "--out", str(tmp_path / "out"),
              "--dataset", _dataset(tmp_path, images, labels), "--scorers", "energy")
  assert re.search(message, err), err
  assert not (tmp_path / "out").exists()  # Nothing is claimed for a bad run.


def test_images_of_another_size_and_colour_are_converted_for_the_model(tmp_path):
  """The checkpoint decides size and channels: 40x36 RGB feeds the 28x28 gray model."""
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (6, 40, 36, 3), dtype=np.uint8)
  out = tmp_path / "out"
  fit.main(["--out", str(out), "--dataset", _dataset(tmp_path, images, np.arange(6) % 3),
            "--scorers", "react", "--batch-size", "4", "--quiet"])
  assert runs.fit.load_state(out, "react").kernel.shape == (128, 10)
  assert np.load(out / "features.npy").shape == (6, 128)


def test_object_array_dataset_is_refused_without_unpickling(tmp_path, capsys):
  folder = tmp_path / "data"
  folder.mkdir()
  with open(folder / "images.npy", "wb") as f:
    np.lib.format.write_array_header_1_0(
        f, {"descr": "|O", "fortran_order": False, "shape": (2,)})
  np.save(folder / "labels.npy", np.zeros(2, np.int64))
  err = _main(capsys, "--out", str(tmp_path / "out"), "--dataset", str(folder))
  assert "readable without pickle" in err


def test_missing_dataset_folder(tmp_path, capsys):
  err = _main(capsys, "--out", str(tmp_path / "out"), "--dataset", str(tmp_path / "none"))
  assert "is neither 'fashion_mnist', 'tfds:NAME', nor a folder" in err


def _copy_committed(tmp_path):
  dst = tmp_path / "ckpt"
  shutil.copytree(COMMITTED, dst)
  return dst


def test_truncated_checkpoint(tmp_path, capsys):
  ckpt = _copy_committed(tmp_path)
  files = [os.path.join(root, n) for root, _, names in os.walk(ckpt / "variables")
           for n in names]
  largest = max(files, key=os.path.getsize)
  with open(largest, "r+b") as f:
    f.truncate(os.path.getsize(largest) // 2)
  err = _main(capsys, "--out", str(tmp_path / "out"), "--checkpoint", str(ckpt))
  # Today tensorstore's own ValueError passes through load_model unchanged
  # (it names the file and the byte range); with the fix proposed for
  # _checkpoint.py it reads "corrupt or truncated checkpoint".
  assert str(ckpt / "variables") in err
  assert "corrupt or truncated checkpoint" in err


def test_corrupt_checkpoint_config(tmp_path, capsys):
  ckpt = _copy_committed(tmp_path)
  (ckpt / "config.json").write_text("{not json")
  assert "config.json is not valid JSON" in _main(
      capsys, "--out", str(tmp_path / "out"), "--checkpoint", str(ckpt))


@pytest.mark.parametrize("change, message", [
    ({"num_classes": 5}, r"\['fc'\]\['bias'\] has shape \(10,\) but the config's "
                         r"architecture needs \(5,\)"),
    ({"model": "resnet18_cifar", "input_shape": [32, 32, 3]}, "architecture"),
])
def test_checkpoint_for_another_architecture_or_class_count(tmp_path, capsys, change,
                                                            message):
  ckpt = _copy_committed(tmp_path)
  config = json.loads((ckpt / "config.json").read_text())
  (ckpt / "config.json").write_text(json.dumps({**config, **change}))
  err = _main(capsys, "--out", str(tmp_path / "out"), "--checkpoint", str(ckpt))
  assert re.search(message, err), err


@pytest.mark.parametrize("argv, message", [
    (["--scorers", "line,ebo"], "unknown scorer 'ebo'; registered: msp"),
    (["--scorers", "line,line"], "--scorers must list distinct scorers"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--save-every", "-1"], "--save-every must be at least 1"),
    (["--hparam", "knn.kk=3"], "unknown hyperparameter 'kk' for scorer 'knn'; valid: k,"),
    (["--hparam", "knn=3"], "--hparam expects SCORER.NAME=VALUE"),
    # Nothing is downloaded: an unprepared TFDS name is one line that says what to do.
    (["--dataset", "tfds:line_jax_no_such_set"],
     "TFDS dataset 'line_jax_no_such_set' (split 'train') is not prepared under"),
    (["--benchmark", "nope"], "invalid choice: 'nope'"),
])
def test_bad_arguments(tmp_path, capsys, argv, message):
  assert message in _main(capsys, "--out", str(tmp_path / "out"), *argv)


@pytest.mark.parametrize("hparam, message", [
    ("knn.k=0", "k must be at least 1, got 0"),
    # The committed model has 128 features: no residual space is left.
    ("vim.dim=128", "ViM's dim=128 must be below the feature count 128"),
])
def test_bad_hyperparameter_value_gets_the_scorers_own_error(tmp_path, capsys, hparam,
                                                             message):
  # Values are checked by the scorer's fold before any image is read.
  scorer = hparam.split(".")[0]
  err = _main(capsys, "--out", str(tmp_path / "out"), "--scorers", scorer,
              "--hparam", hparam, "--max-examples", "8", "--batch-size", "8")
  assert message in err


def test_load_state_of_a_corrupt_state(tmp_path):
  out = tmp_path / "out"
  fit.main(["--out", str(out), "--scorers", "energy", "--max-examples", "8",
            "--batch-size", "8"])
  assert runs.fit.load_state(out, "energy").kernel.shape == (128, 10)
  meta = json.loads((out / "energy" / "state.json").read_text())
  for root, _, names in os.walk(out / "energy" / "state"):
    for n in names:
      with open(os.path.join(root, n), "r+b") as f:
        f.truncate(0)
  with pytest.raises(ValueError, match="corrupt or truncated state"):
    runs.fit.load_state(out, "energy")
  meta["state"]["class"] = "os:system"
  (out / "energy" / "state.json").write_text(json.dumps(meta))
  # line_jax.state/2 names classes by bare name, looked up among the scorers' own.
  with pytest.raises(ValueError, match="unknown state class 'os:system'"):
    runs.fit.load_state(out, "energy")
  # line_jax.state/1 named them by module path: one outside line_jax is refused as such.
  (out / "energy" / "state.json").write_text(json.dumps({**meta, "format": "line_jax.state/1"}))
  with pytest.raises(ValueError, match="refuses to build 'os:system'"):
    runs.fit.load_state(out, "energy")
  meta["state"]["class"] = "line_jax.scorers:Evil"
  (out / "energy" / "state.json").write_text(json.dumps(meta))
  with pytest.raises(ValueError, match="unknown state class 'line_jax.scorers:Evil'"):
    runs.fit.load_state(out, "energy")


class _Payload:
  """An object whose unpickling would run code: it would create `marker`."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (open, (self.marker, "w"))


def test_torch_checkpoint_with_code_is_refused_without_running_it(tmp_path):
  torch = pytest.importorskip("torch")
  marker = tmp_path / "ran"
  path = tmp_path / "evil.pth"
  torch.save({"state_dict": {"w": torch.zeros(2)}, "extra": _Payload(str(marker))}, path)
  with pytest.raises(ValueError, match="cannot read PyTorch checkpoint .*evil.pth"):
    models.read_torch_state_dict(path)
  assert not marker.exists()


def test_checkpoint_without_normalisation(tmp_path, capsys):
  ckpt = _copy_committed(tmp_path)
  config = json.loads((ckpt / "config.json").read_text())
  del config["mean"]
  (ckpt / "config.json").write_text(json.dumps(config))
  err = _main(capsys, "--out", str(tmp_path / "out"), "--checkpoint", str(ckpt))
  assert "config.json has no 'mean' and 'std'" in err
  assert not (tmp_path / "out").exists()
