"""Tests for the preprocessing helpers."""

import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest

from line_jax.data import MEAN_STD
from line_jax.data import center_crop
from line_jax.data import normalize
from line_jax.data import resize_center_crop
from line_jax.data import resize_center_crop_batch
from line_jax.data import resize_shorter_side


def test_normalize_exact_values_numpy_and_jax():
  images = np.array([[[[0, 51, 255]]]], np.uint8)  # [1, 1, 1, 3]
  mean, std = (0.5, 0.2, 0.0), (0.5, 0.1, 2.0)
  want = np.array([[[[-1.0, 0.0, 0.5]]]], np.float32)
  got_np = normalize(images, mean, std)
  got_jax = normalize(jnp.asarray(images), mean, std)
  assert isinstance(got_np, np.ndarray) and got_np.dtype == np.float32
  assert isinstance(got_jax, jnp.ndarray) and got_jax.dtype == jnp.float32
  np.testing.assert_allclose(got_np, want, atol=1e-6)
  np.testing.assert_allclose(np.asarray(got_jax), want, atol=1e-6)


def test_normalize_channel_mismatch():
  with pytest.raises(ValueError, match="3 channels"):
    normalize(np.zeros((2, 4, 4, 3), np.uint8), *MEAN_STD["fashion_mnist"])


def test_every_mean_std_pair_matches_in_length():
  for mean, std in MEAN_STD.values():
    assert len(mean) == len(std) in (1, 3)


def test_center_crop_offsets_match_torchvision_rounding():
  image = np.arange(5 * 8).reshape(5, 8, 1)
  # top = round(1.5) = 2 (half to even), left = round(3.0) = 3.
  np.testing.assert_array_equal(center_crop(image, 2), image[2:4, 3:5])
  batch = jnp.asarray(np.stack([image, image + 100]))
  np.testing.assert_array_equal(
      np.asarray(center_crop(batch, 2)), np.stack([image, image + 100])[:, 2:4, 3:5])
  with pytest.raises(ValueError, match="cannot crop"):
    center_crop(image, 6)


def test_resize_shorter_side_sizes_and_pixels():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
  out = resize_shorter_side(image, 256)
  assert out.shape == (256, 341, 3)  # int(256 * 400 / 300) = 341.
  want = np.asarray(PIL.Image.fromarray(image).resize((341, 256), PIL.Image.BILINEAR))
  np.testing.assert_array_equal(out, want)
  tall = resize_shorter_side(image.transpose(1, 0, 2)[:, :, :1], 30)
  assert tall.shape == (40, 30, 1)
  assert resize_shorter_side(image, 300) is image


def test_resize_center_crop_imagenet_and_batch():
  image = np.full((375, 500, 3), 7, np.uint8)
  assert resize_center_crop(image).shape == (224, 224, 3)
  np.testing.assert_array_equal(resize_center_crop(image), 7)
  batch = resize_center_crop_batch(np.zeros((2, 40, 50, 1), np.uint8), 32, 28)
  assert batch.shape == (2, 28, 28, 1) and batch.dtype == np.uint8
