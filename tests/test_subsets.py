"""The one subset rule (`line_jax.data.subset_of`, `hold_out`) and the CLIs that take it."""

import json
import os

import numpy as np
import pytest

from line_jax import data
from line_jax import runs
from line_jax import suites


def _labelled(labels):
  labels = np.asarray(labels, np.int32)
  return data.ArraySource(np.zeros((labels.size, 2, 2), np.uint8), labels)


def _sorted(sizes):
  """A source sorted by class, as an ImageFolder is."""
  return _labelled(np.repeat(np.arange(len(sizes)), sizes))


class _Unlabelled:
  """A source that learns a label only by decoding (as TFDS)."""

  def __init__(self, n):
    self.n = n

  def __len__(self):
    return self.n

  def __getitem__(self, index):
    return np.zeros((2, 2), np.uint8), 0


@pytest.mark.parametrize("sizes", [(50,) * 10, (7, 130, 41, 3, 90, 12)])
@pytest.mark.parametrize("count", [6, 10, 37, 100, 250])
def test_each_class_holds_its_proportional_share_within_one(sizes, count):
  source = _sorted(sizes)
  if count > len(source):
    pytest.skip("larger than the source")
  kept = data.subset_indices(source, count)
  assert kept.size == count and np.all(np.diff(kept) > 0)  # Distinct, in source order.
  got = np.bincount(source.labels[kept], minlength=len(sizes))
  share = np.asarray(sizes) * count / sum(sizes)
  if count >= len(sizes) and np.all(share >= 1):
    assert np.all(np.abs(got - share) < 1), (got, share)
  if count >= len(sizes):
    assert np.all(got >= 1), got  # Every class keeps a row.
  np.testing.assert_array_equal(kept, data.subset_indices(source, count))  # Deterministic.


def test_a_small_class_keeps_a_row_and_the_first_rows_are_not_taken():
  source = _sorted((1, 2, 100, 1000, 3))
  for count in (5, 6, 50):
    got = np.bincount(source.labels[data.subset_indices(source, count)], minlength=5)
    assert np.all(got >= 1) and got.sum() == count, got
  # Fewer rows than classes: the largest shares win.
  assert np.bincount(source.labels[data.subset_indices(source, 2)], minlength=5).tolist() == [
      0, 0, 0, 2, 0]


def test_rows_are_evenly_spaced_within_a_class():
  source = _sorted((100, 100))
  kept = data.subset_indices(source, 10)
  for rows in (kept[:5], kept[5:] - 100):  # Spread over each class, not its first rows.
    gaps = np.diff(rows)
    assert gaps.max() - gaps.min() <= 1 and rows[-1] - rows[0] >= 80, rows


def test_without_cheap_labels_the_rows_are_evenly_spaced():
  source = _Unlabelled(1000)
  np.testing.assert_array_equal(data.subset_indices(source, 7),
                                np.linspace(0, 999, 7).round().astype(np.int64))


def test_on_a_shuffled_set_the_subset_is_nearly_the_evenly_spaced_one():
  # Fashion-MNIST is shuffled: committed runs on evenly spaced subsets move little.
  labels = np.random.default_rng(0).permutation(np.repeat(np.arange(10), 600))
  kept = data.subset_indices(_labelled(labels), 1000)
  grid = np.linspace(0, labels.size - 1, 1000).round().astype(np.int64)
  assert np.bincount(labels[kept]).tolist() == [100] * 10
  assert np.intersect1d(kept, grid).size >= 900


def test_subset_of_all_or_none_is_the_source_and_bad_counts_are_refused():
  source = _sorted((5, 5))
  assert data.subset_of(source, None) is source and data.subset_of(source, 10) is source
  for bad in (0, -1):
    with pytest.raises(ValueError, match="needs between 1 and 10 rows"):
      data.subset_of(source, bad)


