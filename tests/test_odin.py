"""ODIN against a hand computation on a tiny linear model."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from line_jax import odin

pytestmark = pytest.mark.filterwarnings("error")

W = np.array([[1.0, -2.0, 0.5], [0.0, 1.0, -1.0], [2.0, 0.5, 0.0], [-1.0, 0.0, 1.5]], np.float32)
BIAS = np.array([0.1, -0.2, 0.3], np.float32)
X = np.array([[0.5, -1.0, 2.0, 0.0], [1.0, 1.0, -0.5, 0.25]], np.float32)


def _linear(x):  # images [batch, 2, 2] -> logits [batch, 3]
  return x.reshape(x.shape[0], -1) @ W + BIAS


def _softmax(z):
  e = np.exp(z - z.max(axis=1, keepdims=True))
  return e / e.sum(axis=1, keepdims=True)


def _by_hand(x, temperature, epsilon):
  x = x.astype(np.float64)
  z = x @ W + BIAS
  p = _softmax(z / temperature)
  onehot = np.eye(3)[z.argmax(axis=1)]
  # d(-log p_y)/dx for logits x W + b at temperature T: W (p - onehot) / T.
  grad = (p - onehot) @ W.T / temperature
  perturbed = x - epsilon * np.where(grad >= 0, 1.0, -1.0)
  return _softmax((perturbed @ W + BIAS) / temperature).max(axis=1)


@pytest.mark.parametrize("temperature, epsilon", [(1000.0, 0.0014), (2.0, 0.1), (1.0, 0.0)])
def test_odin_matches_the_hand_computation(temperature, epsilon):
  images = jnp.asarray(X.reshape(2, 2, 2))
  got = odin.score(_linear, images, temperature=temperature, epsilon=epsilon)
  np.testing.assert_allclose(np.asarray(got), _by_hand(X, temperature, epsilon), rtol=1e-6)


def test_defaults_are_the_papers():
  images = jnp.asarray(X.reshape(2, 2, 2))
  np.testing.assert_allclose(np.asarray(odin.score(_linear, images)),
                             _by_hand(X, 1000.0, 0.0014), rtol=1e-6)
  assert (odin.TEMPERATURE, odin.EPSILON) == (1000.0, 0.0014)


def test_perturbation_raises_the_predicted_class_probability():
  images = jnp.asarray(X.reshape(2, 2, 2))
  plain = odin.score(_linear, images, temperature=2.0, epsilon=0.0)
  perturbed = odin.score(_linear, images, temperature=2.0, epsilon=0.05)
  assert np.all(np.asarray(perturbed) > np.asarray(plain))


def test_without_perturbation_at_t1_it_is_msp_of_a_nonlinear_model():
  rng = np.random.default_rng(0)
  w1 = jnp.asarray(rng.normal(size=(4, 8)).astype(np.float32))
  w2 = jnp.asarray(rng.normal(size=(8, 5)).astype(np.float32))

  def mlp(x):
    return jnp.tanh(x.reshape(x.shape[0], -1) @ w1) @ w2

  images = jnp.asarray(rng.normal(size=(6, 2, 2)).astype(np.float32))
  want = jax.nn.softmax(mlp(images)).max(axis=1)
  np.testing.assert_allclose(np.asarray(odin.score(mlp, images, temperature=1.0, epsilon=0.0)),
                             np.asarray(want), rtol=1e-6)
  # And its perturbation follows jax.grad of -log max softmax, sample by sample.
  def loss(x):
    z = mlp(x[None])[0] / 3.0
    return -jax.nn.log_softmax(z)[jnp.argmax(z)]

  grads = jax.vmap(jax.grad(loss))(images)
  perturbed = images - 0.02 * jnp.where(grads >= 0, 1.0, -1.0)
  want = jax.nn.softmax(mlp(perturbed) / 3.0).max(axis=1)
  np.testing.assert_allclose(np.asarray(odin.score(mlp, images, temperature=3.0, epsilon=0.02)),
                             np.asarray(want), rtol=1e-6)


def test_normalisation_inside_logits_fn_is_the_official_eps_over_std():
  std = np.float32(0.25)
  images = X.reshape(2, 2, 2)
  normalised = functools.partial(lambda s, x: _linear(x / s), std)
  # Official: perturb the normalised image by eps / std; here raw pixels by eps.
  raw = odin.score(normalised, jnp.asarray(images), temperature=10.0, epsilon=0.01)
  official = odin.score(_linear, jnp.asarray(images / std), temperature=10.0, epsilon=0.01 / std)
  np.testing.assert_allclose(np.asarray(raw), np.asarray(official), rtol=1e-5)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"temperature": 0.0}, ValueError, "temperature must be a positive finite number"),
    ({"epsilon": -0.1}, ValueError, "epsilon must be a positive finite number"),
    ({"epsilon": "big"}, TypeError, "epsilon must be a real number"),
])
def test_bad_hyperparameters(kwargs, error, message):
  with pytest.raises(error, match=message):
    odin.score(_linear, jnp.asarray(X.reshape(2, 2, 2)), **kwargs)


def test_bad_images():
  with pytest.raises(ValueError, match="images contains NaN or Inf"):
    odin.score(_linear, jnp.full((2, 2, 2), jnp.nan))
  with pytest.raises(TypeError, match="images must be a floating-point array"):
    odin.score(_linear, jnp.ones((2, 2, 2), jnp.int32))
  with pytest.raises(ValueError, match="non-empty"):
    odin.score(_linear, jnp.ones((0, 2, 2)))
  with pytest.raises(TypeError, match="images must be an array"):
    odin.score(_linear, [[1.0]])
  with pytest.raises(ValueError, match="logits_fn must map"):
    odin.score(lambda x: x.sum(axis=(1, 2)), jnp.ones((2, 2, 2)))
