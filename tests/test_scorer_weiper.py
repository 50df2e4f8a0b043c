"""WeiPer+KLD: a float64 reference of the authors' code, streaming, merging, export.

Bins make scores jump where a value crosses an edge, so the exact tests run
on dyadic data: features, head and perturbed head (the module's
`perturbed_weights` replaced by a dyadic draw) are small multiples of powers
of two, every logit is exact in float32 and float64, and the reference bins
exactly the values the scorer bins. The reference follows the code line by
line: `batch_histogram` with `bins_min_max` and `probability=True` (outer
bins in the total, dropped), `UniformKernel` (a replicate-padded 'same'
convolution, even and odd sizes), `kldiv(symmetric=True)` and
`calculate_weiper_pred`. The real perturbation is checked against its
definition and its seed.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import line_jax
from line_jax import fold as fold_lib
from line_jax import layout
from line_jax.scorers import _registry
from line_jax.scorers import _weiper
from line_jax.scorers._registry import _scorer

pytestmark = pytest.mark.filterwarnings("error")

SCORER = _scorer("weiper", _weiper, _weiper.WeiperState)
N, M, C, B, R = 120, 16, 4, 20, 6
HPARAMS = {"n_repeats": R, "n_bins": 20, "smoothing": 4, "smoothing_perturbed": 5}


def _dyadic_weights(kernel, n_repeats, perturbation_distance, seed):
  """A dyadic stand-in for the perturbed head: W^T plus multiples of 1/16."""
  del perturbation_distance
  rng = np.random.default_rng(seed + 100)
  noise = rng.integers(-24, 25, size=(n_repeats, *np.shape(kernel)[::-1])) / 16
  return (np.asarray(kernel, np.float64).T + noise).astype(np.float32)


@pytest.fixture
def dyadic(monkeypatch):
  monkeypatch.setattr(_weiper, "perturbed_weights", _dyadic_weights)


def _problem(seed=0):
  """Non-negative features in quarters, a head in sixteenths; test rows: the
  first half like the training rows, the second half twice as large."""
  rng = np.random.default_rng(seed)
  train = (rng.integers(0, 17, size=(N, M)) * rng.integers(0, 2, size=(N, M)) / 4)
  kernel = rng.integers(-16, 17, size=(M, C)) / 16
  bias = rng.integers(-8, 9, size=(C,)) / 8
  test = rng.integers(0, 17, size=(B, M)) * rng.integers(0, 2, size=(B, M)) / 4
  test[B // 2:] *= 2
  f32 = lambda x: np.asarray(x, np.float32)
  return f32(train), f32(kernel), f32(bias), f32(test)


def _edges(low, high, n_bins):
  """torch's `linspace(min, max + 1e-8, n_bins + 1)` of `batch_histogram`, in float32."""
  low, high = np.float32(low), np.float32(high) + np.float32(1e-8)
  steps = np.arange(n_bins + 1, dtype=np.float32) / np.float32(n_bins)
  return low + steps * (high - low)


def _density(values, edges):
  """`batch_histogram(..., bins_min_max, probability=True)` of one row."""
  bins = np.concatenate([[-np.inf], edges.astype(np.float64), [np.inf]])
  inside = (values[None] < bins[1:, None]) & (values[None] >= bins[:-1, None])
  density = inside.mean(axis=1)
  return density[1:-1] / density.sum()


def _smooth(q, size):
  before = (size - 1) // 2
  padded = np.pad(q, (before, size - 1 - before), mode="edge")
  return np.convolve(padded, np.ones(size) / size, mode="valid")


def _kldiv(p, q, size, eps):
  q_ = _smooth(q, size) + eps
  p_ = p + eps
  p_, q_ = p_ / p_.sum(), q_ / q_.sum()
  return np.sum(p_ * (np.log(p_) - np.log(q_))) + np.sum(q_ * (np.log(q_) - np.log(p_)))


def _perturbed_logits(x, weights, bias):
  return np.concatenate([x.astype(np.float64) @ w.T.astype(np.float64) + bias for w in weights],
                        axis=1)


