"""The grain input pipeline: pixels, order, workers, resume, shards, errors."""

import json
import os

import jax
import numpy as np
import PIL.Image
import pytest

from benchmarks import legacy_loaders
from line_jax import data
from line_jax import distributed

RGB224 = data.Preprocess(224, 256, 3)
GRAY28 = data.Preprocess(28, 28, 1)


def _photos():
  """Real photographs that ship with scikit-image (no network)."""
  from skimage import data as skdata  # pylint: disable=g-import-not-at-top
  return [skdata.astronaut(), skdata.chelsea(), skdata.coffee(), skdata.camera()]


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory):
  """A 2-class folder of real JPEGs in odd sizes, portrait and landscape."""
  root = tmp_path_factory.mktemp("jpegs")
  rng = np.random.default_rng(0)
  sizes = [(375, 500), (500, 375), (301, 257), (256, 300), (260, 256), (333, 333)]
  for i, (h, w) in enumerate(sizes):
    photo = _photos()[i % 4]
    top = rng.integers(0, photo.shape[0] - min(h, photo.shape[0]) + 1)
    left = rng.integers(0, photo.shape[1] - min(w, photo.shape[1]) + 1)
    crop = PIL.Image.fromarray(photo[top:top + h, left:left + w]).resize((w, h))
    folder = root / ("cat" if i % 2 else "astro")
    folder.mkdir(exist_ok=True)
    crop.save(folder / f"im{i}.jpg", quality=90)
  return root


def _torchvision_reference(path, resize, crop, mode):
  """torchvision 0.28's `pil_loader`, `Resize(resize)`, `CenterCrop(crop)`.

  Restated from torchvision/transforms/functional.py
  (`_compute_resized_output_size`, `center_crop`) and _functional_pil.py
  (`resize`: `img.resize((w, h), BILINEAR)`), independent of line_jax.
  """
  with open(path, "rb") as f:
    img = PIL.Image.open(f).convert("RGB")
  if mode == "L":  # transforms.Grayscale(1): img.convert("L").
    img = img.convert("L")
  w, h = img.size
  short, long = (w, h) if w <= h else (h, w)
  new_short, new_long = resize, int(resize * long / short)
  new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
  if (new_h, new_w) != (h, w):
    img = img.resize((new_w, new_h), PIL.Image.BILINEAR)
  top = int(round((new_h - crop) / 2.0))
  left = int(round((new_w - crop) / 2.0))
  out = np.asarray(img.crop((left, top, left + crop, top + crop)))
  return out.reshape(crop, crop, -1)


def _real_torchvision():
  try:
    import torchvision.transforms as T  # pylint: disable=g-import-not-at-top
  except Exception:  # pylint: disable=broad-except
    # Missing, or a CUDA build beside the CPU torch (its C ops fail to load).
    return None
  return T


def _all(batches):
  images, labels = zip(*batches)
  return np.concatenate(images), np.concatenate(labels)


@pytest.mark.parametrize("pre", [RGB224, GRAY28], ids=["rgb224", "gray28"])
def test_pixels_equal_torchvision_on_real_jpegs(jpeg_folder, pre):
  source = data.ImageFolderSource(jpeg_folder)
  images, _ = _all(data.image_batches(source, pre, batch_size=4, workers=2))
  assert images.dtype == np.uint8
  assert images.shape == (6, pre.image_size, pre.image_size, pre.channels)
  for image, path in zip(images, source.paths):
    want = _torchvision_reference(path, pre.resize_size, pre.image_size, pre.mode)
    np.testing.assert_array_equal(image, want, err_msg=path)
  T = _real_torchvision()
  if T is not None:
    steps = [T.Resize(pre.resize_size), T.CenterCrop(pre.image_size)]
    if pre.channels == 1:
      steps.insert(0, T.Grayscale(1))
    for image, path in zip(images, source.paths):
      with PIL.Image.open(path) as pil:
        want = np.asarray(T.Compose(steps)(pil.convert("RGB")))
      np.testing.assert_array_equal(image, want.reshape(image.shape), err_msg=path)


