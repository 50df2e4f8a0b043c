"""Training determinism and progress, and checkpoint round trips and errors."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from line_jax import models
from line_jax import train as train_cli
from line_jax.runs import train as train_lib

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
  models.save_checkpoint(path, variables, config)
  return path, variables, config


def test_round_trip_is_bit_exact(saved):
  path, variables, config = saved
  model, restored, restored_config = models.load_checkpoint(path)
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
    models.save_checkpoint(path, variables, config)


def test_missing_folder(tmp_path):
  with pytest.raises(ValueError, match="does not exist") as e:
    models.load_checkpoint(tmp_path / "nowhere")
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
    models.load_checkpoint(path)
  (path / "config.json").unlink()
  with pytest.raises(ValueError, match="config.json not found"):
    models.load_checkpoint(path)


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
    models.load_checkpoint(path)
  assert str(path) in str(e.value)


def test_missing_weights(saved, tmp_path):
  import shutil
  path = copy_checkpoint(saved, tmp_path)
  shutil.rmtree(path / "variables")
  with pytest.raises(ValueError, match="has no weights"):
    models.load_checkpoint(path)


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
    models.load_checkpoint(path)
  assert str(path) in str(e.value)


# --- python -m line_jax.train ----------------------------------------------


def image_folder(root, images, labels):
  """PNGs in torchvision's ImageFolder layout, `root/<label>/<index>.png`."""
  import PIL.Image
  for i, (image, label) in enumerate(zip(images, labels)):
    os.makedirs(root / str(label), exist_ok=True)
    PIL.Image.fromarray(image).save(root / str(label) / f"{i:03d}.png")


def test_main_on_an_image_folder_equals_train_on_its_arrays(tmp_path, narrow, capsys):
  images, labels = tiny_data(60)
  image_folder(tmp_path / "data" / "train", images[:48], labels[:48])
  image_folder(tmp_path / "data" / "test", images[48:], labels[48:])
  out = tmp_path / "run"
  train_cli.main(["--out", str(out), "--dataset", str(tmp_path / "data"), "--epochs", "1",
                "--batch-size", "16", "--seed", "3", "--workers", "0", "--quiet"])
  assert capsys.readouterr().err == ""  # --quiet: no progress
  model, variables, config = models.load_checkpoint(out)
  # ImageFolder order: classes sorted, files sorted within each.
  order = np.lexsort((np.arange(48), labels[:48]))
  x, y = images[:48][order][..., None], labels[:48][order]
  mean, std = train_lib.mean_std(str(tmp_path / "data"), x)
  assert mean == (round(x.mean() / 255, 4),) and std == (round(x.std() / 255, 4),)
  want, metrics = train_lib.train(
      narrow(num_classes=3, dataset=str(tmp_path / "data"), epochs=1, batch_size=16, seed=3,
             mean=mean, std=std), x, y, images[48:], labels[48:], progress=False)
  assert_trees_equal(want, jax.device_get(variables))
  assert config["dataset"] == str(tmp_path / "data") and config["num_classes"] == 3
  assert config["steps"] == 3 and config["test_accuracy"] == metrics["test_accuracy"]
  assert model.num_classes == 3


def test_main_on_fashion_mnist_reads_debians_files_never_tfds(tmp_path, narrow, monkeypatch,
                                                              capsys):
  from line_jax.data import DEBIAN_FASHION_MNIST_DIR
  if not os.path.isdir(DEBIAN_FASHION_MNIST_DIR):
    pytest.skip("Debian's dataset-fashion-mnist is not installed")
  import tensorflow_datasets as tfds

  def no_tfds(*args, **kwargs):
    raise AssertionError("TFDS was asked for a data set")

  for name in ("load", "data_source", "builder"):
    monkeypatch.setattr(tfds, name, no_tfds)
  out = tmp_path / "run"
  train_cli.main(["--out", str(out), "--max-examples", "32", "--epochs", "1",
                "--batch-size", "16"])  # --dataset fashion_mnist: the default
  _, err = capsys.readouterr()
  # Not a terminal: plain progress lines, no carriage-return frames.
  assert "\r" not in err and err.splitlines()[-1].startswith("train: 32/32")
  _, _, config = models.load_checkpoint(out)
  assert config["dataset"] == "fashion_mnist" and config["num_classes"] == 10
  assert config["mean"] == [0.2860] and config["std"] == [0.3530]
  assert "test_accuracy" in config and config["input_shape"] == [28, 28, 1]


def test_main_on_an_npy_folder_has_no_test_split(tmp_path, narrow):
  images, labels = tiny_data(32)
  (tmp_path / "data").mkdir()
  np.save(tmp_path / "data" / "images.npy", images)
  np.save(tmp_path / "data" / "labels.npy", labels)
  train_cli.main(["--out", str(tmp_path / "run"), "--dataset", str(tmp_path / "data"),
                "--epochs", "1", "--batch-size", "16", "--quiet"])
  _, _, config = models.load_checkpoint(tmp_path / "run")
  assert "test_accuracy" not in config and config["steps"] == 2


def _one_line_error(capsys, argv, match):
  with pytest.raises(SystemExit) as e:
    train_cli.main(argv)
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and err.count("\n") == 1 and match in err, err