def _reference(train, kernel, bias, test, *, n_repeats=R, n_bins=20, smoothing=4,
               smoothing_perturbed=5, lambda_1=2.5, lambda_2=0.1, epsilon=0.01,
               epsilon_noise=0.025, seed=0):
  weights = _dyadic_weights(kernel, n_repeats, None, seed)
  z_train = _perturbed_logits(train, weights, bias)
  edges_f = _edges(train.min(), train.max(), n_bins)
  edges_p = _edges(z_train.min(), z_train.max(), n_bins)
  p_f = np.mean([_density(row, edges_f) for row in train.astype(np.float64)], axis=0)
  p_p = np.mean([_density(row, edges_p) for row in z_train], axis=0)
  out = []
  for row, z in zip(test.astype(np.float64), _perturbed_logits(test, weights, bias)):
    msp = np.mean([np.max(np.exp(b - b.max()) / np.exp(b - b.max()).sum())
                   for b in z.reshape(n_repeats, -1)])
    kl_f = _kldiv(p_f, _density(row, edges_f), smoothing, epsilon)
    kl_p = _kldiv(p_p, _density(z, edges_p), smoothing_perturbed, epsilon_noise)
    out.append(-(kl_f + lambda_1 * kl_p - lambda_2 * msp))
  return np.array(out)


def _close(got, want, rtol=1e-5):
  np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * max(1.0, np.abs(want).max()))


def test_scores_equal_the_float64_reference_and_larger_rows_score_lower(dyadic):
  del dyadic
  train, kernel, bias, test = _problem()
  state = SCORER.fit(train, None, kernel, bias, **HPARAMS)
  got = np.asarray(SCORER.score(state, test))
  want = _reference(train, kernel, bias, test)
  _close(got, want)
  assert got[: B // 2].mean() > got[B // 2:].mean()


@pytest.mark.parametrize("columns, per_step", [(4, 1), (8, 2), (15, 3), (1024, R)])
def test_any_number_of_repeats_per_step_scores_the_reference(dyadic, monkeypatch, columns,
                                                             per_step):
  """The walk over the repeats, `per_step` at a time, fits and scores as one pass over all."""
  del dyadic
  monkeypatch.setattr(_weiper, "COLUMNS_PER_STEP", columns)
  assert _weiper.repeats_per_step(R, C) == per_step
  train, kernel, bias, test = _problem()
  state = SCORER.fit(train, None, kernel, bias, **HPARAMS)
  _close(np.asarray(SCORER.score(state, test)), _reference(train, kernel, bias, test))


def test_bin_index_is_searchsorted_at_and_beside_every_edge():
  """The bin by arithmetic, corrected by the edges, is the binary search's,
  for values at each edge, one float32 step either side and out of range,
  over ranges from 1e-6 to 1e6 wide and offsets up to 1e7 (some of them a
  few float32 steps per bin), and for edges all equal."""
  rng = np.random.default_rng(0)
  index = jax.jit(_weiper.bin_index)
  for _ in range(100):
    width = 10.0 ** rng.uniform(-6, 6)
    low = np.float32(rng.normal() * 10.0 ** rng.uniform(-3, 7))
    edges = _weiper.edges(low, np.float32(low + width), int(rng.integers(1, 120)))
    values = np.concatenate([
        edges, np.nextafter(edges, np.float32(-np.inf)), np.nextafter(edges, np.float32(np.inf)),
        rng.uniform(low - width, low + 2 * width, 200)]).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(index(values[None], edges))[0],
                                  np.searchsorted(edges, values, side="right"))
  edges = _weiper.edges(np.float32(1000.0), np.float32(1000.0), 10)  # every edge 1000
  values = np.array([999.99994, 1000.0, 1000.00006, -5.0], np.float32)
  np.testing.assert_array_equal(np.asarray(index(values[None], edges))[0], [0, 11, 11, 0])


@pytest.mark.parametrize("hparams", [
    {"smoothing": 1, "smoothing_perturbed": 2, "n_bins": 7},
    {"lambda_1": 0.0, "lambda_2": 5.0, "epsilon": 0.1, "epsilon_noise": 0.001},
    {"smoothing": 25, "smoothing_perturbed": 40, "n_bins": 30}])
def test_every_setting_equals_the_reference(dyadic, hparams):
  del dyadic
  train, kernel, bias, test = _problem(seed=1)
  hparams = {**HPARAMS, **hparams}
  state = SCORER.fit(train, None, kernel, bias, **hparams)
  _close(np.asarray(SCORER.score(state, test)), _reference(train, kernel, bias, test, **hparams))


