"""The feature cache that fit, tune and evaluate share (`line_jax.features.cache`).

Keys change with every input that changes the features and with nothing
else; one extraction serves all three CLIs; fit and evaluate give the same
hyperparameters for the same benchmark.
"""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from line_jax import data
from line_jax import features
from line_jax import fit
from line_jax import models
from line_jax import runs
from line_jax import scorers
from line_jax import suites
from line_jax.features import cache as feature_cache
from line_jax.models import get_model


MEAN, STD = (0.286,), (0.353,)
N_TRAIN = 300


def _tiny():
  model = get_model("resnet_small", 10, num_filters=4)
  return model, model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))


def _model_key(**changes):
  model, variables = _tiny()
  kw = dict(mean=MEAN, std=STD, preprocess=data.Preprocess(28, 28, 1), head=None)
  kw.update(changes)
  return features.Backbone(kw.pop("model", model), kw.pop("variables", variables),
                           **kw).key


def test_model_key_changes_with_everything_that_changes_features():
  base = _model_key()
  assert _model_key() == base
  # The same numbers in another container, and the default resize, are the same input.
  assert _model_key(mean=[0.286], std=np.asarray([0.353], np.float32)) == base
  assert _model_key(preprocess=data.Preprocess(28, None, 1)) == base
  model, variables = _tiny()
  bumped = jax.tree.map(lambda x: x, variables)
  bumped["params"]["fc"]["bias"] = bumped["params"]["fc"]["bias"] + 1e-3
  changed = [_model_key(variables=bumped), _model_key(mean=(0.3,)), _model_key(std=(0.3,)),
             _model_key(preprocess=data.Preprocess(28, 32, 1)),
             _model_key(preprocess=data.Preprocess(28, 28, 3)),
             _model_key(preprocess=data.Preprocess(28, 28, 1, fast_decode=True)),
             _model_key(head="fc"),
             _model_key(model=get_model("resnet_small", 10, num_filters=8))]
  assert len({base, *changed}) == len(changed) + 1


def test_source_key_follows_the_records(tmp_path):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (20, 8, 8, 1), dtype=np.uint8)
  labels = np.arange(20) % 4
  key = lambda s: feature_cache.fingerprint(feature_cache.source_key(s))
  base = key(data.ArraySource(images, labels))
  assert key(data.ArraySource(images.copy(), labels)) == base
  other = images.copy()
  other[3, 2, 2] ^= 1
  assert key(data.ArraySource(other, labels)) != base
  assert key(data.ArraySource(images, (labels + 1) % 4)) != base
  assert key(data.Subset(data.ArraySource(images, labels), [0, 1])) != key(
      data.Subset(data.ArraySource(images, labels), [0, 2]))
  # A .npy folder of the same pixels has the same key as the arrays in memory.
  np.save(tmp_path / "images.npy", images)
  np.save(tmp_path / "labels.npy", labels.astype(np.int32))
  assert key(data.npy_source(tmp_path)) == key(data.ArraySource(images, labels.astype(np.int32)))
  # A folder of files: a rewritten file is another input.
  import PIL.Image
  folder = tmp_path / "folder" / "a"
  folder.mkdir(parents=True)
  for i in range(3):
    PIL.Image.fromarray(images[i, :, :, 0]).save(folder / f"{i}.png")
  before = key(data.ImageFolderSource(tmp_path / "folder"))
  assert key(data.ImageFolderSource(tmp_path / "folder")) == before
  PIL.Image.fromarray(images[5, :, :, 0]).save(folder / "1.png")
  os.utime(folder / "1.png", ns=(1, 1))
  assert key(data.ImageFolderSource(tmp_path / "folder")) != before


