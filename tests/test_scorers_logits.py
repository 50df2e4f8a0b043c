"""Detectors that score the logits or shaped activations, against references.

MSP, MaxLogit, Energy, GradNorm, ReAct, DICE, DICE + ReAct, ASH-P/B/S, SCALE,
GEN, entropy and KL matching, each against an independent float64 NumPy
computation written from its paper (and official code, where they differ),
with the edge cases its definition has: GradNorm against the gradient of the
KL, ties at the k-th activation on sparse features, confident samples and ties
at GEN's m-th probability, classes nothing is predicted as, DICE + ReAct
without clipping and streamed; and the LINe registry entry against
line_jax.line itself.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _scorer_references import B
from _scorer_references import BIG_N
from _scorer_references import C
from _scorer_references import M
from _scorer_references import _big_problem
from _scorer_references import _close
from _scorer_references import _energy
from _scorer_references import _fit_score
from _scorer_references import _fit_score_big
from _scorer_references import _logits
from _scorer_references import _problem
from _scorer_references import _top_k_mask
from line_jax import line
from line_jax import scorers

pytestmark = pytest.mark.filterwarnings("error")


def _kept(m, p):
  return m - int(np.round(m * p / 100.0))


def _softmax(z):
  e = np.exp(z - z.max(axis=1, keepdims=True))
  return e / e.sum(axis=1, keepdims=True)


# ---- MSP, MaxLogit, Energy and GradNorm --------------------------------------


def test_msp_maxlogit_energy_match_numpy():
  train, labels, kernel, bias, test = _problem()
  z = _logits(test, kernel, bias)
  probs = np.exp(z - _energy(z)[:, None])
  np.testing.assert_allclose(_fit_score("msp")[0], probs.max(axis=1), rtol=1e-5)
  np.testing.assert_allclose(_fit_score("maxlogit")[0], z.max(axis=1), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(_fit_score("energy")[0], _energy(z), rtol=1e-5, atol=1e-5)


def test_gradnorm_matches_numpy_and_the_gradient_of_the_kl():
  train, labels, kernel, bias, test = _problem()
  z = _logits(test, kernel, bias)
  probs = np.exp(z - _energy(z)[:, None])
  closed = np.abs(test).sum(axis=1) * np.abs(probs - 1 / C).sum(axis=1)
  scores, _ = _fit_score("gradnorm")
  np.testing.assert_allclose(scores, closed, rtol=1e-5)

  def kl_uniform(k, h):  # KL(u || softmax(h k + b)) for one sample
    log_p = jax.nn.log_softmax(h @ k + bias)
    return jnp.sum((1.0 / C) * (jnp.log(1.0 / C) - log_p))

  grads = jax.vmap(jax.grad(kl_uniform), (None, 0))(jnp.asarray(kernel), jnp.asarray(test))
  np.testing.assert_allclose(scores, np.abs(np.asarray(grads)).sum(axis=(1, 2)), rtol=1e-4)


# ---- ReAct, DICE and DICE + ReAct --------------------------------------------


def test_react_matches_numpy():
  train, labels, kernel, bias, test = _problem()
  threshold = np.percentile(train.ravel().astype(np.float64), 80)
  scores, state = _fit_score("react", percentile=80)
  assert float(state.threshold) == np.float32(threshold)
  want = _energy(_logits(np.minimum(test, threshold), kernel, bias))
  np.testing.assert_allclose(scores, want, rtol=1e-5)
  assert np.any(test > threshold)  # the clip did something


def test_dice_matches_numpy():
  train, labels, kernel, bias, test = _problem()
  contrib = train.astype(np.float64).mean(axis=0)[:, None] * kernel
  mask = contrib > np.percentile(contrib, 60)
  scores, state = _fit_score("dice", p=60)
  np.testing.assert_array_equal(np.asarray(state.kernel) != 0, mask)
  want = _energy(_logits(test, kernel * mask, bias))
  np.testing.assert_allclose(scores, want, rtol=1e-5)


@pytest.mark.parametrize("p, percentile", [(15.0, 90.0), (60.0, 75.0), (0.0, 50.0)])
def test_react_dice_matches_numpy(p, percentile):
  train, labels, kernel, bias, test = _big_problem()
  contrib = train.astype(np.float64).mean(axis=0)[:, None] * kernel  # unclipped mean
  mask = contrib > np.percentile(contrib, p)
  threshold = np.percentile(train.ravel().astype(np.float64), percentile)
  got, state = _fit_score_big("react_dice", p=p, percentile=percentile)
  assert float(state.threshold) == np.float32(threshold)
  np.testing.assert_array_equal(np.asarray(state.kernel) != 0, mask)
  _close(got, _energy(_logits(np.minimum(test, threshold), kernel * mask, bias)))
  assert np.any(test > threshold)


def test_react_dice_without_clipping_is_dice_and_streams_exactly():
  train, labels, kernel, bias, test = _big_problem()
  both, _ = _fit_score_big("react_dice", p=40.0, percentile=100.0)
  dice, _ = _fit_score_big("dice", p=40.0)
  np.testing.assert_allclose(both, dice, rtol=1e-6)
  batches = [(train[a:a + 31], None) for a in range(0, BIG_N, 31)]
  streamed = scorers.get("react_dice").fit_from_batches(batches, kernel, bias)
  whole = scorers.get("react_dice").fit(train, labels, kernel, bias)
  chex.assert_trees_all_equal(streamed.threshold, whole.threshold)
  chex.assert_trees_all_equal(streamed.weight != 0, whole.weight != 0)
  with pytest.raises(TypeError, match="re-iterable"):
    scorers.get("react_dice").fit_from_batches(iter(batches), kernel, bias)


# ---- ASH and SCALE -----------------------------------------------------------


@pytest.mark.parametrize("variant", ["p", "b", "s"])
@pytest.mark.parametrize("percentile", [0.0, 37.0, 65.0, 95.0])
def test_ash_matches_numpy(variant, percentile):
  train, labels, kernel, bias, test = _problem()
  k = _kept(M, percentile)
  mask = _top_k_mask(test, k)
  before = test.astype(np.float64).sum(axis=1, keepdims=True)
  pruned = np.where(mask, test, 0.0)
  if variant == "p":
    shaped = pruned
  elif variant == "b":
    shaped = np.where(mask, before / k, 0.0)
  else:
    shaped = pruned * np.exp(before / pruned.sum(axis=1, keepdims=True))
  scores, _ = _fit_score(f"ash_{variant}", percentile=percentile)
  np.testing.assert_allclose(scores, _energy(_logits(shaped, kernel, bias)), rtol=2e-5)


def test_ash_on_sparse_features_keeps_exactly_k_with_zero_ties():
  # Post-ReLU features: fewer positives than k, so zeros tie at the k-th value
  # and ASH-B must fill exactly k entries (the first zeros by index).
  train, labels, kernel, bias, _ = _problem()
  rng = np.random.default_rng(5)
  test = np.maximum(rng.normal(size=(B, M)) - 0.8, 0.0).astype(np.float32)
  k = _kept(M, 50)
  assert np.all((test > 0).sum(axis=1) < k)
  mask = _top_k_mask(test, k)
  shaped = np.where(mask, test.astype(np.float64).sum(axis=1, keepdims=True) / k, 0.0)
  state = scorers.get("ash_b").fit(train, labels, kernel, bias, percentile=50)
  np.testing.assert_allclose(np.asarray(scorers.get("ash_b").score(state, test)),
                             _energy(_logits(shaped, kernel, bias)), rtol=1e-5)


def test_scale_matches_numpy():
  train, labels, kernel, bias, test = _problem()
  k = _kept(M, 85)
  h = test.astype(np.float64)
  factor = np.exp(h.sum(axis=1) / np.where(_top_k_mask(test, k), h, 0).sum(axis=1))
  scores, _ = _fit_score("scale")
  np.testing.assert_allclose(scores, _energy(_logits(h * factor[:, None], kernel, bias)), rtol=2e-5)


# ---- GEN and entropy ---------------------------------------------------------


def _gen_reference(z, gamma, m):
  e = np.exp(z - z.max(axis=1, keepdims=True))
  # 1 - p_j as the sum of the other classes' shares: exact where p_j ~ 1.
  others = np.where(np.eye(z.shape[1], dtype=bool)[None], 0.0, e[:, None, :]).sum(axis=2)
  p, q = e / e.sum(axis=1, keepdims=True), others / e.sum(axis=1, keepdims=True)
  order = np.argsort(p, axis=1)[:, -m:]
  p, q = np.take_along_axis(p, order, axis=1), np.take_along_axis(q, order, axis=1)
  return -np.sum(p ** gamma * q ** gamma, axis=1)


@pytest.mark.parametrize("gamma, m", [(0.1, 100), (0.1, 3), (0.5, 1), (2.0, 4), (1.0, 5)])
def test_gen_matches_numpy(gamma, m):
  train, labels, kernel, bias, test = _big_problem()
  want = _gen_reference(_logits(test, kernel, bias), gamma, min(m, C))
  got, state = _fit_score_big("gen", gamma=gamma, m=m)
  assert int(state.m) == min(m, C) and float(state.gamma) == np.float32(gamma)
  _close(got, want)


def test_gen_keeps_the_top_term_of_confident_samples():
  # Logit gaps of ~20: 1 - p of the top class is ~1e-9, which float32 `1 - p`
  # rounds to 0 (term 0); its exact term is (1e-9)^0.1 ~ 0.13.
  problem = _big_problem(scale=12.0)
  train, labels, kernel, bias, test = problem
  z = _logits(test, kernel, bias)
  p = _softmax(z)
  assert np.any(1.0 - p.max(axis=1) < 1e-8)
  got, _ = _fit_score_big("gen", problem)
  _close(got, _gen_reference(z, 0.1, C))


def test_gen_counts_ties_at_the_mth_probability():
  kernel = np.zeros((M, C), np.float32)
  bias = np.array([3.0, 1.0, 1.0, 1.0, -2.0], np.float32)  # three-way tie
  test = np.ones((2, M), np.float32)
  want = _gen_reference(_logits(test, kernel, bias), 0.3, 2)
  state = scorers.get("gen").fit(test, None, kernel, bias, gamma=0.3, m=2)
  _close(np.asarray(scorers.get("gen").score(state, test)), want)


def test_entropy_matches_numpy():
  train, labels, kernel, bias, test = _big_problem()
  p = _softmax(_logits(test, kernel, bias))
  got, _ = _fit_score_big("entropy")
  _close(got, np.sum(p * np.log(p), axis=1))


def test_gen_at_gamma_one_with_every_class_is_a_quadratic_entropy():
  train, labels, kernel, bias, test = _big_problem()
  p = _softmax(_logits(test, kernel, bias))
  got, _ = _fit_score_big("gen", gamma=1.0, m=C)
  _close(got, -(1.0 - np.sum(p * p, axis=1)))  # sum p (1 - p) = 1 - sum p^2


# ---- KL matching -------------------------------------------------------------


def _klm_reference(train, kernel, bias, test):
  p_train = _softmax(_logits(train, kernel, bias))
  pred = p_train.argmax(axis=1)
  templates = [p_train[pred == k].mean(axis=0) for k in range(C) if np.any(pred == k)]
  p = _softmax(_logits(test, kernel, bias))
  kl = np.array([[np.sum(np.where(q != 0, q * np.log(q / d), 0.0)) for d in templates]
                 for q in p])
  return -kl.min(axis=1)


def test_klm_matches_numpy():
  train, labels, kernel, bias, test = _big_problem()
  got, state = _fit_score_big("klm")
  _close(got, _klm_reference(train, kernel, bias, test), rtol=2e-5)


def test_klm_leaves_out_classes_nothing_is_predicted_as():
  train, labels, kernel, bias, test = _big_problem()
  bias = bias.copy()
  bias[3] = -50.0  # class 3 never wins
  got, state = _fit_score_big("klm", (train, labels, kernel, bias, test))
  assert np.isneginf(np.asarray(state.offsets)[3]) and np.isfinite(got).all()
  _close(got, _klm_reference(train, kernel, bias, test), rtol=2e-5)


# ---- LINe --------------------------------------------------------------------


def test_line_scorer_is_line_jax_line():
  train, labels, kernel, bias, test = _problem()
  scores, state = _fit_score("line", p_w=90, p_a=10, clip=1.0)
  direct = line.fit(train, labels, kernel, bias, p_w=90, p_a=10, clip=1.0)
  np.testing.assert_array_equal(scores, np.asarray(line.score(direct, test)))
  assert state.p_w == 90 and state.p_a == 10


# ---- the shared argmax ---------------------------------------------------------


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("keepdims", [False, True])
def test_common_argmax_is_numpys_first_largest_index(axis, keepdims):
  """Ties (rounded values, whole equal rows, -0.0 beside 0.0) go to the first
  index, as NumPy's and `jnp.argmax` do, along either axis."""
  from line_jax.scorers import _common  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(3)
  z = np.round(rng.normal(size=(37, 23)), 1).astype(np.float32)
  z[4] = 0.5
  z[5, :3] = [-0.0, 0.0, -0.0]
  z[5, 3:] = -1.0
  z[:, 6] = z.max()
  want = np.argmax(z, axis=axis)
  if keepdims:
    want = np.expand_dims(want, axis)
  got = jax.jit(lambda x: _common.argmax(x, axis, keepdims=keepdims))(z)
  assert got.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(got), want)
