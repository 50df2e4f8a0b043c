"""Features come from a network in inference mode, with its call's arguments.

An NNX module left in training mode, or a Linen call given `train=True`,
would give features that change with the batch (dropout, batch statistics):
refused before any batch runs. A call that requires an argument (`train`)
gets it from `apply_kwargs`, and says so where it is missing.
"""

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from line_jax import data
from line_jax import features
from line_jax import models

pytestmark = pytest.mark.filterwarnings("error")

MEAN, STD = (0.5,), (0.25,)
TRAIN = {"train": False}
NNX_TRAINING = (r"NnxNet is in training mode: block/bn1 \(BatchNorm: use_running_average=False\), "
                r"dropout \(Dropout: deterministic=False\)\..*call model\.eval\(\)")
MISSING_TRAIN = (r"TrainArg requires the argument 'train', which apply_kwargs does not give: "
                 r"pass apply_kwargs=\{'train': False\}")


class Block(nnx.Module):

  def __init__(self, rngs):
    self.bn1 = nnx.BatchNorm(4, rngs=rngs)


class NnxNet(nnx.Module):
  """Conv, a nested BatchNorm, Dropout, then the head `fc`."""

  def __init__(self, rngs):
    self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
    self.block = Block(rngs)
    self.dropout = nnx.Dropout(0.5, rngs=rngs)
    self.fc = nnx.Linear(4, 3, rngs=rngs)

  def __call__(self, x):
    h = jnp.mean(nnx.relu(self.block.bn1(self.conv(x))), axis=(1, 2))
    return self.fc(self.dropout(h))


class TrainArg(nn.Module):
  """A user's Linen CNN whose `__call__(x, train)` requires `train`."""

  @nn.compact
  def __call__(self, x, train):
    x = nn.BatchNorm(use_running_average=not train)(nn.Conv(4, (3, 3))(x))
    x = nn.Dropout(0.5, deterministic=not train)(jnp.mean(nn.relu(x), axis=(1, 2)))
    return nn.Dense(3, name="fc")(x)


def _images(n=11, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, 8, 8, 1), dtype=np.uint8)


def _x(images):
  return jnp.asarray((images.astype(np.float32) / 255 - np.float32(MEAN[0])) / np.float32(STD[0]))


def _close(got, want):
  # XLA:CPU float32 is not bit-identical across batch shapes: a few ulps.
  want = np.asarray(want)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))


@pytest.fixture(scope="module")
def linen():
  model = TrainArg()
  return model, model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), train=False)


# --- NNX: train mode refused, eval mode taken ---------------------------------------------------


def _batches(pulled):
  pulled.append(True)  # Reached only when the loop pulls its first batch.
  yield (_images(4),)


@pytest.mark.parametrize("entry", ["feature_apply", "extract", "iter_extract_batches", "run"])
def test_nnx_in_training_mode_is_refused_naming_its_layers_before_any_batch(entry):
  model, pulled = NnxNet(nnx.Rngs(0)), []
  call = {
      "feature_apply": lambda: models.feature_apply(model, None, head="fc"),
      "extract": lambda: features.extract(model, None, _images(), mean=MEAN, std=STD,
                                          head="fc", progress=False),
      "iter_extract_batches": lambda: next(features.iter_extract_batches(
          model, None, _batches(pulled), mean=MEAN, std=STD, head="fc", progress=False)),
      "run": lambda: next(features.Backbone(model, None, MEAN, STD, head="fc").run(
          _batches(pulled))),
  }[entry]
  with pytest.raises(ValueError, match=NNX_TRAINING):
    call()
  assert not pulled


def test_nnx_error_names_only_the_layers_still_in_training_mode():
  model = NnxNet(nnx.Rngs(0))
  model.eval()
  model.dropout.deterministic = False
  only_dropout = r"training mode: dropout \(Dropout: deterministic=False\)\."
  with pytest.raises(ValueError, match=only_dropout):
    models.feature_apply(model, None, head="fc")


def test_nnx_after_eval_gives_features_independent_of_the_batch():
  model = NnxNet(nnx.Rngs(0))
  model.eval()
  images = _images()
  run = lambda size: features.extract(model, None, images, mean=MEAN, std=STD, head="fc",
                                      batch_size=size, progress=False)
  (logits4, feats4), (logits11, feats11) = run(4), run(11)
  _close(feats4, feats11)
  _close(logits4, logits11)
  _close(logits11, model(_x(images)))
  assert model.block.bn1.use_running_average and model.dropout.deterministic