def test_real_cifar10_jpegs_equal_the_reference():
  root = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                      "cifar10", "test")
  if not os.path.isdir(root):
    pytest.skip(f"{root} absent (the shared CIFAR-10 JPEGs are not in a clone)")
  # Only the first file of each class: listing all 10,000 is enough work.
  source = data.ImageFolderSource(root)
  firsts = [int(np.argmax(source.labels == c)) for c in range(len(source.classes))]
  pre = data.Preprocess(24, 27, 3)  # A resize that changes pixels.
  for i in firsts:
    image, label = pre(source[i])
    assert label == source.labels[i]
    np.testing.assert_array_equal(
        image, _torchvision_reference(source.paths[i], 27, 24, "RGB"))


def test_pipeline_equals_the_old_single_threaded_loader(jpeg_folder):
  for gray, pre in ((False, RGB224), (True, GRAY28)):
    old = legacy_loaders.load_image_folder(jpeg_folder, pre.image_size,
                                 resize_size=pre.resize_size, grayscale=gray)
    new, _ = _all(data.image_batches(data.ImageFolderSource(jpeg_folder), pre,
                                     batch_size=5, workers=2))
    np.testing.assert_array_equal(new, old)


def test_fast_decode_is_opt_in_and_close(jpeg_folder):
  assert not data.Preprocess(28).fast_decode
  source = data.ImageFolderSource(jpeg_folder)
  exact, _ = _all(data.image_batches(source, GRAY28, batch_size=6, workers=1))
  fast, _ = _all(data.image_batches(
      source, data.Preprocess(28, 28, 1, fast_decode=True), batch_size=6, workers=1))
  assert fast.shape == exact.shape
  assert not np.array_equal(fast, exact)  # draft() does change pixels...
  diff = np.abs(fast.astype(int) - exact.astype(int))
  assert diff.mean() < 8  # ...but little, on average.


def _tiny_folder(root, classes=("b", "a", "c"), per_class=(2, 3, 1), size=(9, 7)):
  rng = np.random.default_rng(1)
  for name, count in zip(classes, per_class):
    (root / name).mkdir(parents=True)
    for i in range(count):
      pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
      PIL.Image.fromarray(pixels).save(root / name / f"{i}.png")
  return root


def test_labels_from_sorted_class_folders(tmp_path):
  root = _tiny_folder(tmp_path)
  (root / "a" / "nested").mkdir()
  PIL.Image.new("RGB", (5, 5)).save(root / "a" / "nested" / "x.BMP")  # Upper case.
  (root / "a" / "notes.txt").write_text("not an image")
  PIL.Image.new("RGB", (5, 5)).save(root / "loose.png")  # Ignored, as torchvision.
  source = data.ImageFolderSource(root)
  assert source.classes == ("a", "b", "c")
  assert list(source.labels) == [0, 0, 0, 0, 1, 1, 2]
  assert [os.path.relpath(p, root) for p in source.paths] == [
      "a/0.png", "a/1.png", "a/2.png", "a/nested/x.BMP", "b/0.png", "b/1.png", "c/0.png"]
  _, labels = _all(data.image_batches(source, data.Preprocess(4), batch_size=3))
  assert labels.dtype == np.int32 and list(labels) == list(source.labels)


def test_flat_folder_is_unlabelled(tmp_path):
  for i, ext in enumerate(["jpg", "JPEG", "png", "gif", "webp", "tiff", "bmp"]):
    PIL.Image.new("RGB", (6, 8), (i, 0, 0)).save(tmp_path / f"{i}.{ext}", lossless=True)
  source = data.ImageFolderSource(tmp_path)
  assert source.classes == () and len(source) == 7
  images, labels = _all(data.image_batches(source, data.Preprocess(6), batch_size=4))
  assert images.shape == (7, 6, 6, 3) and np.all(labels == data.NO_LABEL)
  # Lossless formats keep the colour; sorted names give the order.
  np.testing.assert_array_equal(images[2:, 0, 0, 0], [2, 3, 4, 5, 6])