def test_hold_out_and_the_rest_are_disjoint_and_cover_the_source():
  source = _sorted((30, 10, 60))
  held, rest = data.hold_out(source, 20)
  assert np.intersect1d(held.indices, rest.indices).size == 0
  np.testing.assert_array_equal(np.sort(np.concatenate([held.indices, rest.indices])),
                                np.arange(len(source)))
  np.testing.assert_array_equal(held.indices, data.subset_indices(source, 20))
  assert np.bincount(held.labels).tolist() == [6, 2, 12]
  for bad in (0, 100):
    with pytest.raises(ValueError, match="hold-out"):
      data.hold_out(source, bad)


def test_an_image_folder_is_stratified_from_its_file_list(tmp_path):
  # Empty files: the labels come from the folder names, no image is decoded.
  for name, count in (("a", 8), ("b", 4), ("c", 12)):
    (tmp_path / name).mkdir()
    for i in range(count):
      (tmp_path / name / f"{i:02d}.png").write_bytes(b"")
  source = data.ImageFolderSource(tmp_path)
  assert np.bincount(source.labels[data.subset_indices(source, 6)]).tolist() == [2, 1, 3]


# ---- Every CLI's run takes it ---------------------------------------------


def _sorted_npy(folder, per_class=12, classes=10):
  """28x28 images sorted by class, for the committed Fashion-MNIST checkpoint."""
  rng = np.random.default_rng(0)
  folder.mkdir()
  labels = np.repeat(np.arange(classes), per_class).astype(np.int32)
  np.save(folder / "images.npy", rng.integers(0, 256, (labels.size, 28, 28), dtype=np.uint8))
  np.save(folder / "labels.npy", labels)
  return data.npy_source(folder)


def test_evaluate_max_train_and_max_test_take_the_rule():
  if not os.path.isdir(data.DEBIAN_FASHION_MNIST_DIR):
    pytest.skip("Debian's dataset-fashion-mnist is not installed")
  inputs = runs.BenchmarkData(max_train=300, max_test=50, ood_size=8).inputs()
  for source, split, count in ((inputs.train, "train", 300), (inputs.test, "test", 50)):
    whole = data.fashion_mnist_source(split)
    np.testing.assert_array_equal(source.indices, data.subset_indices(whole, count))
  assert suites.evenly_spaced(whole, 50).indices.tolist() == inputs.test.indices.tolist()


def test_fit_max_examples_takes_the_rule(tmp_path):
  source = _sorted_npy(tmp_path / "set")
  out = tmp_path / "fit"
  # Mahalanobis needs every class: the first 30 rows (three classes) would fail.
  runs.fit.run(runs.fit.Config(dataset=str(tmp_path / "set"), scorers=("mahalanobis",),
                               max_examples=30, batch_size=16),
               out, runtime=runs.Runtime(cache_dir=str(tmp_path / "cache"), progress=False))
  labels = np.load(out / "labels.npy")
  np.testing.assert_array_equal(labels, source.labels[data.subset_indices(source, 30)])
  assert np.bincount(labels).tolist() == [3] * 10


def test_tune_holds_out_by_the_rule(tmp_path, monkeypatch):
  source = _sorted_npy(tmp_path / "set")
  seen = {}

  def spy(method, train_features, train_labels, kernel, bias, val_id, val_ood, **kw):
    seen.update(fit_labels=train_labels, val_rows=len(val_id))
    return {"best": {}, "grid": [], "metrics": {"fpr95": 0.0, "auroc": 1.0}, "grid_size": 0,
            "best_percentiles": {}, "vmapped_s": None, "vmapped_compile_s": None,
            "loop_s": None}

  monkeypatch.setattr(runs.tune, "tune_method", spy)
  runs.tune.run(runs.tune.Config(scorers=("react",), dataset=str(tmp_path / "set"),
                                 val_size=30, ood_size=8, batch_size=32),
                tmp_path / "tune", runtime=runs.Runtime(progress=False))
  held, rest = data.hold_out(source, 30)
  np.testing.assert_array_equal(seen["fit_labels"], rest.labels)
  # Not the last 30 rows (three whole classes): nine of each class fit, three are held.
  assert np.bincount(seen["fit_labels"]).tolist() == [9] * 10 and seen["val_rows"] == 30
  assert json.loads((tmp_path / "tune" / "tune.json").read_text())["react"]["best"] == {}
