"""Files that would make a data set silently wrong: hidden names, class names
that differ from the model's, images that cannot be decoded."""

import json
import os
import shutil
import warnings

import numpy as np
import PIL.Image
import pytest

from line_jax import data


def _save(path, seed, size=(9, 7)):
  path.parent.mkdir(parents=True, exist_ok=True)
  pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
  PIL.Image.fromarray(pixels).save(path)


def _folder(root, layout):
  """`layout`: relative paths of the PNGs to write, each with its own pixels."""
  for i, name in enumerate(layout):
    _save(root / name, i)
  return root


def _all(batches):
  images, labels = zip(*batches)
  return np.concatenate(images), np.concatenate(labels)


def _rel(source):
  return [os.path.relpath(p, source.root) for p in source.paths]


# Hidden names.


def test_hidden_files_and_folders_change_no_class_path_or_label(tmp_path):
  layout = ["a/0.png", "a/1.png", "a/deep/2.png", "b/0.png", "c/0.png"]
  clean = _folder(tmp_path / "clean", layout)
  messy = tmp_path / "messy"
  shutil.copytree(clean, messy)
  # Jupyter's checkpoints look like a class and would sort first: class 0.
  _save(messy / ".ipynb_checkpoints" / "0-checkpoint.png", 10)
  (messy / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
  (messy / "a" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
  # macOS's AppleDouble twin: an image name, no image inside.
  (messy / "a" / "._0.png").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X")
  _save(messy / "b" / ".thumb.png", 11)  # A real image, but hidden.
  _save(messy / "c" / ".cache" / "3.png", 12)  # Hidden folder deeper down.
  want, got = data.ImageFolderSource(clean), data.ImageFolderSource(messy)
  assert got.classes == want.classes == ("a", "b", "c")
  assert _rel(got) == _rel(want)
  np.testing.assert_array_equal(got.labels, want.labels)
  pre = data.Preprocess(5)
  for g, w in zip(_all(data.image_batches(got, pre, batch_size=2)),
                  _all(data.image_batches(want, pre, batch_size=2))):
    np.testing.assert_array_equal(g, w)


def test_hidden_folder_does_not_make_a_flat_folder_labelled(tmp_path):
  root = _folder(tmp_path, ["0.png", "1.png", ".ipynb_checkpoints/0-checkpoint.png"])
  source = data.ImageFolderSource(root)
  assert source.classes == ()
  assert _rel(source) == ["0.png", "1.png"]
  assert list(source.labels) == [data.NO_LABEL] * 2


# Class names against a model's.


def test_check_class_names_accepts_the_same_names_in_order(tmp_path):
  source = data.ImageFolderSource(_folder(tmp_path, ["cat/0.png", "dog/0.png"]))
  data.check_class_names(source.classes, ["cat", "dog"])
  data.check_class_names(source.classes, ("cat", "dog"), where=str(tmp_path))


def test_check_class_names_names_missing_and_unexpected_classes():
  with pytest.raises(ValueError, match=r"in the model but not in the image folder: "
                     r"\['dog'\]") as e:
    data.check_class_names(["cat"], ["cat", "dog"])
  assert "(1) do not match" in str(e.value) and "(2)" in str(e.value)
  with pytest.raises(ValueError, match=r"in the image folder but not in the checkpoint: "
                     r"\['bird'\]"):
    data.check_class_names(["bird", "cat", "dog"], ["cat", "dog"], against="the checkpoint")
  with pytest.raises(ValueError, match=r"in the model but not in data/train: \['Dog'\]; "
                     r"in data/train but not in the model: \['dog'\]"):
    data.check_class_names(["cat", "dog"], ["cat", "Dog"], where="data/train")
  with pytest.raises(ValueError, match="a name repeats"):
    data.check_class_names(["cat", "dog"], ["cat", "dog", "dog"])


def test_check_class_names_names_a_different_order():
  # Fashion-MNIST's order is not sorted; a folder's classes always are.
  expected = ["T-shirt", "Trouser", "Pullover", "Dress"]
  with pytest.raises(ValueError, match=r"different order \(label 0 is 'Dress' here but "
                     r"'T-shirt' in the model.*4 classes would be mislabelled"):
    data.check_class_names(sorted(expected), expected)


# Undecodable images.


GOOD = ["a/0.png", "a/1.png", "a/4.png", "b/0.png", "b/1.png", "b/2.png", "b/3.png"]


def _bad_files(root):
  """`a/2.png` (text) and `a/3.jpg` (a truncated JPEG): records 2 and 3."""
  (root / "a" / "2.png").write_text("not a png at all")
  jpeg = root / "a" / "3.jpg"
  pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
  PIL.Image.fromarray(pixels).save(jpeg, quality=90)
  jpeg.write_bytes(jpeg.read_bytes()[:400])
  return [str(root / "a" / "2.png"), str(jpeg)]


@pytest.fixture
def folders(tmp_path):
  """`(clean, bad)`: the same good images, and with two bad files among them."""
  clean = _folder(tmp_path / "clean", GOOD)
  bad_root = tmp_path / "bad"
  shutil.copytree(clean, bad_root)
  bad = _bad_files(bad_root)
  return data.ImageFolderSource(clean), data.ImageFolderSource(bad_root), bad


@pytest.mark.parametrize("workers", [0, 2])
def test_a_bad_image_stops_the_stream_naming_it_and_the_option(folders, workers):
  _, source, bad = folders
  batches = data.image_batches(source, data.Preprocess(5), batch_size=2, workers=workers)
  assert not batches.skip_bad_images
  with pytest.raises(data.BadImageError,
                     match=rf"cannot decode image file {bad[0]}.*skip_bad_images=True"):
    list(batches)


@pytest.mark.parametrize("workers", [0, 3])
@pytest.mark.parametrize("batch_size", [1, 2, 3, 20])
def test_skip_bad_images_gives_the_good_images_bit_for_bit(folders, workers, batch_size):
  clean, source, bad = folders
  pre = data.Preprocess(5)
  batches = data.image_batches(source, pre, batch_size=batch_size, workers=workers,
                               skip_bad_images=True)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    got = list(batches)
    again = list(batches)  # A second pass warns about nothing new.
  want = _all(data.image_batches(clean, pre, batch_size=batch_size, workers=workers))
  for pass_ in (got, again):
    for g, w in zip(_all(pass_), want):
      np.testing.assert_array_equal(g, w)
  # Records 2 and 3 are dropped from their batches, which come out shorter;
  # a batch of bad images only is not yielded.
  sizes = np.bincount(np.delete(np.arange(len(source)), [2, 3]) // batch_size)
  assert [len(b[1]) for b in got] == [int(s) for s in sizes if s]
  assert [s.index for s in batches.skipped] == [2, 3]
  assert [s.path for s in batches.skipped] == bad
  assert all(s.error.startswith(f"cannot decode image file {s.path}")
             for s in batches.skipped)
  messages = [str(w.message) for w in caught]
  assert len(messages) == 2, messages
  assert bad[0] in messages[0] and bad[1] in messages[1]


def test_skip_bad_images_keeps_positions_and_resumes(folders):
  _, source, _ = folders
  batches = data.image_batches(source, data.Preprocess(5), batch_size=2, workers=2,
                               skip_bad_images=True)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    full = list(batches)
    # Batch [2, 4) was all bad: reading the second batch read through it.
    assert len(full) == len(batches) - 1 == 4
    for consumed in range(len(full) + 1):
      iterator = batches.iterator()
      for _ in range(consumed):
        next(iterator)
      position = json.loads(json.dumps(batches.position(iterator)))
      assert position["next_record"] == [0, 2, 6, 8, 9][consumed]
      rest = list(batches.iterator(position))
      assert len(rest) == len(full) - consumed
      for (gi, gl), (wi, wl) in zip(rest, full[consumed:]):
        np.testing.assert_array_equal(gi, wi)
        np.testing.assert_array_equal(gl, wl)


def test_skipped_images_are_named_by_source_index_after_a_shuffle(folders):
  _, source, bad = folders
  batches = data.image_batches(source, data.Preprocess(5), batch_size=3, seed=7,
                               skip_bad_images=True)
  with pytest.warns(UserWarning, match="cannot be decoded"):
    _, labels = _all(batches)
  assert len(labels) == len(source) - 2
  assert [(s.index, s.path) for s in batches.skipped] == [(2, bad[0]), (3, bad[1])]


class _Pixels(data.ArraySource):
  """Arrays with one record (index 2) that is no image."""

  def __getitem__(self, index):
    image, label = super().__getitem__(index)
    return (image.astype(np.float32) if index == 2 else image), label


def test_a_bad_array_record_is_named_by_its_index():
  images = np.arange(5 * 4, dtype=np.uint8).reshape(5, 2, 2, 1)
  source = _Pixels(images, np.arange(5))
  pre = data.Preprocess(channels=1)
  with pytest.raises(data.BadImageError, match=r"record 2 of .*float32.*skip_bad_images"):
    list(data.image_batches(source, pre, batch_size=2))
  batches = data.image_batches(source, pre, batch_size=2, skip_bad_images=True)
  with pytest.warns(UserWarning, match="record 2 of"):
    got, labels = _all(batches)
  np.testing.assert_array_equal(got, images[[0, 1, 3, 4]])
  np.testing.assert_array_equal(labels, [0, 1, 3, 4])
  (skipped,) = batches.skipped
  assert skipped.index == 2 and skipped.path is None and "float32" in skipped.error


def test_other_errors_are_not_skipped():
  def fails(record):
    raise ValueError("a bug, not a bad image")
  batches = data.image_batches(data.ArraySource(np.zeros((3, 2, 2), np.uint8)), fails,
                               batch_size=2, skip_bad_images=True)
  with pytest.raises(ValueError, match="a bug"):
    list(batches)
