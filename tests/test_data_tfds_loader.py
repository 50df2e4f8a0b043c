"""Tests of `load_split` on the stock TFDS datasets, under `mock_data`."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from benchmarks.legacy_loaders import load_split
from line_jax.data import STOCK_DATASETS

_FIXED = {
    "cifar10": (32, 32, 3),
    "cifar100": (32, 32, 3),
    "fashion_mnist": (28, 28, 1),
    "svhn_cropped": (32, 32, 3),
    "places365_small": (256, 256, 3),
}


@pytest.mark.parametrize("name", sorted(_FIXED))
def test_fixed_size_datasets(name):
  with tfds.testing.mock_data(num_examples=6):
    images, labels = load_split(name, STOCK_DATASETS[name].eval_split)
  assert images.shape == (6, *_FIXED[name])
  assert images.dtype == np.uint8 and labels.dtype == np.int32
  assert labels.shape == (6,)


@pytest.mark.parametrize("name", ["imagenet2012", "dtd"])
def test_variable_size_datasets_are_resized_and_cropped(name, tmp_path):
  with tfds.testing.mock_data(num_examples=3):
    images, labels = load_split(
        name, image_size=24, resize_size=32, manual_dir=tmp_path)
  assert images.shape == (3, 24, 24, 3) and images.dtype == np.uint8
  assert labels.shape == (3,)


def test_variable_sizes_without_image_size_raise():
  with tfds.testing.mock_data(num_examples=4):
    with pytest.raises(ValueError, match="image_size"):
      load_split("dtd", "test")


def test_max_examples_and_resize_of_fixed_size():
  with tfds.testing.mock_data(num_examples=5):
    images, _ = load_split("cifar10", "test", image_size=16, max_examples=2)
  assert images.shape == (2, 16, 16, 3)


def test_unknown_name_without_split():
  with pytest.raises(ValueError, match="no default split"):
    load_split("mnist")


def test_registry_roles():
  assert {n for n, d in STOCK_DATASETS.items() if d.role == "ood"} == {
      "svhn_cropped", "dtd", "places365_small"}
