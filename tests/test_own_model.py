"""Your own model: any Linen or NNX module by its head's name, or an apply function.

The head's input is the features and its output the logits, so the logits the
scorers recompute from `head_params` are the ones `extract` returns.
"""

import functools

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from line_jax import features
from line_jax import models
from line_jax import scorers

pytestmark = pytest.mark.filterwarnings("error")

MEAN, STD = (0.5,), (0.25,)


class Head(nn.Module):
  classes: int = 3

  @nn.compact
  def __call__(self, x):
    return nn.Dense(self.classes, name="fc")(x)


class SmallCNN(nn.Module):
  """A user's CNN: returns only logits, its head nested as `head/fc`."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(6, (3, 3))(x))
    x = jnp.mean(x, axis=(1, 2))
    x = nn.relu(nn.Dense(5)(x))
    return Head(name="head")(x)


class DictOut(nn.Module):
  """Returns a dict, calls its head by keyword, and checkpoints a block (lifted)."""

  @nn.compact
  def __call__(self, x):
    x = nn.remat(nn.Conv)(4, (3, 3), name="stem")(x)
    x = jnp.mean(nn.relu(x), axis=(1, 2))
    return {"logits": nn.Dense(3, name="classifier")(inputs=x), "aux": x}


class TwoHeads(nn.Module):

  @nn.compact
  def __call__(self, x):
    fc = nn.Dense(3, name="fc")
    x = jnp.mean(x, axis=(1, 2))
    return fc(fc(x))


class NnxCNN(nnx.Module):

  def __init__(self, rngs, pair=False):
    self.conv = nnx.Conv(1, 6, (3, 3), rngs=rngs)
    self.layers = nnx.List([nnx.Linear(6, 5, rngs=rngs), nnx.Linear(5, 3, rngs=rngs)])
    self.pair = pair

  def __call__(self, x):
    h = jnp.mean(nnx.relu(self.conv(x)), axis=(1, 2))
    h = nnx.relu(self.layers[0](h))
    logits = self.layers[1](h)
    return (logits, h) if self.pair else logits


def _images(n=11, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, 8, 8, 1), dtype=np.uint8)


def _x(images):
  return (images.astype(np.float32) / 255 - np.float32(MEAN[0])) / np.float32(STD[0])


def _close(got, want):
  """`got` equals `want` to float32 rounding, relative to `want`'s largest value."""
  # XLA:CPU float32 is not bit-identical across batch shapes or programs (other
  # tiling, fusion, summation order: 1.4e-6 seen), so a few ulps, not bit for bit.
  want = np.asarray(want)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))


def _penultimate(model, variables, x):
  """The reference: the CNN's forward pass written out by hand."""
  p = variables["params"]
  h = nn.relu(nn.Conv(6, (3, 3)).apply({"params": p["Conv_0"]}, x)).mean(axis=(1, 2))
  return np.asarray(nn.relu(h @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]))


@pytest.fixture(scope="module")
def cnn():
  model = SmallCNN()
  variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
  return model, variables


def test_linen_head_input_is_the_features_and_its_output_the_logits(cnn):
  model, variables = cnn
  images = _images()
  logits, feats = features.extract(model, variables, images, mean=MEAN, std=STD,
                                   head="head/fc", batch_size=4, progress=False)
  assert logits.shape == (11, 3) and feats.shape == (11, 5)
  _close(feats, _penultimate(model, variables, _x(images)))  # Batches of 4 against 11.
  _close(logits, model.apply(variables, _x(images)))
  kernel, bias = models.head_params(variables, head="head/fc")
  assert kernel.shape == (5, 3) and bias.shape == (3,)
  np.testing.assert_allclose(feats @ np.asarray(kernel) + np.asarray(bias), logits,
                             rtol=1e-5, atol=1e-5)


def test_head_extraction_compiles_once_per_model_and_shape(cnn):
  model, variables = cnn
  run = functools.partial(features.extract, model, variables, mean=MEAN, std=STD,
                          head="head/fc", batch_size=4, progress=False)
  run(_images())
  before = features._extract._apply.jitted()._cache_size()  # pylint: disable=protected-access
  run(_images(seed=1))
  run(_images(n=7, seed=2))  # 4 + 3: padded to the same batch shape.
  assert features._extract._apply.jitted()._cache_size() == before  # pylint: disable=protected-access


def test_energy_from_head_features_equals_energy_of_the_models_logits(cnn):
  model, variables = cnn
  logits, feats = features.extract(model, variables, _images(), mean=MEAN, std=STD,
                                   head="head/fc", progress=False)
  kernel, bias = models.head_params(variables, head="head/fc")
  energy = scorers.get("energy")
  state = energy.fit(feats, None, kernel, bias)
  np.testing.assert_allclose(np.asarray(energy.score(state, feats)),
                             np.asarray(jax.nn.logsumexp(logits, axis=1)), rtol=1e-5)


def test_dict_output_keyword_call_and_lifted_transform():
  model = DictOut()
  variables = model.init(jax.random.key(1), jnp.zeros((1, 8, 8, 1)))
  images = _images()
  logits, feats = features.extract(model, variables, images, mean=MEAN, std=STD,
                                   head="classifier", progress=False)
  out = model.apply(variables, _x(images))
  _close(logits, out["logits"])
  _close(feats, out["aux"])


