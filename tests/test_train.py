"""Training determinism and progress, and checkpoint round trips and errors."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from line_jax import _checkpoint
from line_jax import train as train_lib

# A 4-wide resnet_small keeps every test to a few seconds on a CPU.
TINY = dict(model="resnet_small", num_classes=3, batch_size=16, epochs=1,
            model_kwargs={"num_filters": 4})


def tiny_data(n=64, seed=0):
  """Three classes told apart by which band of rows is bright.

  Rows, not columns: a horizontal flip must not turn one class into another.
  """
  rng = np.random.default_rng(seed)
  labels = (np.arange(n) % 3).astype(np.int32)
  images = rng.integers(0, 60, size=(n, 28, 28), dtype=np.uint8)
  for i, y in enumerate(labels):
    images[i, 2 + 8 * y:10 + 8 * y] += 180
  return images, labels


def run(seed=0, steps=2, **overrides):
  config = train_lib.TrainConfig(**{**TINY, "seed": seed, **overrides})
  images, labels = tiny_data()
  return train_lib.train(config, images, labels, images[:20], labels[:20],
                         max_steps=steps, progress=False)


def assert_trees_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)
  assert jax.tree.structure(a) == jax.tree.structure(b)


def test_same_seed_is_bit_identical_and_other_seed_differs():
  a, metrics_a = run(seed=0)
  b, metrics_b = run(seed=0)
  c, _ = run(seed=1)
  assert_trees_equal(a, b)
  assert metrics_a["losses"] == metrics_b["losses"]
  diff = jax.tree.leaves(jax.tree.map(
      lambda x, y: bool(np.any(x != y)), a["params"], c["params"]))
  assert all(diff)


def test_loss_decreases_on_a_separable_problem():
  _, metrics = run(steps=20, epochs=5, lr=1e-2)
  losses = metrics["losses"]
  assert len(losses) == 20 and metrics["steps"] == 20
  assert np.mean(losses[-4:]) < 0.6 * np.mean(losses[:4]), losses
  assert 0.0 <= metrics["test_accuracy"] <= 1.0


def test_augment_flips_and_shifts_within_bounds():
  images = np.arange(2 * 5 * 6).reshape(2, 5, 6, 1).astype(np.float32) + 1
  out = np.asarray(train_lib.augment(jax.random.key(3), images))
  assert out.shape == images.shape
  for image, moved in zip(images, out):
    # Every output is a flipped-or-not copy shifted by <= MAX_SHIFT pixels.
    candidates = []
    for src in (image, image[:, ::-1]):
      s = train_lib.MAX_SHIFT
      padded = np.pad(src, ((s, s), (s, s), (0, 0)))
      candidates += [padded[i:i + 5, j:j + 6] for i in range(2 * s + 1)
                     for j in range(2 * s + 1)]
    assert any(np.array_equal(moved, c) for c in candidates)


def test_too_little_data_is_a_clear_error():
  images, labels = tiny_data(8)
  config = train_lib.TrainConfig(**TINY)
  with pytest.raises(ValueError, match="less than one batch"):
    train_lib.train(config, images, labels, progress=False)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """A checkpoint of a 2-step tiny run, with its variables and config."""
  variables, metrics = run(steps=2)
  config = train_lib.checkpoint_config(
      train_lib.TrainConfig(**TINY), (28, 28, 1), metrics)
  path = tmp_path_factory.mktemp("ckpt") / "model"
  _checkpoint.save_model(path, variables, config)
  return path, variables, config


def test_round_trip_is_bit_exact(saved):
  path, variables, config = saved
  model, restored, restored_config = _checkpoint.load_model(path)
  assert_trees_equal(variables, jax.device_get(restored))
  assert restored_config == config
  logits, _ = model.apply(restored, np.zeros((2, 28, 28, 1), np.float32))
  assert logits.shape == (2, 3)


def test_config_json_records_the_run(saved):
  path, _, _ = saved
  with open(path / "config.json") as f:
    config = json.load(f)
  assert config["model"] == "resnet_small" and config["num_classes"] == 3
  assert config["input_shape"] == [28, 28, 1]
  assert config["model_kwargs"] == {"num_filters": 4}
  assert config["mean"] == [0.2860] and config["std"] == [0.3530]
  assert config["seed"] == 0 and config["epochs"] == 1
  assert config["lr"] == 3e-3 and config["weight_decay"] == 5e-4
  assert 0.0 <= config["test_accuracy"] <= 1.0
  assert "losses" not in config
  assert sorted(os.listdir(path)) == ["config.json", "variables"]


def test_save_refuses_an_existing_folder(saved):
  path, variables, config = saved
  with pytest.raises(ValueError, match="already exists"):
    _checkpoint.save_model(path, variables, config)


def test_missing_folder(tmp_path):
  with pytest.raises(ValueError, match="does not exist") as e:
    _checkpoint.load_model(tmp_path / "nowhere")
  assert str(tmp_path / "nowhere") in str(e.value)


def copy_checkpoint(saved, tmp_path):
  import shutil
  dst = tmp_path / "copy"
  shutil.copytree(saved[0], dst)
  return dst


def test_missing_or_corrupt_config(saved, tmp_path):
  path = copy_checkpoint(saved, tmp_path)
  (path / "config.json").write_text("{not json")
  with pytest.raises(ValueError, match="config.json is not valid JSON"):
    _checkpoint.load_model(path)
  (path / "config.json").unlink()
  with pytest.raises(ValueError, match="config.json not found"):
    _checkpoint.load_model(path)


@pytest.mark.parametrize("which", ["all", "largest"])
def test_truncated_weights(saved, tmp_path, which):
  path = copy_checkpoint(saved, tmp_path)
  files = [os.path.join(root, name)
           for root, _, names in os.walk(path / "variables") for name in names]
  if which == "largest":  # Only the array data: the metadata still parses.
    files = [max(files, key=os.path.getsize)]
  for file in files:
    with open(file, "r+b") as f:
      f.truncate(os.path.getsize(file) // 2)
  with pytest.raises(ValueError, match="variables") as e:
    _checkpoint.load_model(path)
  assert str(path) in str(e.value)


def test_missing_weights(saved, tmp_path):
  import shutil
  path = copy_checkpoint(saved, tmp_path)
  shutil.rmtree(path / "variables")
  with pytest.raises(ValueError, match="has no weights"):
    _checkpoint.load_model(path)


@pytest.mark.parametrize("change", [
    {"num_classes": 10},
    {"model_kwargs": {"num_filters": 8}},
    {"model": "resnet18_cifar", "input_shape": [32, 32, 3],
     "model_kwargs": {"num_filters": 4}},
])
def test_config_that_does_not_match_the_weights(saved, tmp_path, change):
  path = copy_checkpoint(saved, tmp_path)
  config = {**saved[2], **change}
  (path / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match="architecture") as e:
    _checkpoint.load_model(path)
  assert str(path) in str(e.value)


def test_main_trains_and_saves(tmp_path, monkeypatch):
  images, labels = tiny_data(48)
  monkeypatch.setattr(train_lib, "load_dataset",
                      lambda name: (images, labels, images[:8], labels[:8]))
  # The flags do not set the width; narrow the model to keep this fast.
  @dataclasses.dataclass(frozen=True)
  class Narrow(train_lib.TrainConfig):
    model_kwargs: dict = dataclasses.field(
        default_factory=lambda: {"num_filters": 4})

  monkeypatch.setattr(train_lib, "TrainConfig", Narrow)
  out = tmp_path / "run"
  train_lib.main(["--out", str(out), "--epochs", "1", "--batch-size", "16",
                  "--seed", "3"])
  model, variables, config = _checkpoint.load_model(out)
  assert config["num_classes"] == 3 and config["seed"] == 3
  assert config["dataset"] == "fashion_mnist_local" and config["steps"] == 3
  assert model.num_classes == 3
  with pytest.raises(SystemExit):  # An existing --out fails before training.
    train_lib.main(["--out", str(out)])