def test_the_training_extremes_are_in_the_bins_but_the_maximum_is_not(dyadic):
  """`max + 1e-8` is `max` in float32: the code bins the largest value outside."""
  del dyadic
  train, kernel, bias, _ = _problem()
  state = SCORER.fit(train, None, kernel, bias, **HPARAMS)
  edges = np.asarray(state.edges_features)
  assert edges[0] == train.min() and edges[-1] == train.max()
  row = np.full((1, M), train.max(), np.float32)
  row[0, 0] = train.min()
  dens_f, _, _ = _weiper.densities(state.perturbed, state.bias, state.edges_features,
                                   state.edges_perturbed, jnp.asarray(row))
  np.testing.assert_allclose(np.asarray(dens_f)[0], np.eye(1, 20)[0] / M)


def test_the_perturbation_is_its_definition_and_seeded():
  _, kernel, _, _ = _problem()
  got = _weiper.perturbed_weights(kernel, 3, 1.8, seed=7)
  weight = kernel.T.astype(np.float64)
  rng = np.random.default_rng(7)
  for r in range(3):
    u = rng.standard_normal((C, M))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    np.testing.assert_allclose(got[r], weight + 1.8 * np.linalg.norm(weight, axis=1)[:, None] * u,
                               rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(got - weight, axis=2),
                             np.broadcast_to(1.8 * np.linalg.norm(weight, axis=1), (3, C)),
                             rtol=1e-5)
  train, _, bias, test = _problem()
  first = SCORER.fit(train, None, kernel, bias, n_repeats=3, seed=7)
  chex.assert_trees_all_equal(first, SCORER.fit(train, None, kernel, bias, n_repeats=3, seed=7))
  np.testing.assert_array_equal(np.asarray(first.perturbed), got)
  other = SCORER.fit(train, None, kernel, bias, n_repeats=3, seed=8)
  assert not np.array_equal(np.asarray(other.perturbed), got)


def test_defaults_and_grid_are_the_authors():
  assert dict(SCORER.defaults) == {
      "n_repeats": 100, "perturbation_distance": 1.8, "n_bins": 100, "smoothing": 4,
      "smoothing_perturbed": 15, "lambda_1": 2.5, "lambda_2": 0.1, "epsilon": 0.01,
      "epsilon_noise": 0.025, "seed": 0}
  assert dict(SCORER.grid) == {"lambda_1": (0.1, 1.0, 2.5, 4.0),
                               "lambda_2": (0.1, 0.25, 1.0, 2.5, 5.0)}


@pytest.mark.parametrize("hparams, error, message", [
    ({"n_repeats": 0}, ValueError, "n_repeats must be at least 1"),
    ({"n_bins": 2.0}, TypeError, "n_bins must be an integer"),
    ({"smoothing": 0}, ValueError, "smoothing must be at least 1"),
    ({"smoothing_perturbed": -1}, ValueError, "smoothing_perturbed must be at least 1"),
    ({"perturbation_distance": -0.5}, ValueError, "perturbation_distance must be non-negative"),
    ({"perturbation_distance": "2"}, TypeError, "perturbation_distance must be a real number"),
    ({"lambda_1": float("nan")}, ValueError, "lambda_1 must be non-negative and finite"),
    ({"lambda_2": -1.0}, ValueError, "lambda_2 must be non-negative"),
    ({"epsilon": 0.0}, ValueError, "epsilon must be positive"),
    ({"epsilon_noise": True}, TypeError, "epsilon_noise must be a real number"),
    ({"seed": -1}, ValueError, "seed must be at least 0"),
    ({"delta": 2.0}, ValueError, "unknown hyperparameter.*valid: n_repeats"),
])
def test_bad_hyperparameters_are_errors_naming_them(hparams, error, message):
  train, kernel, bias, _ = _problem()
  with pytest.raises(error, match=message):
    SCORER.fit(train, None, kernel, bias, **hparams)