def test_extract_then_lookup_and_a_partial_entry_is_redone(tmp_path):
  model, variables = _tiny()
  images = np.random.default_rng(1).integers(0, 256, (40, 28, 28, 1), dtype=np.uint8)
  source = data.ArraySource(images, np.arange(40) % 10)
  batches = data.image_batches(source, data.Preprocess(28, 28, 1), batch_size=16)
  backbone = features.Backbone(model, variables, MEAN, STD, data.Preprocess(28, 28, 1))
  key = feature_cache.fingerprint("k1")
  kw = dict(folder=tmp_path, key=key, progress=False)
  first = feature_cache.extract(backbone, batches, 40, **kw)
  assert not first.cached and first.features.shape[0] == 40
  want = features.extract(model, variables, images, mean=MEAN, std=STD, progress=False)[1]
  np.testing.assert_allclose(first.features, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(first.labels, np.arange(40) % 10)
  again = feature_cache.lookup(tmp_path, key)
  assert again.cached and np.array_equal(again.features, first.features)
  os.remove(tmp_path / f"{key}.json")  # As if killed before the entry was whole.
  assert feature_cache.lookup(tmp_path, key) is None
  assert not feature_cache.extract(backbone, batches, 40, **kw).cached


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
  """A labelled .npy folder, one cache, and a fit that fills it."""
  root = tmp_path_factory.mktemp("shared")
  images = data.fashion_mnist_source("train").images[:N_TRAIN]
  images = np.asarray(images).reshape(N_TRAIN, 28, 28, 1)
  labels = np.asarray(data.fashion_mnist_source("train").labels[:N_TRAIN], np.int32)
  dataset = root / "dataset"
  dataset.mkdir()
  np.save(dataset / "images.npy", images)
  np.save(dataset / "labels.npy", labels)
  cache = root / "cache"
  args = ["--dataset", str(dataset), "--cache-dir", str(cache), "--batch-size", "64",
          "--scorers", "line,knn,vim,react,energy", "--benchmark", "fashion_mnist",
          "--quiet"]
  fit.main(["--out", str(root / "fit1"), *args])
  return root, cache, args, images, labels


def _entries(cache):
  return sorted(p.name for p in cache.glob("*.json"))


def test_fit_publishes_and_a_second_fit_reads_the_cache(shared, capsys):
  root, cache, args, _, _ = shared
  assert len(_entries(cache)) == 1
  entry = json.loads((cache / _entries(cache)[0]).read_text())
  assert entry["images"] == N_TRAIN and "through" in entry["description"]
  fit.main(["--out", str(root / "fit2"), *[a for a in args if a != "--quiet"]])
  assert "cached features" in capsys.readouterr().err  # The model did not run.
  assert (root / "fit2" / runs.fit.CACHED_DIR).is_dir()
  assert not (root / "fit2" / "features.npy").exists()
  for name in ("line", "knn", "vim", "react"):
    a = jax.tree.leaves(runs.fit.load_state(root / "fit1", name))
    b = jax.tree.leaves(runs.fit.load_state(root / "fit2", name))
    assert all(np.array_equal(x, y) for x, y in zip(a, b)), name
  assert _entries(cache) == _entries(cache)[:1]


def test_tune_reads_the_training_features_fit_cached(shared):
  _, cache, _, _, _ = shared
  before = _entries(cache)
  config = runs.tune.Config(scorers=("vim",), dataset=str(shared[0] / "dataset"),
                            val_size=60, ood_size=40, check=False, batch_size=64)
  result = runs.tune.run(config, runtime=runs.Runtime(cache_dir=str(cache), progress=False))
  assert result["vim"]["best"]["dim"] in runs.tune.GRIDS["vim"]["dim"]
  added = [e for e in _entries(cache) if e not in before]
  # Only the validation OOD set was extracted; the training set was read back.
  assert len(added) == 1 and "validation OOD" in json.loads((cache / added[0]).read_text())[
      "description"]


def test_evaluate_reads_them_too_and_uses_fits_hyperparameters(shared, tmp_path):
  root, cache, _, images, labels = shared
  model, variables, config = models.load_checkpoint(models.DEFAULT_CHECKPOINT)
  inputs = suites.Inputs.from_arrays(model, variables, config["mean"], config["std"],
                                     images, labels, images[:50], labels[:50],
                                     {"noise": np.random.default_rng(2).integers(
                                         0, 256, (30, 28, 28, 1), dtype=np.uint8)},
                                     settings="fashion_mnist")
  config = runs.evaluate.Config(runs.BenchmarkData(batch_size=64),
                                ("line", "knn", "vim", "react"), plots=False)
  runs.evaluate.run(config, tmp_path, inputs=inputs,
                    runtime=runs.Runtime(cache_dir=str(cache), progress=False))
  timings = json.loads((tmp_path / "timings.json").read_text())["extraction"]["sets"]
  assert timings["train"]["cached"]  # fit's features.
  used = json.loads((tmp_path / "hparams.json").read_text())
  fitted = json.loads((root / "fit1" / runs.fit.HPARAMS_FILE).read_text())
  # The same benchmark, the same features: the same hyperparameters, LINe's
  # resolved clip included.
  for name in used:
    assert used[name] == fitted[name], name
  assert used["vim"] == {"dim": 32}
  # Each entry pastes into the registry's fit unchanged and gives fit's detector.
  feats = np.load(root / "fit1" / "features.npy")
  kernel, bias = variables["params"]["fc"]["kernel"], variables["params"]["fc"]["bias"]
  for name, hparams in used.items():
    scorer = scorers.get(name)
    pasted = scorer.fit(feats, labels, kernel, bias, **hparams)
    np.testing.assert_allclose(np.asarray(scorer.score(pasted, feats[:50])),
                               np.asarray(scorer.score(runs.fit.load_state(root / "fit1", name),
                                                       feats[:50])), rtol=1e-5, atol=1e-5)


def test_no_cache_writes_nothing(tmp_path, monkeypatch):
  monkeypatch.setenv(feature_cache.ENV, str(tmp_path / "env_cache"))
  fit.main(["--out", str(tmp_path / "fit"), "--max-examples", "64", "--batch-size", "32",
            "--scorers", "energy,line", "--no-cache", "--quiet"])
  assert not (tmp_path / "env_cache").exists()
  fit.main(["--out", str(tmp_path / "fit_env"), "--max-examples", "64", "--batch-size", "32",
            "--scorers", "energy,line", "--quiet"])
  assert len(list((tmp_path / "env_cache").glob("*.json"))) == 1  # $LINE_JAX_CACHE's default.


def test_a_resumed_run_that_kept_no_rows_publishes_nothing(tmp_path):
  # Started with --no-cache (no rows kept), then "resumed" with the cache on:
  # rows before the resume point were never written, so nothing is published.
  # One-pass scorers only: a two-pass one (LINe's percentile clip) keeps every row anyway.
  args = ["--out", str(tmp_path / "fit"), "--max-examples", "64", "--batch-size", "32",
          "--scorers", "energy,mahalanobis", "--quiet", "--cache-dir", str(tmp_path / "cache")]
  fit.main([*args, "--no-cache"])
  assert not (tmp_path / "fit" / "features.npy").exists()
  fit.main(args)
  assert not list((tmp_path / "cache").glob("*.json"))


def test_a_bad_value_claims_nothing_and_a_late_failure_keeps_the_rows(tmp_path, capsys):
  base = ["--max-examples", "64", "--batch-size", "32", "--quiet",
          "--cache-dir", str(tmp_path / "cache")]
  out = tmp_path / "fit"
  # Refused by the fold's init before the run starts: --out stays free.
  try:
    fit.main(["--out", str(out), *base, "--scorers", "vim", "--hparam", "vim.dim=128"])
  except SystemExit as e:
    assert e.code == 2
  assert "must be below the feature count 128" in capsys.readouterr().err
  assert not (out / runs.fit.ARGS_FILE).exists()
  fit.main(["--out", str(out), *base, "--scorers", "vim", "--hparam", "vim.dim=8"])
  assert runs.fit.load_state(out, "vim").dim == 8
  # Refused only once the bank is known (k above its 64 rows): the stream's rows
  # are in the cache already, so the corrected run does not run the model.
  try:
    fit.main(["--out", str(tmp_path / "knn1"), *base, "--scorers", "knn",
              "--hparam", "knn.k=100"])
  except SystemExit as e:
    assert e.code == 2
  assert "k = 100 needs at least 100 bank rows" in capsys.readouterr().err
  fit.main(["--out", str(tmp_path / "knn2"), *[a for a in base if a != "--quiet"],
            "--scorers", "knn"])
  assert "cached features" in capsys.readouterr().err
  assert int(runs.fit.load_state(tmp_path / "knn2", "knn").k) == 1  # k=None: 64 rows / 1000.


class _OwnSource:
  """A Sequence of records of the user's own making: the cache cannot key it."""

  def __init__(self, images):
    self.images_ = images

  def __len__(self):
    return len(self.images_)

  def __getitem__(self, index):
    if not 0 <= index < len(self):
      raise IndexError(index)
    return self.images_[index], -1


def test_a_source_the_cache_cannot_key_is_extracted_but_not_cached(tmp_path):
  model, variables = _tiny()
  rng = np.random.default_rng(3)
  images = rng.integers(0, 256, (80, 28, 28, 1), dtype=np.uint8)
  inputs = suites.Inputs.from_arrays(model, variables, MEAN, STD, images,
                                     np.arange(80) % 10, images[:30], np.arange(30) % 10,
                                     {"noise": images[30:50]})
  own = _OwnSource(rng.integers(0, 256, (20, 28, 28, 1), dtype=np.uint8))
  inputs = dataclasses.replace(inputs, ood={**inputs.ood, "own": own})
  assert feature_cache.source_key(inputs.ood["own"]) is None
  runs.evaluate.run(runs.evaluate.Config(runs.BenchmarkData(batch_size=16), ("energy",)), None,
                    inputs=inputs,
                    runtime=runs.Runtime(cache_dir=str(tmp_path / "cache"), progress=False))
  descriptions = [json.loads(p.read_text())["description"]
                  for p in (tmp_path / "cache").glob("*.json")]
  assert sorted(d.split(":")[0] for d in descriptions) == ["id", "noise", "train"]
  assert "ArraySource('train images', 80 images)" in " ".join(descriptions)


def test_head_only_scorers_read_no_stream_and_cache_nothing(tmp_path):
  # MSP and Energy fit from the head alone: the model never runs, so there are
  # no rows, and nothing (least of all zeros) may go into the cache.
  fit.main(["--out", str(tmp_path / "fit"), "--max-examples", "64", "--batch-size", "32",
            "--scorers", "energy,msp", "--quiet", "--cache-dir", str(tmp_path / "cache")])
  assert not list((tmp_path / "cache").glob("*.json"))
  assert not (tmp_path / "fit" / "features.npy").exists()


def test_a_cache_folder_holding_a_users_files_is_refused_and_kept(tmp_path, capsys):
  model, variables = _tiny()
  images = np.random.default_rng(1).integers(0, 256, (16, 28, 28, 1), dtype=np.uint8)
  source = data.ArraySource(images, np.arange(16) % 10)
  backbone = features.Backbone(model, variables, MEAN, STD, data.Preprocess(28, 28, 1))
  mine = tmp_path / "mine"
  mine.mkdir()
  (mine / "notes.txt").write_text("mine")
  key = feature_cache.fingerprint("x")
  with pytest.raises(ValueError, match=f"feature cache folder {mine} holds notes.txt"):
    backbone.read(source, cache_dir=mine, batch_size=16)
  np.save(tmp_path / "f.npy", np.zeros((2, 3), np.float32))
  np.save(tmp_path / "l.npy", np.zeros(2, np.int32))
  with pytest.raises(ValueError, match="notes.txt"):
    feature_cache.publish(mine, key, str(tmp_path / "f.npy"), str(tmp_path / "l.npy"))
  # Every run refuses it before any work.
  runtime = runs.Runtime(cache_dir=str(mine), progress=False)
  with pytest.raises(ValueError, match="notes.txt"):
    runs.fit.run(runs.fit.Config(scorers=("energy",), max_examples=8), tmp_path / "fit",
                 runtime=runtime)
  with pytest.raises(ValueError, match="notes.txt"):
    runs.tune.run(runs.tune.Config(scorers=("react",)), runtime=runtime)
  with pytest.raises(ValueError, match="notes.txt"):
    runs.evaluate.run(runs.evaluate.Config(scorers=("energy",)), runtime=runtime)
  with pytest.raises(SystemExit):
    fit.main(["--out", str(tmp_path / "fit"), "--cache-dir", str(mine), "--quiet"])
  assert "feature cache folder" in capsys.readouterr().err
  assert os.listdir(mine) == ["notes.txt"] and (mine / "notes.txt").read_text() == "mine"
  assert not (tmp_path / "fit").exists()
  # A cache of line_jax's own is used, and a key it did not make is refused.
  entry = backbone.read(source, cache_dir=tmp_path / "cache", batch_size=16)
  assert backbone.read(source, cache_dir=tmp_path / "cache", batch_size=16).cached
  assert len(entry) == 16
  with pytest.raises(ValueError, match="not 16 hex digits"):
    feature_cache.publish(tmp_path / "cache", "../x", str(tmp_path / "f.npy"),
                          str(tmp_path / "l.npy"))
