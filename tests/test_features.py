"""line_jax.features: batched extraction equals one direct model.apply."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from benchmarks import legacy_loaders
from line_jax import features
from line_jax import scorers
from line_jax.models import get_model

MEAN, STD = (0.286,), (0.353,)


@pytest.fixture(scope="module")
def tiny():
  model = get_model("resnet_small", 10, num_filters=4)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  images = np.random.default_rng(0).integers(0, 256, (37, 28, 28, 1), dtype=np.uint8)
  x = (images.astype(np.float32) / 255 - np.float32(MEAN[0])) / np.float32(STD[0])
  logits, feats = model.apply(variables, jnp.asarray(x))
  return model, variables, images, np.asarray(logits), np.asarray(feats)


def test_extract_equals_direct_apply_with_padded_last_batch(tiny):
  model, variables, images, logits, feats = tiny
  # 37 = 2 x 16 + 5: the last batch is padded to 16 and the padding dropped.
  got_logits, got_feats = features.extract(model, variables, images, mean=MEAN, std=STD,
                                           batch_size=16, progress=False)
  assert got_logits.dtype == np.float32 and got_feats.dtype == np.float32
  assert got_logits.shape == (37, 10) and got_feats.shape == (37, 16)
  np.testing.assert_allclose(got_logits, logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got_feats, feats, rtol=1e-5, atol=1e-5)


def test_extract_on_a_one_device_mesh(tiny):
  model, variables, images, logits, feats = tiny
  mesh = Mesh(np.array(jax.devices()[:1]), ("batch",))
  got_logits, got_feats = features.extract(model, variables, images, mean=MEAN, std=STD,
                                           batch_size=16, mesh=mesh, progress=False)
  np.testing.assert_allclose(got_logits, logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got_feats, feats, rtol=1e-5, atol=1e-5)


def test_iter_extract_batches_and_bfloat16(tiny):
  model, variables, images, _, feats = tiny
  sizes = [f.shape[0] for _, f in features.iter_extract(
      model, variables, images, mean=MEAN, std=STD, batch_size=16, progress=False)]
  assert sizes == [16, 16, 5]
  _, low = features.extract(model, variables, images, mean=MEAN, std=STD,
                            dtype=jnp.bfloat16, progress=False)
  assert low.dtype == np.float32
  np.testing.assert_allclose(low, feats, rtol=0.1, atol=0.05)


def test_feature_batches_feed_fit_from_batches(tiny):
  model, variables, images, _, feats = tiny
  labels = np.arange(37) % 10
  kernel = variables["params"]["fc"]["kernel"]
  bias = variables["params"]["fc"]["bias"]
  batches = [(images[i:i + 16], labels[i:i + 16]) for i in range(0, 37, 16)]
  stream = features.Backbone(model, variables, MEAN, STD).stream(batches)
  # Re-iterable: ReAct reads it twice.
  react = scorers.get("react")
  streamed = react.fit_from_batches(stream, kernel, bias)
  direct = react.fit(feats, labels, kernel, bias)
  np.testing.assert_allclose(streamed.threshold, direct.threshold, rtol=1e-5)


def test_bad_inputs(tiny):
  model, variables, images, _, _ = tiny
  with pytest.raises(ValueError, match="uint8"):
    features.extract(model, variables, images.astype(np.float32), mean=MEAN, std=STD)
  with pytest.raises(ValueError, match="channels"):
    features.extract(model, variables, images, mean=(0.1, 0.2), std=(1.0, 1.0))
  with pytest.raises(ValueError, match=r"\[N, H, W, C\]"):
    features.extract(model, variables, images[..., 0], mean=MEAN, std=STD)
  mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
  with pytest.raises(ValueError, match="'batch' axis"):
    features.extract(model, variables, images, mean=MEAN, std=STD, mesh=mesh)
  with pytest.raises(ValueError, match="empty"):
    features.extract(model, variables, images[:0], mean=MEAN, std=STD)


def _pipeline(images, labels, batch_size, **kwargs):
  from line_jax import data  # pylint: disable=g-import-not-at-top
  return data.image_batches(data.ArraySource(images, labels), data.Preprocess(channels=1),
                            batch_size=batch_size, **kwargs)


def test_iter_extract_batches_over_the_pipeline_pads_and_compiles_once(tiny):
  model, variables, images, logits, feats = tiny
  labels = np.arange(37) % 10
  batches = _pipeline(images, labels, 16, workers=2)
  before = features._extract._apply.jitted()._cache_size()  # pylint: disable=protected-access
  out = list(features.iter_extract_batches(model, variables, batches, mean=MEAN, std=STD,
                                           progress=False, total=37))
  # One new shape at most (the first batch's): the last one, of 5, is padded.
  assert features._extract._apply.jitted()._cache_size() - before <= 1  # pylint: disable=protected-access
  assert [o[1].shape[0] for o in out] == [16, 16, 5]
  np.testing.assert_allclose(np.concatenate([o[0] for o in out]), logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.concatenate([o[1] for o in out]), feats, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.concatenate([o[2] for o in out]), labels)


def test_iter_extract_batches_passes_positions_through_for_resuming(tiny):
  model, variables, images, _, feats = tiny
  batches = _pipeline(images, None, 8)
  iterator = batches.iterator()

  def with_positions():
    for batch_images, batch_labels in iterator:
      # Taken as the batch is read, before the stream reads ahead.
      yield batch_images, batch_labels, batches.position(iterator)

  out = list(features.iter_extract_batches(model, variables, with_positions(), mean=MEAN,
                                           std=STD, progress=False))
  assert [o[3]["next_record"] for o in out] == [8, 16, 24, 32, 37]
  # Resuming after the second batch gives the rest of the features.
  rest = list(features.iter_extract_batches(model, variables, batches.iterator(out[1][3]),
                                            mean=MEAN, std=STD, progress=False))
  np.testing.assert_allclose(np.concatenate([o[1] for o in rest]), feats[16:],
                             rtol=1e-5, atol=1e-5)


def test_pipeline_features_from_a_jpeg_folder_feed_fit_from_batches(tiny, tmp_path):
  import PIL.Image  # pylint: disable=g-import-not-at-top
  from line_jax import data  # pylint: disable=g-import-not-at-top
  model, variables, _, _, _ = tiny
  rng = np.random.default_rng(5)
  for c in range(3):
    (tmp_path / f"class{c}").mkdir()
    for i in range(7):
      pixels = rng.integers(0, 256, (40, 31, 3), dtype=np.uint8)
      PIL.Image.fromarray(pixels).save(tmp_path / f"class{c}" / f"{i}.jpg")
  batches = data.image_batches(data.ImageFolderSource(tmp_path), data.Preprocess(28, 30, 1),
                               batch_size=8, workers=2)
  stream = features.Backbone(model, variables, MEAN, STD).stream(batches)
  # The same images decoded whole by the old loader, then extracted at once.
  images = legacy_loaders.load_image_folder(tmp_path, 28, resize_size=30, grayscale=True)
  _, direct = features.extract(model, variables, images, mean=MEAN, std=STD, progress=False)
  streamed = list(stream)
  np.testing.assert_allclose(np.concatenate([f for f, _ in streamed]), direct,
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.concatenate([l for _, l in streamed]),
                                np.repeat(np.arange(3), 7))
  kernel = variables["params"]["fc"]["kernel"]
  bias = variables["params"]["fc"]["bias"]
  react = scorers.get("react")  # Reads the stream twice.
  fitted = react.fit_from_batches(stream, kernel, bias)
  expected = react.fit(direct, np.repeat(np.arange(3), 7), kernel, bias)
  np.testing.assert_allclose(fitted.threshold, expected.threshold, rtol=1e-5)


def test_iter_extract_batches_errors(tiny):
  model, variables, images, _, _ = tiny
  grow = [(images[:4],), (images[:8],)]
  with pytest.raises(ValueError, match="first batch must be its largest"):
    list(features.iter_extract_batches(model, variables, grow, mean=MEAN, std=STD,
                                       progress=False))
  with pytest.raises(ValueError, match="uint8"):
    list(features.iter_extract_batches(model, variables, [(images[:4].astype(np.int32),)],
                                       mean=MEAN, std=STD, progress=False))
  with pytest.raises(ValueError, match="channels"):
    list(features.iter_extract_batches(model, variables, [(images[:4],)], mean=(0.1, 0.2),
                                       std=(1.0, 1.0), progress=False))
  assert list(features.iter_extract_batches(model, variables, [], mean=MEAN, std=STD,
                                            progress=False)) == []


def test_a_list_of_hwc_images_is_stacked(tiny):
  model, variables, images, logits, feats = tiny
  got_logits, got_feats = features.extract(model, variables, list(images), mean=MEAN,
                                           std=STD, batch_size=16, progress=False)
  np.testing.assert_allclose(got_logits, logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got_feats, feats, rtol=1e-5, atol=1e-5)
  out = list(features.iter_extract_batches(model, variables, [(list(images[:4]),)],
                                           mean=MEAN, std=STD, progress=False))
  np.testing.assert_allclose(out[0][1], feats[:4], rtol=1e-5, atol=1e-5)


def test_a_list_that_cannot_be_stacked_is_named(tiny):
  model, variables, images, _, _ = tiny
  mixed = [images[0], images[1, :20]]
  with pytest.raises(ValueError, match=r"images is a list of 2 arrays of shape "
                     r"\[\(20, 28, 1\), \(28, 28, 1\)\].*one shape"):
    features.extract(model, variables, mixed, mean=MEAN, std=STD, progress=False)
  with pytest.raises(ValueError, match=r"a tuple of 2 arrays of shape \(28, 28\)"):
    features.extract(model, variables, (images[0, ..., 0],) * 2, mean=MEAN, std=STD)
  with pytest.raises(ValueError, match="empty list"):
    features.extract(model, variables, [], mean=MEAN, std=STD)


def test_channels_first_images_get_a_transpose_hint(tiny):
  model, variables, images, _, _ = tiny
  rgb = np.repeat(images[:4], 3, axis=-1).transpose(0, 3, 1, 2)  # [4, 3, 28, 28].
  with pytest.raises(ValueError, match=r"28 channels but mean/std have 3; shape "
                     r"\(4, 3, 28, 28\) looks like NCHW.*x\.transpose\(0, 2, 3, 1\)"):
    features.extract(model, variables, rgb, mean=(0.5,) * 3, std=(0.5,) * 3)
  with pytest.raises(ValueError, match="NCHW"):
    list(features.iter_extract_batches(model, variables, [(rgb,)], mean=(0.5,) * 3,
                                       std=(0.5,) * 3, progress=False))
  with pytest.raises(ValueError, match="channels") as e:  # No NCHW look: no hint.
    features.extract(model, variables, images, mean=(0.1, 0.2), std=(1.0, 1.0))
  assert "NCHW" not in str(e.value)
  with pytest.raises(ValueError, match=r"got shape \(28, 28, 1\); one image\? .*x\[None\]"):
    features.extract(model, variables, images[0], mean=MEAN, std=STD)


def test_pipeline_with_skipped_images_streams_the_good_ones(tiny, tmp_path):
  import PIL.Image  # pylint: disable=g-import-not-at-top
  from line_jax import data  # pylint: disable=g-import-not-at-top
  model, variables, images, _, feats = tiny
  for i in range(9):
    PIL.Image.fromarray(images[i, ..., 0]).save(tmp_path / f"{i}.png")
  (tmp_path / "0.png").write_text("not a png")  # In the first batch: it comes out short.
  batches = data.image_batches(data.ImageFolderSource(tmp_path), data.Preprocess(channels=1),
                               batch_size=4, workers=2, skip_bad_images=True)
  stream = features.Backbone(model, variables, MEAN, STD).stream(batches)
  with pytest.warns(UserWarning, match=r"0\.png"):
    streamed = list(stream)
  assert [f.shape[0] for f, _ in streamed] == [3, 4, 1]
  np.testing.assert_allclose(np.concatenate([f for f, _ in streamed]), feats[1:9],
                             rtol=1e-5, atol=1e-5)
  assert [s.index for s in batches.skipped] == [0]
