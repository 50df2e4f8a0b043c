"""Debian's Fashion-MNIST IDX files: the reader, and the legacy TFDS builder over them."""

import os

import numpy as np
import pytest

from benchmarks.legacy_loaders import load_split
from line_jax.data import DEBIAN_FASHION_MNIST_DIR
from line_jax.data import read_fashion_mnist
from line_jax.data import write_idx

_SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def _fake_split(n, offset):
  """`n` distinct 28x28 images: image i holds the value offset + i in pixel 0."""
  rng = np.random.default_rng(offset)
  images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
  images[:, 0, 0] = offset + np.arange(n)
  labels = (np.arange(n) % 10).astype(np.uint8)
  return images, labels


@pytest.fixture
def fake_source(tmp_path):
  """A folder laid out like /usr/share/datasets/fashion-mnist, tiny."""
  source = tmp_path / "fashion-mnist"
  source.mkdir()
  splits = {"train": _fake_split(23, 0), "test": _fake_split(11, 100)}
  for split, (images, labels) in splits.items():
    write_idx(source / _SPLIT_FILES[split][0], images)
    write_idx(source / _SPLIT_FILES[split][1], labels)
  return source, splits


def _as_set(images, labels):
  return {(im.tobytes(), int(lab)) for im, lab in zip(images, labels)}


def test_builder_prepares_array_record_from_idx(tmp_path, fake_source):
  source, splits = fake_source
  data_dir = tmp_path / "tfds"
  for split, (want_images, want_labels) in splits.items():
    images, labels = load_split(
        "fashion_mnist_local", split, data_dir,
        builder_kwargs={"source_dir": source})
    assert images.shape == (len(want_labels), 28, 28, 1)
    assert images.dtype == np.uint8 and labels.dtype == np.int32
    # array_record shuffles at preparation: compare as sets of pairs.
    assert _as_set(images[..., 0], labels) == _as_set(want_images, want_labels)
  assert list((data_dir / "fashion_mnist_local" / "1.0.0").glob("*.array_record*"))


def test_default_split_is_test_and_max_examples(tmp_path, fake_source):
  source, _ = fake_source
  images, labels = load_split(
      "fashion_mnist_local", data_dir=tmp_path / "tfds", max_examples=5,
      builder_kwargs={"source_dir": source})
  assert images.shape == (5, 28, 28, 1) and labels.shape == (5,)
  assert set(images[:, 0, 0, 0]) <= set(range(100, 111))  # From test.


def test_missing_files_name_the_debian_package(tmp_path):
  with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
    read_fashion_mnist("train", tmp_path)


@pytest.mark.skipif(
    not os.path.isdir(DEBIAN_FASHION_MNIST_DIR),
    reason="apt-get install -y dataset-fashion-mnist")
def test_real_debian_files():
  for split, count in (("train", 60_000), ("test", 10_000)):
    images, labels = read_fashion_mnist(split)
    assert images.shape == (count, 28, 28) and images.dtype == np.uint8
    assert labels.min() == 0 and labels.max() == 9
    # Fashion-MNIST is balanced: 6,000 / 1,000 images per class.
    np.testing.assert_array_equal(np.bincount(labels), [count // 10] * 10)