def test_order_is_deterministic_for_any_worker_count(jpeg_folder):
  source = data.ImageFolderSource(jpeg_folder)
  runs = [_all(data.image_batches(source, GRAY28, batch_size=4, workers=w, prefetch=p))
          for w, p in ((0, None), (1, 1), (2, 3), (2, None), (7, 2))]
  for images, labels in runs[1:]:
    np.testing.assert_array_equal(images, runs[0][0])
    np.testing.assert_array_equal(labels, runs[0][1])


@pytest.mark.parametrize("batch_size", [1, 3, 4, 7, 64])
@pytest.mark.parametrize("workers", [0, 2, 5])
def test_last_partial_batch_is_kept(batch_size, workers):
  # Batches are decoded in chunks per thread; whatever the cut, they come
  # back whole and in order.
  source = data.ArraySource(np.arange(11 * 4, dtype=np.uint8).reshape(11, 2, 2, 1))
  batches = data.image_batches(source, data.Preprocess(channels=1), batch_size=batch_size,
                               workers=workers)
  sizes = [batch_size] * (11 // batch_size) + ([11 % batch_size] if 11 % batch_size else [])
  assert len(batches) == len(sizes)
  assert [b[0].shape[0] for b in batches] == sizes
  np.testing.assert_array_equal(_all(batches)[0], source.images)


def test_position_resumes_exactly_the_remaining_batches(tmp_path):
  root = _tiny_folder(tmp_path, classes=("x", "y"), per_class=(6, 5))
  batches = data.image_batches(data.ImageFolderSource(root), data.Preprocess(5),
                               batch_size=3, workers=2)
  full = list(batches)
  for consumed in range(len(full) + 1):
    iterator = batches.iterator()
    for _ in range(consumed):
      next(iterator)
    position = json.loads(json.dumps(batches.position(iterator)))  # As saved.
    assert position["next_record"] == min(3 * consumed, 11)
    rest = list(batches.iterator(position))
    assert len(rest) == len(full) - consumed
    for (gi, gl), (wi, wl) in zip(rest, full[consumed:]):
      np.testing.assert_array_equal(gi, wi)
      np.testing.assert_array_equal(gl, wl)
  other = data.image_batches(data.ImageFolderSource(root), data.Preprocess(5), batch_size=4)
  with pytest.raises(ValueError, match="another stream"):
    other.iterator(position)
  with pytest.raises(ValueError, match="not between two batches"):
    batches.iterator({**position, "next_record": 4})


@pytest.mark.parametrize("mode", ["contiguous", "strided"])
@pytest.mark.parametrize("n, count", [(10, 3), (7, 7), (5, 8), (1000, 4)])
def test_process_shards_cover_every_record_once(mode, n, count):
  source = data.ArraySource(np.zeros((n, 1, 1), np.uint8), np.arange(n))
  shards = []
  for index in range(count):
    batches = data.image_batches(source, data.Preprocess(channels=1), batch_size=3,
                                 shard=mode, process_index=index, process_count=count)
    labels = [] if batches.num_records == 0 else list(_all(batches)[1])
    assert len(labels) == batches.num_records
    shards.append(labels)
  assert sorted(sum(shards, [])) == list(range(n))
  sizes = [len(s) for s in shards]
  assert max(sizes) - min(sizes) <= 1
  if mode == "contiguous":
    assert sum(shards, []) == list(range(n))
  else:
    assert shards[0] == list(range(0, n, count))


def test_default_shard_is_this_jax_process():
  source = data.ArraySource(np.zeros((6, 1, 1), np.uint8), np.arange(6))
  batches = data.image_batches(source, data.Preprocess(channels=1), batch_size=4,
                               shard="strided")
  assert jax.process_count() == 1 and batches.num_records == 6
  with pytest.raises(ValueError, match="shard must be"):
    data.image_batches(source, data.Preprocess(channels=1), batch_size=4, shard="rows")
  with pytest.raises(ValueError, match="out of range"):
    data.image_batches(source, data.Preprocess(channels=1), batch_size=4,
                       shard="strided", process_index=2, process_count=2)


def test_seeded_shuffle_is_a_fixed_permutation():
  source = data.ArraySource(np.zeros((50, 1, 1), np.uint8), np.arange(50))
  pre = data.Preprocess(channels=1)
  first = _all(data.image_batches(source, pre, batch_size=8, seed=3))[1]
  again = _all(data.image_batches(source, pre, batch_size=8, seed=3, workers=1))[1]
  other = _all(data.image_batches(source, pre, batch_size=8, seed=4))[1]
  np.testing.assert_array_equal(first, again)
  assert sorted(first) == list(range(50)) and list(first) != list(range(50))
  assert list(other) != list(first)


def test_array_source_channels_are_converted_by_pillow():
  rgb = np.random.default_rng(2).integers(0, 256, (3, 5, 6, 3), dtype=np.uint8)
  gray, _ = _all(data.image_batches(data.ArraySource(rgb), data.Preprocess(channels=1),
                                    batch_size=3))
  want = np.stack([np.asarray(PIL.Image.fromarray(x).convert("L")) for x in rgb])
  np.testing.assert_array_equal(gray[..., 0], want)
  back, _ = _all(data.image_batches(data.ArraySource(want), data.Preprocess(channels=3),
                                    batch_size=3))
  np.testing.assert_array_equal(back, np.repeat(want[..., None], 3, axis=-1))


def test_npy_source_is_memory_mapped(tmp_path):
  images = np.random.default_rng(3).integers(0, 256, (5, 8, 8), dtype=np.uint8)
  np.save(tmp_path / "images.npy", images)
  np.save(tmp_path / "labels.npy", np.arange(5, dtype=np.int64))
  source = data.npy_source(tmp_path)
  assert isinstance(source.images, np.memmap)
  got, labels = _all(data.image_batches(source, data.Preprocess(channels=1), batch_size=2))
  np.testing.assert_array_equal(got[..., 0], images)
  np.testing.assert_array_equal(labels, np.arange(5))
  os.remove(tmp_path / "labels.npy")
  assert list(data.npy_source(tmp_path).labels) == [-1] * 5


def test_fashion_mnist_source_reads_idx_files(tmp_path):
  images = np.random.default_rng(4).integers(0, 256, (7, 28, 28), dtype=np.uint8)
  data.write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
  data.write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.arange(7, dtype=np.uint8))
  source = data.fashion_mnist_source("test", tmp_path)
  got, labels = _all(data.image_batches(source, data.Preprocess(channels=1), batch_size=4))
  np.testing.assert_array_equal(got[..., 0], images)
  np.testing.assert_array_equal(labels, np.arange(7))
  with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
    data.fashion_mnist_source("train", tmp_path)


