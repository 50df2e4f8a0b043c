"""Tests for the image-folder loaders of the curated OOD sets."""

import tarfile

import numpy as np
import PIL.Image
import pytest

from benchmarks.legacy_loaders import load_curated
from benchmarks.legacy_loaders import load_image_folder
from line_jax.data import CURATED_OOD
from line_jax.data import CuratedSet
from line_jax.data import download_curated


def _write_images(folder, sizes, fmt="png"):
  folder.mkdir(parents=True, exist_ok=True)
  for i, (h, w) in enumerate(sizes):
    pixels = np.full((h, w, 3), 40 * i, np.uint8)
    PIL.Image.fromarray(pixels).save(folder / f"img{i:02d}.{fmt}")


def test_load_image_folder_sorted_resized_cropped(tmp_path):
  _write_images(tmp_path / "b", [(36, 36), (50, 40)])
  _write_images(tmp_path / "a", [(32, 64)], fmt="jpg")
  (tmp_path / "a" / "notes.txt").write_text("not an image")
  images = load_image_folder(tmp_path, 32)
  assert images.shape == (3, 32, 32, 3) and images.dtype == np.uint8
  # Sorted paths: a/img00.jpg, b/img00.png, b/img01.png; flat colours survive.
  np.testing.assert_array_equal(images[1], 0)
  np.testing.assert_array_equal(images[2], 40)
  gray = load_image_folder(tmp_path, 16, grayscale=True, max_images=2)
  assert gray.shape == (2, 16, 16, 1)


def test_load_image_folder_errors(tmp_path):
  with pytest.raises(FileNotFoundError):
    load_image_folder(tmp_path / "missing", 32)
  with pytest.raises(ValueError, match="no image files"):
    load_image_folder(tmp_path, 32)


def test_load_curated_uses_the_archive_layout(tmp_path):
  _write_images(tmp_path / "LSUN" / "test", [(36, 36)] * 3, fmt="jpg")
  assert load_curated("lsun_c", tmp_path).shape == (3, 32, 32, 3)
  _write_images(tmp_path / "iNaturalist" / "images", [(300, 400)] * 2, fmt="jpg")
  assert load_curated("inaturalist", tmp_path).shape == (2, 224, 224, 3)
  assert load_curated("inaturalist", tmp_path, image_size=64).shape == (
      2, 64, 64, 3)
  with pytest.raises(ValueError, match="unknown curated"):
    load_curated("cifar10", tmp_path)


def test_registry_holds_the_real_addresses():
  assert set(CURATED_OOD) == {
      "lsun_c", "lsun_r", "isun", "inaturalist", "sun", "places", "textures"}
  assert "fhtsw1m3qxlwj6h/LSUN.tar.gz" in CURATED_OOD["lsun_c"].url
  assert CURATED_OOD["places"].url.endswith("imagenet_ood_dataset/Places.tar.gz")


def test_download_curated_from_a_local_archive(tmp_path, monkeypatch):
  staging = tmp_path / "staging"
  _write_images(staging / "iSUN" / "iSUN_patches", [(32, 32)] * 2, fmt="jpg")
  archive = tmp_path / "iSUN.tar.gz"
  with tarfile.open(archive, "w:gz") as tar:
    tar.add(staging / "iSUN", arcname="iSUN")
  fake = CuratedSet(archive.as_uri(), "iSUN.tar.gz", "iSUN", 32, 32)
  monkeypatch.setitem(CURATED_OOD, "isun", fake)
  root = tmp_path / "downloads"
  folder = download_curated("isun", root)
  assert folder == root / "iSUN" and (root / "iSUN.tar.gz").is_file()
  assert load_curated("isun", root).shape == (2, 32, 32, 3)
  assert download_curated("isun", root) == folder  # Cached: no refetch.
