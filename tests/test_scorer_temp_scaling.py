"""Temperature scaling: the exact NLL minimiser, streamed in four passes.

The fitted T against a float64 root of the NLL's derivative (to float32
rounding where the logits are exact), its NLL below T = 1, OpenOOD's start
1.5 and OpenOOD's LBFGS fit; scores against the reference; the ranking
differs from MSP's. Uneven batches, merged parts, save / load, the data it
refuses (no labels, separable, chance, flat logits, a generator), NaN rows, a
symbolic batch under `jax.export` and the PyTorch baseline.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize

import line_jax
from line_jax import fold as fold_lib
from line_jax import layout
from line_jax import scorers
from line_jax.scorers import _registry
from line_jax.scorers import _temp_scaling
from line_jax.scorers._registry import _scorer

pytestmark = pytest.mark.filterwarnings("error")

SCORER = _scorer("temp_scaling", _temp_scaling, _temp_scaling.TempScalingState)
N, M, C, B = 300, 12, 5, 16


def _problem(seed=0, noise=0.8):
  """Features with class structure and a head that mostly, not always, agrees."""
  rng = np.random.default_rng(seed)
  labels = rng.permutation(np.arange(N) % C)
  train = (np.abs(rng.normal(size=(N, M))) * noise
           + 1.5 * np.eye(C, M)[labels]).astype(np.float32)
  kernel = (2.0 * np.eye(M, C) + 0.3 * rng.normal(size=(M, C))).astype(np.float32)
  bias = (0.1 * rng.normal(size=(C,))).astype(np.float32)
  test = (np.abs(rng.normal(size=(B, M))) * noise
          + 1.5 * np.eye(C, M)[rng.integers(0, C, B)]).astype(np.float32)
  return train, labels, kernel, bias, test


def _logits(h, kernel, bias):
  return h.astype(np.float64) @ kernel.astype(np.float64) + bias.astype(np.float64)


def _nll(z, labels, temperature):
  a = z / temperature
  top = a.max(axis=1)
  return np.mean(top + np.log(np.exp(a - top[:, None]).sum(axis=1)) - a[np.arange(len(z)), labels])


def _reference_temperature(z, labels):
  """1 / b*, b* the root of d/db mean NLL = mean(E_softmax(b z)[z] - z_y), float64."""
  d = z - z.max(axis=1, keepdims=True)

  def slope(b):
    p = np.exp(b * d)
    p /= p.sum(axis=1, keepdims=True)
    return np.mean((p * d).sum(axis=1) - d[np.arange(len(z)), labels])

  return 1.0 / optimize.brentq(slope, 1e-6, 1e6, xtol=1e-300, rtol=4 * np.finfo(float).eps,
                               maxiter=500)


def _max_softmax(z, temperature):
  e = np.exp((z - z.max(axis=1, keepdims=True)) / temperature)
  return (e / e.sum(axis=1, keepdims=True)).max(axis=1)


def test_temperature_and_scores_equal_the_float64_reference():
  train, labels, kernel, bias, test = _problem()
  state = SCORER.fit(train, labels, kernel, bias)
  want = _reference_temperature(_logits(train, kernel, bias), labels)
  assert abs(want - 1.0) > 0.1  # a temperature that matters
  np.testing.assert_allclose(float(state.temperature), want, rtol=1e-6)
  for where in (layout.CPU, layout.ACCELERATOR):
    np.testing.assert_allclose(np.asarray(SCORER.score(state, test, layout=where)),
                               _max_softmax(_logits(test, kernel, bias), want), rtol=1e-5)


@pytest.mark.parametrize("seed, noise", [(0, 0.8), (1, 2.0), (3, 0.6)])  # 22, 146, 4 wrong
def test_exact_logits_give_the_minimiser_to_float32_rounding(seed, noise):
  # An identity head: the float32 logits are the features exactly, so the
  # fit sees the reference's logits and only the minimisation can differ.
  train, labels, _, _, _ = _problem(seed, noise)
  train = train[:, :C]
  kernel, bias = np.eye(C, dtype=np.float32), np.zeros((C,), np.float32)
  state = SCORER.fit(train, labels, kernel, bias)
  want = _reference_temperature(train.astype(np.float64), labels)
  got = float(state.temperature)
  assert abs(got - want) <= np.spacing(np.float32(want)), (got, want)


def test_fitted_nll_is_below_t_one_openoods_start_and_neighbours():
  train, labels, kernel, bias, _ = _problem()
  z = _logits(train, kernel, bias)
  t = float(SCORER.fit(train, labels, kernel, bias).temperature)
  best = _nll(z, labels, t)
  for other in (1.0, 1.5, t * (1 + 1e-3), t * (1 - 1e-3)):
    assert best < _nll(z, labels, other)


def test_the_ranking_differs_from_msp():
  train, labels, kernel, bias, test = _problem()
  msp = scorers.get("msp")
  calibrated = np.asarray(SCORER.score(SCORER.fit(train, labels, kernel, bias), test))
  plain = np.asarray(msp.score(msp.fit(train, labels, kernel, bias), test))
  assert tuple(np.argsort(calibrated)) != tuple(np.argsort(plain))


def _batches(train, labels, edges):
  return [(train[a:b], labels[a:b]) for a, b in zip(edges[:-1], edges[1:])]


def test_fit_from_uneven_batches_equals_the_whole():
  train, labels, kernel, bias, test = _problem()
  whole = SCORER.fit(train, labels, kernel, bias)
  streamed = SCORER.fit_from_batches(_batches(train, labels, (0, 1, 97, 104, 260, 300)),
                                     kernel, bias)
  chex.assert_trees_all_close(streamed, whole, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(SCORER.score(streamed, test)),
                             np.asarray(SCORER.score(whole, test)), rtol=1e-6)


@pytest.mark.parametrize("edges", [(0, 150, 300), (0, 1, 150, 150, 300), (0, 0, 300)])
def test_merged_parts_equal_the_whole(edges):
  train, labels, kernel, bias, _ = _problem()
  whole = SCORER.fit(train, labels, kernel, bias)
  parts = [[(train[a:b], labels[a:b])] if b > a else [] for a, b in zip(edges[:-1], edges[1:])]
  merged = fold_lib.fit_parts(SCORER.fold, parts, kernel, bias)
  chex.assert_trees_all_close(merged, whole, rtol=1e-6)


def test_merge_adds_the_sums_of_two_halves_of_a_pass():
  train, labels, kernel, bias, _ = _problem()
  fold = SCORER.fold
  start = fold.init(kernel, bias)
  halves = fold.merge(fold.update(start, train[:120], labels[:120]),
                      fold.update(start, train[120:], labels[120:]))
  whole = fold.update(start, train, labels)
  np.testing.assert_array_equal(np.asarray(halves.betas), np.asarray(whole.betas))
  np.testing.assert_allclose(np.asarray(halves.sums), np.asarray(whole.sums), rtol=1e-12)


@pytest.fixture
def registered(monkeypatch):
  """Temperature scaling in the registry for this test only (`line_jax.save`
  records the name)."""
  monkeypatch.setitem(_registry._REGISTRY, "temp_scaling", SCORER)
  monkeypatch.setitem(_registry._BY_STATE, _temp_scaling.TempScalingState, "temp_scaling")


def test_save_load_round_trip_scores_identically(tmp_path, registered):
  del registered
  train, labels, kernel, bias, test = _problem()
  state = SCORER.fit(train, labels, kernel, bias)
  line_jax.save(tmp_path / "ts", state)
  loaded = line_jax.load(tmp_path / "ts")
  assert type(loaded) is _temp_scaling.TempScalingState
  chex.assert_trees_all_equal(loaded, state)
  np.testing.assert_array_equal(np.asarray(SCORER.score(loaded, test)),
                                np.asarray(SCORER.score(state, test)))


def test_data_without_a_finite_optimum_warns_and_stops_at_the_grids_end():
  train, labels, kernel, bias, _ = _problem()
  with pytest.raises(ValueError, match="labels are required"):
    SCORER.fit(train, None, kernel, bias)
  right = np.argmax(_logits(train, kernel, bias), axis=1)  # every sample correct
  with pytest.warns(UserWarning, match="classifies every sample correctly.*held-out"):
    state = SCORER.fit(train, right, kernel, bias)
  assert float(state.temperature) < 1e-3  # towards 0, until the slope underflows
  wrong = np.argmin(_logits(train, kernel, bias), axis=1)  # worse than chance
  with pytest.warns(UserWarning, match="no better than chance"):
    state = SCORER.fit(train, wrong, kernel, bias)
  assert float(state.temperature) == pytest.approx(_temp_scaling.HIGHEST, rel=1e-3)
  flat = np.zeros_like(kernel)
  with pytest.raises(ValueError, match="equal logits"):
    SCORER.fit(train, labels, flat, None)


def test_refuses_a_generator_and_hyperparameters():
  train, labels, kernel, bias, _ = _problem()
  with pytest.raises(TypeError, match="re-iterable"):
    SCORER.fit_from_batches(iter(_batches(train, labels, (0, 100, 300))), kernel, bias)
  with pytest.raises(ValueError, match="valid: none"):
    SCORER.fit(train, labels, kernel, bias, temperature=1.5)


def test_nan_rows_score_nan_under_jit():
  train, labels, kernel, bias, test = _problem()
  state = SCORER.fit(train, labels, kernel, bias)
  bad = test.copy()
  bad[[1, 5], 3] = [np.nan, np.inf]
  got = np.asarray(jax.jit(lambda s, f: SCORER.score_fn(s, f))(state, bad))
  assert np.isnan(got[[1, 5]]).all()
  rest = np.setdiff1d(np.arange(B), [1, 5])
  np.testing.assert_allclose(
      got[rest], _max_softmax(_logits(test, kernel, bias), float(state.temperature))[rest],
      rtol=1e-5)


def test_exports_with_a_symbolic_batch():
  train, labels, kernel, bias, test = _problem()
  state = SCORER.fit(train, labels, kernel, bias)
  fn = jax.jit(lambda f: SCORER.score_fn(state, f, layout=layout.ACCELERATOR))
  batch = jax.export.symbolic_shape("b")[0]
  exported = jax.export.export(fn, platforms=("cpu",))(
      jax.ShapeDtypeStruct((batch, M), jnp.float32))
  for rows in (test, test[:3]):
    np.testing.assert_allclose(
        np.asarray(exported.call(rows)),
        _max_softmax(_logits(rows, kernel, bias), float(state.temperature)), rtol=1e-5)


def test_torch_baseline_matches_and_openoods_lbfgs_fit_is_no_better():
  pytest.importorskip("torch")
  from benchmarks import _torch_baselines_logit as baselines  # pylint: disable=g-import-not-at-top
  train, labels, kernel, bias, test = _problem()
  state = SCORER.fit(train, labels, kernel, bias)
  module = baselines.from_state("temp_scaling", state)
  assert not module.training
  np.testing.assert_allclose(baselines.score(module, test),
                             np.asarray(SCORER.score(state, test)), rtol=2e-4, atol=2e-4)
  z = _logits(train, kernel, bias)
  openood = baselines.openood_temperature(z, labels)
  assert _nll(z, labels, float(state.temperature)) <= _nll(z, labels, openood) + 1e-12