def test_tfds_source_under_mock_data():
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=5):
    source = data.TfdsSource("fashion_mnist", "test")
    want = [source[i] for i in range(5)]
    got, labels = _all(data.image_batches(source, data.Preprocess(channels=1), batch_size=2))
  np.testing.assert_array_equal(got, np.stack([w[0] for w in want]))
  np.testing.assert_array_equal(labels, [w[1] for w in want])
  with tfds.testing.mock_data(num_examples=3):  # Images of varying sizes.
    source = data.TfdsSource("dtd", "test")
    got, _ = _all(data.image_batches(source, data.Preprocess(16, 20), batch_size=2))
  assert got.shape == (3, 16, 16, 3)


def test_prefetch_to_device_keeps_order_and_values():
  batches = [(np.full((2, 3), i, np.uint8), np.arange(2) + i) for i in range(5)]
  for size in (1, 2, 9):
    got = list(data.prefetch_to_device(batches, size))
    assert len(got) == 5 and isinstance(got[0][0], jax.Array)
    for (gi, gl), (wi, wl) in zip(got, batches):
      np.testing.assert_array_equal(gi, wi)
      np.testing.assert_array_equal(gl, wl)
  with pytest.raises(ValueError, match="size"):
    list(data.prefetch_to_device(batches, 0))