def test_fit_from_uneven_batches_and_merged_parts_equal_the_whole(dyadic):
  del dyadic
  train, kernel, bias, test = _problem()
  whole = SCORER.fit(train, None, kernel, bias, **HPARAMS)
  edges = (0, 1, 50, 57, 120)
  batches = [(train[a:b], None) for a, b in zip(edges[:-1], edges[1:])]
  streamed = SCORER.fit_from_batches(batches, kernel, bias, **HPARAMS)
  merged = fold_lib.fit_parts(SCORER.fold, [batches[:2], [], batches[2:]], kernel, bias,
                              **HPARAMS)
  for state in (streamed, merged):
    assert isinstance(state, _weiper.WeiperState)
    chex.assert_trees_all_close(state, whole, rtol=1e-6, atol=1e-7)
    _close(np.asarray(SCORER.score(state, test)), np.asarray(SCORER.score(whole, test)), 1e-6)


def test_merging_numpy_accumulators_keeps_float64(dyadic):
  del dyadic
  train, kernel, bias, _ = _problem()
  fold = SCORER.fold
  acc = fold.init(kernel, bias, **HPARAMS)
  for stage in range(2):
    parts = [jax.tree.map(np.asarray, fold.update(acc, train[a:b], None))
             for a, b in ((0, 70), (70, N))]
    acc = fold_lib.merge_all(fold, parts)
    if stage == 0:
      acc = fold.next_pass(acc)
  assert acc.sums_features.dtype == np.float64
  direct = fold_lib.fit_parts(fold, [[(train[:70], None)], [(train[70:], None)]], kernel, bias,
                              **HPARAMS)
  chex.assert_trees_all_close(fold.finalize(acc), direct, rtol=1e-7, atol=1e-8)


@pytest.fixture
def registered(monkeypatch):
  """WeiPer in the registry for this test only (`line_jax.save` records the name)."""
  monkeypatch.setitem(_registry._REGISTRY, "weiper", SCORER)
  monkeypatch.setitem(_registry._BY_STATE, _weiper.WeiperState, "weiper")


def test_save_load_round_trip_scores_identically(tmp_path, registered):
  del registered
  train, kernel, bias, test = _problem()
  state = SCORER.fit(train, None, kernel, bias, **HPARAMS)
  line_jax.save(tmp_path / "weiper", state)
  loaded = line_jax.load(tmp_path / "weiper")
  assert type(loaded) is _weiper.WeiperState
  chex.assert_trees_all_equal(loaded, state)
  np.testing.assert_array_equal(np.asarray(SCORER.score(loaded, test)),
                                np.asarray(SCORER.score(state, test)))


def test_nan_rows_score_nan_under_jit(dyadic):
  del dyadic
  train, kernel, bias, test = _problem()
  state = SCORER.fit(train, None, kernel, bias, **HPARAMS)
  bad = test.copy()
  bad[[0, 11], 3] = [np.nan, np.inf]
  got = np.asarray(jax.jit(lambda s, f: SCORER.score_fn(s, f))(state, bad))
  assert np.isnan(got[[0, 11]]).all()
  rest = np.setdiff1d(np.arange(B), [0, 11])
  _close(got[rest], _reference(train, kernel, bias, test)[rest])


def test_exports_with_a_symbolic_batch(dyadic):
  del dyadic
  train, kernel, bias, test = _problem()
  state = SCORER.fit(train, None, kernel, bias, **HPARAMS)
  fn = jax.jit(lambda f: SCORER.score_fn(state, f, layout=layout.ACCELERATOR))
  batch = jax.export.symbolic_shape("b")[0]
  exported = jax.export.export(fn, platforms=("cpu",))(
      jax.ShapeDtypeStruct((batch, M), jnp.float32))
  for rows in (test, test[:3]):
    _close(np.asarray(exported.call(rows)), _reference(train, kernel, bias, rows))


def test_random_head_fits_and_scores_at_the_defaults(problem):
  features, labels, kernel, bias = problem(10, 32, 300)
  state = SCORER.fit(features, labels, kernel, bias)
  assert state.perturbed.shape == (100, 10, 32)
  got = np.asarray(SCORER.score(state, features[:50]))
  assert got.shape == (50,) and np.all(np.isfinite(got))


def test_torch_baseline_matches_line_jax(dyadic):
  del dyadic
  pytest.importorskip("torch")
  baselines = pytest.importorskip("benchmarks._torch_baselines_density")
  train, kernel, bias, test = _problem()
  state = SCORER.fit(train, None, kernel, bias, **HPARAMS)
  module = baselines.from_state("weiper", state)
  assert not module.training
  np.testing.assert_allclose(baselines.score(module, test),
                             np.asarray(SCORER.score(state, test)), rtol=2e-4, atol=2e-4)
