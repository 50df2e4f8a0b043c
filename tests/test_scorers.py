"""Registry, parity with independent NumPy computations, and equivalences."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import random_problem
from line_jax import line
from line_jax import scorers
from line_jax.scorers import _vim
from line_jax.scorers import _knn
from line_jax.scorers import _quantile
from line_jax.scorers import _select
from line_jax.scorers import _shaping

pytestmark = pytest.mark.filterwarnings("error")

N, M, C, B = 120, 12, 5, 16
EXPECTED = (
    "msp", "maxlogit", "energy", "react", "dice", "ash_p", "ash_b", "ash_s",
    "scale", "mahalanobis", "knn", "vim", "gradnorm", "line",
    "gen", "entropy", "klm", "rmds", "she", "nnguide", "fdbd", "nci", "react_dice",
)
SMALL = {"knn": {"k": 7}, "vim": {"dim": 6}}


def _problem(seed=0):
  rng = np.random.default_rng(seed)
  train = np.abs(rng.normal(size=(N, M))).astype(np.float32)
  labels = np.arange(N) % C
  train += np.eye(C, M, dtype=np.float32)[labels] * 2  # class structure
  kernel = rng.normal(size=(M, C)).astype(np.float32)
  bias = rng.normal(size=(C,)).astype(np.float32)
  test = np.abs(rng.normal(size=(B, M))).astype(np.float32) * 1.5
  return train, labels, kernel, bias, test


def _fit_score(name, **hparams):
  train, labels, kernel, bias, test = _problem()
  scorer = scorers.get(name)
  state = scorer.fit(train, labels, kernel, bias, **{**SMALL.get(name, {}), **hparams})
  return np.asarray(scorer.score(state, test)), state


# Independent float64 NumPy references, written from each paper's definition.
def _logits(h, kernel, bias):
  return h.astype(np.float64) @ kernel.astype(np.float64) + bias


def _energy(z):
  top = z.max(axis=1)
  return top + np.log(np.exp(z - top[:, None]).sum(axis=1))


def _top_k_mask(h, k):
  order = np.argsort(-h, axis=1, kind="stable")[:, :k]
  mask = np.zeros(h.shape, bool)
  np.put_along_axis(mask, order, True, axis=1)
  return mask


def _kept(m, p):
  return m - int(np.round(m * p / 100.0))


def test_registry_names_are_canonical_and_complete():
  assert scorers.names() == EXPECTED
  for name in EXPECTED:
    scorer = scorers.get(name)
    assert scorer.name == name
    assert isinstance(scorer.score_fn, type(jax.jit(lambda x: x)))  # jitted (score buckets it)


def test_registry_defaults_follow_the_papers():
  defaults = {name: dict(scorers.get(name).defaults) for name in EXPECTED}
  assert defaults["react"] == {"percentile": 90.0}
  assert defaults["dice"] == {"p": 70.0}
  assert defaults["ash_p"] == {"percentile": 60.0}
  assert defaults["ash_b"] == {"percentile": 65.0}
  assert defaults["ash_s"] == {"percentile": 90.0}
  assert defaults["scale"] == {"percentile": 85.0}
  assert defaults["knn"]["k"] is None  # One neighbour per 1,000 bank rows (50 of CIFAR's 50,000).
  assert defaults["vim"] == {"dim": None}  # The official rule on the head's width.
  # The paper's clip (0.8 on ResNet-50) is in that network's units: the
  # default is the percentile that holds on any model.
  assert defaults["line"] == {"p_w": 10.0, "p_a": 10.0, "clip": scorers.TrainPercentile(90.0)}
  for name in ("msp", "maxlogit", "energy", "mahalanobis", "gradnorm"):
    assert defaults[name] == {}


@pytest.mark.parametrize("name", EXPECTED)
def test_every_scorer_returns_finite_batch_scores(name):
  scores, _ = _fit_score(name)
  chex.assert_shape(scores, (B,))
  assert scores.dtype == np.float32
  assert np.all(np.isfinite(scores))


def test_msp_maxlogit_energy_match_numpy():
  train, labels, kernel, bias, test = _problem()
  z = _logits(test, kernel, bias)
  probs = np.exp(z - _energy(z)[:, None])
  np.testing.assert_allclose(_fit_score("msp")[0], probs.max(axis=1), rtol=1e-5)
  np.testing.assert_allclose(_fit_score("maxlogit")[0], z.max(axis=1), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(_fit_score("energy")[0], _energy(z), rtol=1e-5, atol=1e-5)


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


def test_scale_matches_numpy():
  train, labels, kernel, bias, test = _problem()
  k = _kept(M, 85)
  h = test.astype(np.float64)
  factor = np.exp(h.sum(axis=1) / np.where(_top_k_mask(test, k), h, 0).sum(axis=1))
  scores, _ = _fit_score("scale")
  np.testing.assert_allclose(scores, _energy(_logits(h * factor[:, None], kernel, bias)), rtol=2e-5)


def test_mahalanobis_matches_numpy():
  train, labels, kernel, bias, test = _problem()
  x = train.astype(np.float64)
  means = np.stack([x[labels == c].mean(axis=0) for c in range(C)])
  centred = x - means[labels]
  precision = np.linalg.pinv(centred.T @ centred / N)
  diff = test[:, None, :] - means[None]
  distances = np.einsum("bcm,mn,bcn->bc", diff, precision, diff)
  scores, _ = _fit_score("mahalanobis")
  np.testing.assert_allclose(scores, -distances.min(axis=1), rtol=1e-4)


def test_knn_matches_numpy():
  train, labels, kernel, bias, test = _problem()
  normalise = lambda x: x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-10)
  bank, z = normalise(train.astype(np.float64)), normalise(test.astype(np.float64))
  distances = np.linalg.norm(z[:, None] - bank[None], axis=2)
  want = -np.sort(distances, axis=1)[:, 6]
  scores, state = _fit_score("knn", k=7)
  np.testing.assert_allclose(scores, want, atol=2e-6)
  # The one-block bank's two selections (radix on CPU, lax.top_k elsewhere).
  z32 = jnp.asarray(z, jnp.float32)
  for radix in (True, False):
    kth = np.asarray(_knn._kth_one_block(state, z32, radix=radix), np.float64)
    np.testing.assert_allclose(-np.sqrt(np.maximum(1.0 - kth, 0.0)), want, atol=2e-6)


@pytest.mark.parametrize("block_rows", [None, 32])  # one block; four, the last padded
def test_knn_scores_under_vmap_over_k_as_each_k_alone(block_rows):
  train, labels, kernel, bias, test = _problem()
  knn = scorers.get("knn")
  blocks = {} if block_rows is None else {"block_rows": block_rows}
  ks = (1, 3, 7)
  states = [knn.fit(train, labels, kernel, bias, k=k, k_max=max(ks), **blocks) for k in ks]
  assert {s.k_max for s in states} == {7} and [int(s.k) for s in states] == list(ks)
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
  z = jnp.asarray(test / (np.linalg.norm(test, axis=1, keepdims=True) + 1e-10), jnp.float32)
  for k, state in zip(ks, states):
    alone = knn.fit(train, labels, kernel, bias, k=k, **blocks)  # k_max = k
    assert alone.k_max == k
    want = np.asarray(knn.score(alone, test))
    np.testing.assert_allclose(np.asarray(knn.score(state, test)), want, rtol=1e-6, atol=1e-6)
    if block_rows is None:  # both one-block selections, traced k
      for radix in (True, False):
        kth = jax.vmap(lambda s: _knn._kth_one_block(s, z, radix=radix))(stacked)
        np.testing.assert_allclose(-np.sqrt(np.maximum(1.0 - np.asarray(kth[ks.index(k)]), 0)),
                                   want, atol=2e-6)
  vmapped = np.asarray(jax.vmap(knn.score, in_axes=(0, None))(stacked, test))
  for row, k in zip(vmapped, ks):
    np.testing.assert_allclose(row, np.asarray(knn.score(knn.fit(
        train, labels, kernel, bias, k=k, **blocks), test)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("size, want", [(1, 1), (999, 1), (1500, 2), (50_000, 50),
                                        (1_281_167, 1281)])
def test_knn_default_k_is_one_neighbour_per_thousand_rows(size, want):
  from line_jax.scorers import _knn  # pylint: disable=g-import-not-at-top
  assert _knn.default_k(size) == want


def test_knn_default_k_resolves_on_the_bank_and_pastes_back():
  train, labels, kernel, bias, test = _problem()
  scorer = scorers.get("knn")
  state = scorer.fit(train, labels, kernel, bias)  # k=None
  assert int(state.k) == max(1, round(N / 1000)) and state.k_max == int(state.k)
  resolved = scorers.resolved_hparams(dict(scorer.defaults), state)
  assert resolved["k"] == int(state.k)
  again = scorer.fit(train, labels, kernel, bias, **resolved)
  np.testing.assert_array_equal(np.asarray(scorer.score(again, test)),
                                np.asarray(scorer.score(state, test)))


def test_knn_bank_grows_in_place_yet_each_accumulator_keeps_its_own_rows():
  from line_jax.scorers import _knn  # pylint: disable=g-import-not-at-top
  train, labels, kernel, bias, _ = _problem()
  rng = np.random.default_rng(7)
  batches = [rng.random((n, M)).astype(np.float32) for n in (5, 700, 3, 400)]
  acc = _knn.init(kernel, bias, k=3)
  history = [acc]
  for batch in batches:
    history.append(_knn.update(history[-1], batch, None))
  normalise = lambda x: x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-10)
  want = normalise(np.concatenate(batches))
  np.testing.assert_allclose(history[-1].rows, want, rtol=1e-6)
  # Appends share one buffer until it is full (1,024 rows), then it doubles...
  assert history[1].rows.base is history[2].rows.base is history[3].rows.base
  assert history[4].rows.base is not history[3].rows.base
  # ...yet an older accumulator updated again gets rows of its own: the newer
  # ones keep theirs.
  branch = _knn.update(history[2], batches[0], None)
  np.testing.assert_allclose(branch.rows[705:], normalise(batches[0]), rtol=1e-6)
  np.testing.assert_allclose(history[3].rows[705:], normalise(batches[2]), rtol=1e-6)
  np.testing.assert_allclose(history[-1].rows, want, rtol=1e-6)
  state = _knn.finalize(history[-1])
  assert state.size == 1108


def test_knn_k_max_is_at_least_k_and_capped_at_the_bank():
  train, labels, kernel, bias, _ = _problem()
  knn = scorers.get("knn")
  with pytest.raises(ValueError, match="k_max must be at least k = 5, got 4"):
    knn.fit(train, labels, kernel, bias, k=5, k_max=4)
  assert knn.fit(train, labels, kernel, bias, k=5, k_max=10 * N).k_max == N


def test_vim_matches_numpy_as_the_official_code_computes_it():
  train, labels, kernel, bias, test = _problem()
  w = kernel.T.astype(np.float64)  # PyTorch layout
  origin = -np.linalg.pinv(w) @ bias
  centred = train - origin
  values, vectors = np.linalg.eig(centred.T @ centred / N)
  null = vectors.real[:, np.argsort(-values.real)[6:]]
  residual = lambda x: np.linalg.norm((x - origin) @ null, axis=-1)
  alpha = _logits(train, kernel, bias).max(axis=1).mean() / residual(train).mean()
  want = _energy(_logits(test, kernel, bias)) - alpha * residual(test)
  scores, state = _fit_score("vim", dim=6)
  np.testing.assert_allclose(float(state.alpha), alpha, rtol=1e-5)
  np.testing.assert_allclose(scores, want, rtol=1e-4, atol=1e-4)


def test_vim_dim_at_or_above_the_feature_count_is_refused():
  train, labels, kernel, bias, _ = _problem()
  for dim in (M, 512):
    with pytest.raises(ValueError, match=f"dim={dim} must be below the feature count {M}"):
      scorers.get("vim").fit(train, labels, kernel, bias, dim=dim)


@pytest.mark.parametrize("width, want", [(4096, 1000), (2048, 1000), (2047, 512), (768, 512),
                                         (767, 383), (342, 171), (128, 64), (2, 1)])
def test_vim_default_dim_follows_the_official_rule(width, want):
  assert _vim.default_dim(width) == want


def test_vim_default_dim_resolves_on_the_head():
  _, state = _fit_score("vim")  # dim=None
  chex.assert_shape(state.residual, (M, M - M // 2))


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


def test_line_scorer_is_line_jax_line():
  train, labels, kernel, bias, test = _problem()
  scores, state = _fit_score("line", p_w=90, p_a=10, clip=1.0)
  direct = line.fit(train, labels, kernel, bias, p_w=90, p_a=10, clip=1.0)
  np.testing.assert_array_equal(scores, np.asarray(line.score(direct, test)))
  assert state.p_w == 90 and state.p_a == 10


# Equivalences between methods.
def test_react_at_percentile_100_is_energy():
  chex.assert_trees_all_close(_fit_score("react", percentile=100)[0], _fit_score("energy")[0])


def test_line_with_every_part_off_is_energy():
  off, _ = _fit_score("line", p_w=None, p_a=None, clip=None)
  np.testing.assert_allclose(off, _fit_score("energy")[0], rtol=1e-6, atol=1e-6)


def test_dice_at_p0_drops_only_the_smallest_contribution():
  train, labels, kernel, bias, test = _problem()
  contrib = train.astype(np.float64).mean(axis=0)[:, None] * kernel
  dropped = kernel.copy()
  dropped.flat[np.argmin(contrib)] = 0.0
  _, state = _fit_score("dice", p=0)
  np.testing.assert_array_equal(np.asarray(state.kernel), dropped)
  want = _energy(_logits(test, dropped, bias))
  np.testing.assert_allclose(_fit_score("dice", p=0)[0], want, rtol=1e-5)


def test_ash_p_at_percentile_0_is_energy():
  np.testing.assert_allclose(_fit_score("ash_p", percentile=0)[0], _fit_score("energy")[0],
                             rtol=1e-6, atol=1e-6)


def test_ash_s_and_scale_at_percentile_0_scale_every_activation_by_e():
  train, labels, kernel, bias, test = _problem()
  want = _energy(_logits(test * np.e, kernel, bias))
  np.testing.assert_allclose(_fit_score("ash_s", percentile=0)[0], want, rtol=1e-5)
  np.testing.assert_allclose(_fit_score("scale", percentile=0)[0], want, rtol=1e-5)


# The exact selections under the scorers.
TIES = [[3.0, 1.0, 1.0, 1.0, 0.0], [2.0, 2.0, 2.0, 2.0, 2.0], [-1.0, 2.0, -1.0, 5.0, -3.0]]


# The CPU's rolled passes and the GPU's unrolled ones give the same, with
# and without the branch that skips the tie-breaking cumsum.
@pytest.mark.parametrize("branch,unroll", [(True, None), (True, True), (False, None)])
def test_top_k_mask_breaks_ties_by_lowest_index(branch, unroll):
  x = jnp.array(TIES)
  mask = np.asarray(_shaping.top_k_mask(x, 3, branch=branch, unroll=unroll))
  np.testing.assert_array_equal(mask, _top_k_mask(np.asarray(x), 3))
  np.testing.assert_array_equal(mask.sum(axis=1), [3, 3, 3])


@pytest.mark.parametrize("unroll", [None, True])
def test_top_k_sum_counts_ties_up_to_k(unroll):
  np.testing.assert_array_equal(
      np.asarray(_shaping.top_k_sum(jnp.array(TIES), 3, unroll=unroll)), [5.0, 6.0, 6.0])


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


def test_kth_largest_matches_numpy_on_signed_values_and_ties():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(6, 50)).astype(np.float32)
  x[:, :10] = 0.25  # ties
  x[0, 10:] = -0.0
  for k in (1, 7, 10, 11, 50):
    want = -np.sort(-x, axis=1)[:, k - 1]
    np.testing.assert_array_equal(np.asarray(_select.kth_largest(jnp.asarray(x), k)), want)
    np.testing.assert_array_equal(
        np.asarray(_select.kth_largest(jnp.asarray(x), k, unroll=True)), want)


@pytest.mark.parametrize("p", [0.0, 12.5, 50.0, 90.0, 99.9, 100.0])
def test_streamed_percentile_is_numpy_percentile_exactly(p):
  rng = np.random.default_rng(2)
  values = [rng.normal(size=(30, 7)).astype(np.float32) for _ in range(3)]
  values[1][:, :3] = 0.0  # repeated values
  values[2][0] = np.float32(1e-30)
  want = np.percentile(np.concatenate(values).ravel().astype(np.float64), p)
  assert _quantile.percentile_from_batches(lambda: values, p) == want


@pytest.mark.parametrize("p", [12.5, 37.5, 90.0, 100.0])
def test_line_clip_as_a_training_percentile_is_resolved_exactly(p):
  features, labels, kernel, bias = random_problem(5, 16, 300, seed=4)
  line_scorer = scorers.get("line")
  batches = [(features[i:i + 64], labels[i:i + 64]) for i in range(0, 300, 64)]
  by_percentile = line_scorer.fit_from_batches(batches, kernel, bias, p_w=90, p_a=90,
                                               clip=scorers.TrainPercentile(p))
  value = float(np.percentile(features.astype(np.float64), p))
  assert float(by_percentile.clip) == np.float32(value)
  by_value = line_scorer.fit(features, labels, kernel, bias, p_w=90, p_a=90, clip=value)
  chex.assert_trees_all_equal(by_percentile, by_value)


def test_train_percentile_is_checked():
  with pytest.raises(ValueError, match="percentile"):
    scorers.TrainPercentile(101)