def test_folder_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    data.ImageFolderSource(tmp_path / "missing")
  with pytest.raises(ValueError, match="no image file"):
    data.ImageFolderSource(tmp_path)
  (tmp_path / "notes.txt").write_text("x")
  with pytest.raises(ValueError, match="no image file"):
    data.ImageFolderSource(tmp_path)
  root = _tiny_folder(tmp_path / "set", classes=("a", "b"), per_class=(1, 1))
  (root / "empty").mkdir()
  with pytest.raises(ValueError, match=r"\['empty'\].*no image"):
    data.ImageFolderSource(root)
  with pytest.raises(ValueError, match="no class subfolder"):
    data.ImageFolderSource(root / "a", flat=False)


def test_corrupt_image_names_the_file(tmp_path):
  root = _tiny_folder(tmp_path, classes=("a",), per_class=(3,))
  (root / "a" / "1.png").write_bytes(b"not a png at all")
  good = root / "a" / "2.png"
  truncated = root / "a" / "3.jpg"
  PIL.Image.open(good).convert("RGB").resize((64, 64)).save(truncated)
  truncated.write_bytes(truncated.read_bytes()[:200])
  for workers in (0, 2):
    batches = data.image_batches(data.ImageFolderSource(root), data.Preprocess(4),
                                 batch_size=2, workers=workers)
    with pytest.raises(ValueError, match=r"cannot decode image file .*1\.png"):
      list(batches)
  with pytest.raises(ValueError, match=r"cannot decode image file .*3\.jpg"):
    data.Preprocess(4)(data.ImageFolderSource(root)[3])


def test_npy_and_array_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    data.npy_source(tmp_path / "missing")
  with pytest.raises(FileNotFoundError, match="images.npy"):
    data.npy_source(tmp_path)
  np.save(tmp_path / "images.npy", np.zeros((4, 3, 3), np.float32))
  with pytest.raises(ValueError, match=r"images\.npy has dtype float32; expected uint8"):
    data.npy_source(tmp_path)
  with open(tmp_path / "images.npy", "wb") as f:  # An object array's header, no pickle.
    np.lib.format.write_array_header_1_0(
        f, {"descr": "|O", "fortran_order": False, "shape": (2,)})
  with pytest.raises(ValueError, match="without pickle"):
    data.npy_source(tmp_path)
  np.save(tmp_path / "images.npy", np.zeros((4, 3, 3), np.uint8))
  np.save(tmp_path / "labels.npy", np.zeros(3, np.int64))
  with pytest.raises(ValueError, match="one label per image"):
    data.npy_source(tmp_path)
  np.save(tmp_path / "labels.npy", np.zeros(4, np.float32))
  with pytest.raises(ValueError, match="labels must be integers"):
    data.npy_source(tmp_path)
  with pytest.raises(ValueError, match="no image"):
    data.ArraySource(np.zeros((0, 2, 2), np.uint8))
  with pytest.raises(ValueError, match="shape"):
    data.ArraySource(np.zeros((4, 2), np.uint8))


def test_argument_errors():
  source = data.ArraySource(np.zeros((2, 2, 2), np.uint8))
  with pytest.raises(ValueError, match="channels"):
    data.Preprocess(channels=2)
  with pytest.raises(ValueError, match="needs image_size"):
    data.Preprocess(resize_size=32)
  with pytest.raises(ValueError, match="batch_size"):
    data.image_batches(source, data.Preprocess(), batch_size=0)
  with pytest.raises(ValueError, match="workers"):
    data.image_batches(source, data.Preprocess(), batch_size=1, workers=-1)


def test_workers_default_to_the_cpu_count_and_prefetch_to_two_batches():
  batches = data.image_batches(data.ArraySource(np.zeros((2, 2, 2), np.uint8)),
                               data.Preprocess(channels=1), batch_size=1)
  options = batches.dataset._parent._read_options  # pylint: disable=protected-access
  assert options.num_threads == os.cpu_count()
  assert options.prefetch_buffer_size == 2 * batches.chunks.per_batch  # Two batches.
  assert distributed.SHARD_MODES == ("contiguous", "strided")
