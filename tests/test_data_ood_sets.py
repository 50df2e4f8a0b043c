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