# --- Linen: apply_kwargs ----------------------------------------------------------------------


def test_linen_required_train_is_given_by_apply_kwargs(linen):
  model, variables = linen
  images = _images()
  apply, same = models.feature_apply(model, variables, head="fc", apply_kwargs=TRAIN)
  logits, feats = apply(same, _x(images))
  _close(logits, model.apply(variables, _x(images), train=False))
  kernel, bias = models.head_params(variables, head="fc")
  _close(feats @ kernel + bias, logits)
  # Equal arguments, equal applies: callers share one compilation.
  again = models.feature_apply(model, variables, head="fc", apply_kwargs=dict(TRAIN))[0]
  assert again == apply and hash(again) == hash(apply)
  # An apply built with its kwargs goes through the extraction loop as it is.
  got = features.extract(apply, variables, images, mean=MEAN, std=STD, batch_size=4,
                         progress=False)
  _close(got[1], feats)
  with pytest.raises(ValueError, match="already set: pass head=None"):
    models.feature_apply(apply, variables, head="fc")
  backbone = features.Backbone(model, variables, MEAN, STD, head="fc", apply_kwargs=TRAIN)
  run = list(backbone.run([(images[:4],), (images[4:8],), (images[8:],)]))
  _close(np.concatenate([f for _, f in run]), feats)  # Batches of 4 against one of 11.


def test_linen_without_the_required_train_says_which_argument(linen):
  model, variables = linen
  with pytest.raises(ValueError, match=MISSING_TRAIN):
    features.extract(model, variables, _images(), mean=MEAN, std=STD, head="fc",
                     progress=False)
  with pytest.raises(ValueError, match=MISSING_TRAIN):
    next(features.Backbone(model, variables, MEAN, STD, head="fc").run([(_images(),)]))


@pytest.mark.parametrize("kwargs,message", [
    ({"train": True}, r"apply_kwargs train=True runs TrainArg in training mode and would update "
                      r"its batch_stats.*pass apply_kwargs=\{'train': False\}"),
    ({"train": False, "trian": 1}, r"TrainArg takes no argument 'trian' \(apply_kwargs\); it "
                                   r"takes \['train'\]"),
    ({"train": np.asarray(False)}, r"must be hashable .*got train: ndarray"),
])
def test_linen_apply_kwargs_refused(linen, kwargs, message):
  model, variables = linen
  with pytest.raises(ValueError, match=message):
    models.feature_apply(model, variables, head="fc", apply_kwargs=kwargs)
  with pytest.raises(ValueError, match=message):
    next(features.Backbone(model, variables, MEAN, STD, head="fc",
                           apply_kwargs=kwargs).run([(_images(),)]))


def test_apply_kwargs_must_be_a_mapping(linen):
  model, variables = linen
  with pytest.raises(TypeError, match=r"apply_kwargs must map argument names to values"):
    models.feature_apply(model, variables, head="fc", apply_kwargs=[("train", False)])
  with pytest.raises(TypeError, match=r"apply_kwargs must be a mapping, .* got list"):
    features.Backbone(model, variables, MEAN, STD, head="fc", apply_kwargs=[("train", False)])


def test_a_functions_keyword_arguments():

  def fn(variables, x, *, scale):
    del variables
    pooled = x.mean(axis=(1, 2))
    return pooled * scale, pooled

  logits, feats = features.Backbone(fn, None, MEAN, STD, apply_kwargs={"scale": 2.0}).run(
      [(_images(),)]).__next__()
  _close(logits, 2 * feats)
  with pytest.raises(ValueError, match=r"fn requires the argument 'scale'.*\{'scale': \.\.\.\}"):
    models.feature_apply(fn, None)


def test_backbone_key_changes_with_apply_kwargs(linen):
  model, variables = linen
  given = dict(TRAIN)
  key = lambda kwargs: features.Backbone(model, variables, MEAN, STD, data.Preprocess(8, None, 1),
                                         head="fc", apply_kwargs=kwargs)
  backbone = key(given)
  given["train"] = True  # The backbone holds its own copy.
  assert backbone.apply_kwargs == TRAIN and backbone.key == key(TRAIN).key
  # No kwargs, or none given, is the key a backbone had before apply_kwargs.
  assert key(None).key == key({}).key
  keys = {key(None).key, key(TRAIN).key, key({"deterministic": False}).key,
          key({"train": 0}).key}
  assert len(keys) == 4