def test_user_mistakes_are_one_line_errors(tmp_path, capsys):
  out = str(tmp_path / "run")
  _one_line_error(capsys, ["--out", out, "--dataset", "nowhere"], "'nowhere' is neither")
  mine = tmp_path / "mine"
  mine.mkdir()
  (mine / "notes.txt").write_text("mine")
  # Before any training (the default data set is all of Fashion-MNIST).
  _one_line_error(capsys, ["--out", str(mine)], "notes.txt, which line_jax did not write")
  assert (mine / "notes.txt").read_text() == "mine"
  _one_line_error(capsys, ["--out", out, "--epochs", "0"], "--epochs must be at least 1")
  import PIL.Image
  mixed = tmp_path / "mixed"
  for i, size in enumerate((20, 24)):
    os.makedirs(mixed / str(i))
    PIL.Image.new("L", (size, size)).save(mixed / str(i) / "a.png")
  _one_line_error(capsys, ["--out", out, "--dataset", str(mixed), "--workers", "0"],
                  "--image-size")
  flat = tmp_path / "flat"
  flat.mkdir()
  PIL.Image.new("L", (8, 8)).save(flat / "a.png")
  _one_line_error(capsys, ["--out", out, "--dataset", str(flat)], "has no labels")
  assert not os.path.exists(out)


def test_help_shows_the_module_and_the_defaults(capsys):
  with pytest.raises(SystemExit):
    train_cli.main(["--help"])
  text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
  assert text.startswith("usage: python -m line_jax.train")
  assert "(default: fashion_mnist)" in text and "(default: 5)" in text
  assert "(default: resnet_small)" in text and "--quiet" in text


def test_read_images_resizes_and_converts(tmp_path):
  images, labels = tiny_data(5)
  image_folder(tmp_path / "f", images, labels)
  from line_jax import data
  x, y = train_lib.read_images(data.open_source(str(tmp_path / "f")), image_size=14,
                               channels=3, workers=0)
  assert x.shape == (5, 14, 14, 3) and x.dtype == np.uint8
  np.testing.assert_array_equal(x[..., 0], x[..., 2])  # gray as RGB
  assert sorted(y.tolist()) == sorted(labels.tolist())


def _sorted_npy(root, per_class=(20, 20, 20)):
  """A `.npy` set sorted by class, as a folder of class subfolders would be."""
  images, _ = tiny_data(sum(per_class))
  labels = np.repeat(np.arange(len(per_class)), per_class).astype(np.int32)
  for i, y in enumerate(labels):  # Each image shows its own class's band.
    images[i] = np.where(images[i] > 170, images[i] - 180, images[i])
    images[i, 2 + 8 * y:10 + 8 * y] += 180
  root.mkdir()
  np.save(root / "images.npy", images)
  np.save(root / "labels.npy", labels)
  return images, labels


def test_max_examples_takes_every_class_in_proportion(tmp_path, narrow):
  from line_jax import data
  _, labels = _sorted_npy(tmp_path / "data")
  source = data.open_source(str(tmp_path / "data"))
  _, y, _, _ = train_lib.load_dataset(str(tmp_path / "data"), limit=18)
  # The subset rule, not the first 18 rows (all of class 0).
  np.testing.assert_array_equal(y, labels[data.subset_indices(source, 18)])
  assert np.bincount(y).tolist() == [6, 6, 6]
  metrics = train_lib.run(narrow(dataset=str(tmp_path / "data"), epochs=1, batch_size=16,
                                 max_examples=18), tmp_path / "run",
                          runtime=train_lib.Runtime(progress=False))
  _, _, config = models.load_checkpoint(tmp_path / "run")
  assert config["num_classes"] == 3 and metrics["steps"] == 1


def test_out_holding_a_users_files_is_refused_and_kept(tmp_path, narrow):
  _sorted_npy(tmp_path / "data")
  config = narrow(dataset=str(tmp_path / "data"), epochs=1, batch_size=16)
  quiet = train_lib.Runtime(progress=False)
  for name, text in (("notes.txt", "mine"), ("config.json", '{"lr": 1}')):
    out = tmp_path / name.replace(".", "_")
    out.mkdir()
    (out / name).write_text(text)
    with pytest.raises(ValueError, match=str(out)) as e:
      train_lib.run(config, out, runtime=quiet)
    assert name in str(e.value)
    assert os.listdir(out) == [name] and (out / name).read_text() == text


def test_a_rerun_replaces_its_own_checkpoint(tmp_path, narrow):
  _sorted_npy(tmp_path / "data")
  config = narrow(dataset=str(tmp_path / "data"), epochs=1, batch_size=16)
  quiet = train_lib.Runtime(progress=False)
  out = tmp_path / "run"
  out.mkdir()  # An empty folder is taken.
  train_lib.run(config, out, runtime=quiet)
  _, first, _ = models.load_checkpoint(out)
  train_lib.run(dataclasses.replace(config, seed=1), out, runtime=quiet)
  _, second, saved_config = models.load_checkpoint(out)
  assert saved_config["seed"] == 1
  assert sorted(os.listdir(out)) == ["config.json", "variables"]
  assert sorted(os.listdir(tmp_path)) == ["data", "run"]  # No temporary folder left.
  assert not np.array_equal(first["params"]["fc"]["kernel"], second["params"]["fc"]["kernel"])


def test_fewer_examples_than_classes_is_refused(tmp_path):
  _sorted_npy(tmp_path / "data")
  with pytest.raises(ValueError, match="--max-examples 2 keeps 2 of the 3 classes"):
    train_lib.load_dataset(str(tmp_path / "data"), limit=2)
