"""line_jax.features: batched extraction equals one direct model.apply."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

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
  stream = features.FeatureBatches(model, variables, images, MEAN, STD, labels,
                                    {"batch_size": 16, "progress": False})
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
