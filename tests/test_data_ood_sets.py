"""Tests for the embedded OOD sets of the Fashion-MNIST benchmark."""

import numpy as np
import pytest

from line_jax.data import OOD_SET_NAMES
from line_jax.data import ood_set
from line_jax.data import ood_sets
from line_jax.data import _glyphs

_SIZE = 150


@pytest.fixture(scope="module")
def sets():
  return ood_sets(size=_SIZE, seed=0)


def test_names():
  assert OOD_SET_NAMES == (
      "letters", "digits", "textures", "photos", "faces", "gaussian", "uniform")


def test_shapes_and_dtypes(sets):
  assert tuple(sets) == OOD_SET_NAMES
  for name, images in sets.items():
    assert images.shape == (_SIZE, 28, 28, 1), name
    assert images.dtype == np.uint8, name


def test_not_constant(sets):
  for name, images in sets.items():
    flat = images.reshape(_SIZE, -1)
    assert flat.std() > 10, name
    # Most images differ from each other, and most have structure inside.
    assert len({row.tobytes() for row in flat}) > 0.9 * _SIZE, name
    assert np.mean(flat.std(axis=1) > 2) > 0.9, name


def test_same_seed_same_bytes_and_independent_of_other_sets(sets):
  again = ood_sets(size=_SIZE, seed=0)
  for name in OOD_SET_NAMES:
    assert again[name].tobytes() == sets[name].tobytes(), name
  # A set does not depend on which others were built with it.
  assert ood_sets(["faces"], size=_SIZE)["faces"].tobytes() == (
      sets["faces"].tobytes())


def test_other_seed_other_bytes(sets):
  for name in OOD_SET_NAMES:
    assert ood_set(name, 20, seed=1).tobytes() != sets[name][:20].tobytes(), name


def test_every_discovered_font_draws_distinct_latin_letters():
  fonts = _glyphs.font_paths()
  if not fonts:
    pytest.skip("no TrueType/OpenType fonts installed")
  assert not any("D050000L" in f or "StandardSymbols" in f for f in fonts)
  for font in fonts:
    a = _glyphs.render_glyph("A", font, 24, 0, 0)
    b = _glyphs.render_glyph("B", font, 24, 0, 0)
    assert a.max() > 100 and not np.array_equal(a, b), font


def test_letters_are_white_on_black(sets):
  letters = sets["letters"][..., 0]
  corners = letters[:, [0, 0, -1, -1], [0, -1, 0, -1]]
  assert np.mean(corners == 0) > 0.95
  assert np.all(letters.max(axis=(1, 2)) > 150)  # Thin faces antialias.


def test_bad_arguments():
  with pytest.raises(ValueError, match="unknown embedded OOD set"):
    ood_set("mnist")
  with pytest.raises(ValueError, match="size"):
    ood_set("uniform", 0)


# --- The same sets at another size and channel count (the CIFAR benchmarks). ---

from line_jax.data import _embedded_ood  # noqa: E402


@pytest.fixture(scope="module")
def rgb_sets():
  try:
    return _embedded_ood.ood_sets(_embedded_ood.ALL_SET_NAMES, size=60, side=32, channels=3)
  except FileNotFoundError as e:  # Debian's dataset-fashion-mnist.
    pytest.skip(str(e))


def test_rgb_32_shapes_and_every_set(rgb_sets):
  assert tuple(rgb_sets) == _embedded_ood.ALL_SET_NAMES
  assert "fashion_mnist" not in OOD_SET_NAMES  # It is the ID data of the default benchmark.
  for name, images in rgb_sets.items():
    assert images.shape == (60, 32, 32, 3) and images.dtype == np.uint8, name
    assert len({row.tobytes() for row in images}) > 0.9 * 60, name


def test_gray_sources_repeat_their_level_and_colour_ones_keep_colour(rgb_sets):
  for name in ("letters", "digits", "textures", "faces", "fashion_mnist"):
    images = rgb_sets[name]
    assert np.array_equal(images[..., 0], images[..., 1]), name
    assert np.array_equal(images[..., 0], images[..., 2]), name
  for name in ("photos", "gaussian", "uniform"):
    images = rgb_sets[name].astype(int)
    assert np.abs(images[..., 0] - images[..., 2]).mean() > 5, name


def test_gray_of_a_gray_source_at_32_equals_its_rgb_channel(rgb_sets):
  # The channel count changes only the channels, not which crops are drawn.
  gray = _embedded_ood.ood_set("faces", 60, side=32, channels=1)
  assert np.array_equal(gray[..., 0], rgb_sets["faces"][..., 0])


def test_digits_keep_the_mnist_frame_at_32(rgb_sets):
  digits = rgb_sets["digits"][..., 0]
  # A 23x23 digit centred in 32x32 with a shift of at most 2 px: the outer
  # 2-pixel ring is black.
  assert digits[:, :2].max() == 0 and digits[:, -2:].max() == 0


def test_bad_shape_arguments():
  with pytest.raises(ValueError, match="channels"):
    ood_set("uniform", 5, channels=2)
  with pytest.raises(ValueError, match="side"):
    ood_set("uniform", 5, side=8)