def test_a_backbones_feature_stream_takes_head(cnn):
  model, variables = cnn
  images = _images(n=9)
  labels = np.arange(9) % 3
  _, want = features.extract(model, variables, images, mean=MEAN, std=STD, head="head/fc",
                             progress=False)
  batches = [(images[:4], labels[:4]), (images[4:8], labels[4:8]), (images[8:], labels[8:])]
  backbone = features.Backbone(model, variables, MEAN, STD, head="head/fc")
  got = list(backbone.stream(batches))
  _close(np.concatenate([f for f, _ in got]), want)  # Batches of 4 against one of 9.
  np.testing.assert_array_equal(np.concatenate([l for _, l in got]), labels)
  # Read again: each pass runs the network afresh.
  again = list(backbone.stream(batches))
  _close(np.concatenate([f for f, _ in again]), want)


def test_nnx_module_with_head_and_returning_a_pair():
  model = NnxCNN(nnx.Rngs(0))
  images = _images()
  logits, feats = features.extract(model, None, images, mean=MEAN, std=STD,
                                   head="layers/1", progress=False)
  _close(logits, model(jnp.asarray(_x(images))))  # Jitted against eager.
  kernel, bias = models.head_params(model, head="layers/1")
  np.testing.assert_allclose(feats @ np.asarray(kernel) + np.asarray(bias), logits,
                             rtol=1e-5, atol=1e-5)
  assert type(model.layers[1]) is nnx.Linear  # The caller's module is left as it was.
  pair = NnxCNN(nnx.Rngs(0), pair=True)
  logits2, feats2 = features.extract(pair, None, images, mean=MEAN, std=STD, progress=False)
  _close(logits2, logits)  # Another program: the head recorded, or the pair returned.
  _close(feats2, feats)


def test_plain_apply_function(cnn):
  model, variables = cnn

  def apply(variables, x):
    out = DictOut().apply(variables, x)
    return out["logits"], out["aux"]

  dict_vars = DictOut().init(jax.random.key(1), jnp.zeros((1, 8, 8, 1)))
  want = features.extract(DictOut(), dict_vars, _images(), mean=MEAN, std=STD,
                          head="classifier", progress=False)
  got = features.extract(apply, dict_vars, _images(), mean=MEAN, std=STD, progress=False)
  for g, w in zip(got, want):
    _close(g, w)  # Another program: a function against the head's capture.
  with pytest.raises(ValueError, match="head= needs a Flax module"):
    features.extract(apply, dict_vars, _images(), mean=MEAN, std=STD, head="fc",
                     progress=False)
  with pytest.raises(ValueError, match=r"<lambda> returned a single array .*must return \(logits"):
    features.extract(lambda v, x: model.apply(v, x), variables, _images(), mean=MEAN,
                     std=STD, progress=False)


@pytest.mark.parametrize("head,message", [
    (None, r"SmallCNN returned a single array of shape \(\d+, 3\), not \(logits .*"
           r"pass head=.*'Dense_0' 6x5, 'head/fc' 5x3"),
    ("fc", r"no Dense layer 'fc' in SmallCNN; .*'Dense_0' 6x5, 'head/fc' 5x3"),
    ("Conv_0", r"no Dense layer 'Conv_0'"),
    ("head", r"no Dense layer 'head'"),
])
def test_linen_errors_name_what_is_wrong_and_list_dense_layers(cnn, head, message):
  model, variables = cnn
  with pytest.raises(ValueError, match=message):
    features.extract(model, variables, _images(), mean=MEAN, std=STD, head=head,
                     progress=False)


def test_other_errors(cnn):
  model = DictOut()
  variables = model.init(jax.random.key(1), jnp.zeros((1, 8, 8, 1)))
  with pytest.raises(ValueError, match=r"DictOut returned a dict with keys \['aux', 'logits'\]"):
    features.extract(model, variables, _images(), mean=MEAN, std=STD, progress=False)
  two = TwoHeads()
  v2 = two.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
  with pytest.raises(ValueError, match="called its head 'fc' 2 times"):
    features.extract(two, v2, _images().repeat(3, -1), mean=MEAN * 3, std=STD * 3,
                     head="fc", progress=False)
  with pytest.raises(ValueError, match="pass variables=None"):
    features.extract(NnxCNN(nnx.Rngs(0)), cnn[1], _images(), mean=MEAN, std=STD,
                     head="layers/1", progress=False)
  with pytest.raises(ValueError, match=r"no Dense layer 'fc' in NnxCNN; .*'layers/0' 6x5"):
    features.extract(NnxCNN(nnx.Rngs(0)), None, _images(), mean=MEAN, std=STD, head="fc",
                     progress=False)
  with pytest.raises(TypeError, match="got str"):
    features.extract("resnet18", None, _images(), mean=MEAN, std=STD, progress=False)
  with pytest.raises(ValueError, match="no dtype attribute"):
    features.extract(NnxCNN(nnx.Rngs(0)), None, _images(), mean=MEAN, std=STD,
                     dtype=jnp.bfloat16, head="layers/1", progress=False)
