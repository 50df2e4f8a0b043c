"""LTS: energy of the logits scaled by `(sum h / top-k sum)^2`, against a float64 reference.

Two samples with the same logits tie under energy and LTS separates them by
how their activations spread; the percentile changes the ranking; at
percentile 0 LTS is energy; signed features, an all-zero row, and narrow
features that keep one activation. The fold,
save / load, bad values, NaN rows, a symbolic batch under `jax.export` and
the PyTorch baseline.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import line_jax
from line_jax import fold as fold_lib
from line_jax import layout
from line_jax import scorers
from line_jax.scorers import _lts
from line_jax.scorers import _registry
from line_jax.scorers._registry import _scorer

pytestmark = pytest.mark.filterwarnings("error")

SCORER = _scorer("lts", _lts, _lts.LtsState)
N, M, C, B = 90, 40, 5, 16


def _problem(seed=0):
  rng = np.random.default_rng(seed)
  train = np.abs(rng.normal(size=(N, M))).astype(np.float32)
  labels = np.arange(N) % C
  kernel = (rng.normal(size=(M, C)) / np.sqrt(M)).astype(np.float32)
  bias = (0.1 * rng.normal(size=(C,))).astype(np.float32)
  # Rows of different sparsity, so the factor varies from row to row.
  test = (np.abs(rng.normal(size=(B, M))) * (rng.uniform(size=(B, M)) < rng.uniform(
      0.1, 1.0, size=(B, 1)))).astype(np.float32)
  return train, labels, kernel, bias, test


def _reference(h, kernel, bias, percentile):
  """logsumexp(S(h) z), S = (sum h / sum of the k largest h)^2, k = max(1, n - round(n p / 100))."""
  h = h.astype(np.float64)
  n = h.shape[1]
  k = max(1, n - int(np.round(n * percentile / 100.0)))
  top = -np.sort(-h, axis=1)[:, :k].sum(axis=1)
  factor = (h.sum(axis=1) / top) ** 2
  z = (h @ kernel.astype(np.float64) + bias.astype(np.float64)) * factor[:, None]
  top_z = z.max(axis=1)
  return top_z + np.log(np.exp(z - top_z[:, None]).sum(axis=1))


def _close(got, want, rtol=1e-5):
  np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * max(1.0, np.abs(want).max()))


@pytest.mark.parametrize("percentile", _lts.GRID["percentile"] + (0.0, 97.5, 99.0, 100.0))
@pytest.mark.parametrize("where", [layout.CPU, layout.ACCELERATOR])
def test_scores_equal_the_float64_reference(percentile, where):
  train, labels, kernel, bias, test = _problem()
  state = SCORER.fit(train, labels, kernel, bias, percentile=percentile)
  assert int(state.kept) == max(1, M - int(np.round(M * percentile / 100.0)))
  _close(np.asarray(SCORER.score(state, test, layout=where)),
         _reference(test, kernel, bias, percentile))


def test_equal_logits_tie_under_energy_and_lts_ranks_the_spread_sample_first():
  # Features 5.. do not reach the head: both samples have the same logits,
  # but the first spreads mass over them (S = (13 / 3)^2), the second not (S = 1).
  kernel = np.zeros((20, 3), np.float32)
  kernel[:5] = np.random.default_rng(2).normal(size=(5, 3))
  kernel[0] = [1.0, 0.2, -0.5]
  bias = np.zeros((3,), np.float32)
  spread = np.zeros((20,), np.float32)
  spread[0], spread[10:20] = 3.0, 1.0
  peaked = np.zeros((20,), np.float32)
  peaked[0] = 3.0
  pair = np.stack([spread, peaked])
  energy = scorers.get("energy")
  tied = np.asarray(energy.score(energy.fit(pair, None, kernel, bias), pair))
  assert tied[0] == tied[1]
  state = SCORER.fit(pair, None, kernel, bias)  # percentile 95: k = 1
  got = np.asarray(SCORER.score(state, pair))
  _close(got, _reference(pair, kernel, bias, 95.0))
  assert got[0] > got[1]


def test_the_percentile_changes_the_ranking():
  train, labels, kernel, bias, test = _problem()
  orders = {}
  for p in (65.0, 95.0):
    scores = np.asarray(SCORER.score(SCORER.fit(train, labels, kernel, bias, percentile=p), test))
    _close(scores, _reference(test, kernel, bias, p))
    orders[p] = tuple(np.argsort(scores))
  assert orders[65.0] != orders[95.0]


def test_percentile_zero_is_energy():
  train, labels, kernel, bias, test = _problem()
  energy = scorers.get("energy")
  _close(np.asarray(SCORER.score(SCORER.fit(train, labels, kernel, bias, percentile=0.0), test)),
         np.asarray(energy.score(energy.fit(train, labels, kernel, bias), test)), rtol=1e-6)


def test_signed_features_follow_the_official_code_and_a_zero_row_scores_energy():
  train, labels, kernel, bias, _ = _problem()
  rng = np.random.default_rng(3)
  signed = (rng.normal(size=(6, M)) + 0.3).astype(np.float32)  # no ReLU, as `lts.py`
  state = SCORER.fit(train, labels, kernel, bias, percentile=80.0)
  _close(np.asarray(SCORER.score(state, signed)), _reference(signed, kernel, bias, 80.0))
  zero = np.zeros((2, M), np.float32)
  energy_of_bias = np.log(np.exp(bias.astype(np.float64)).sum())
  _close(np.asarray(SCORER.score(state, zero)), np.full(2, energy_of_bias))


@pytest.mark.parametrize("width", [9, 10, 11, 20])
def test_narrow_features_keep_at_least_their_largest_activation(width):
  # At p = 95, 0.95 n rounds to n for n <= 10: k = 0 in the official code.
  train, labels, kernel, bias, test = _problem()
  state = SCORER.fit(train[:, :width], labels, kernel[:width], bias)
  assert int(state.kept) == max(1, width - int(np.round(width * 0.95)))
  _close(np.asarray(SCORER.score(state, test[:, :width])),
         _reference(test[:, :width], kernel[:width], bias, 95.0))


def test_fit_from_uneven_batches_and_merged_parts_equal_the_whole():
  train, labels, kernel, bias, _ = _problem()
  whole = SCORER.fit(train, labels, kernel, bias, percentile=70.0)
  edges = (0, 1, 40, 47, 90)
  batches = [(train[a:b], labels[a:b]) for a, b in zip(edges[:-1], edges[1:])]
  streamed = SCORER.fit_from_batches(batches, kernel, bias, percentile=70.0)
  merged = fold_lib.fit_parts(SCORER.fold, [batches[:2], batches[2:]], kernel, bias,
                              percentile=70.0)
  halves = SCORER.fold.merge(SCORER.fold.init(kernel, bias, percentile=70.0),
                             SCORER.fold.init(kernel, bias, percentile=70.0))
  for state in (streamed, merged, halves):
    assert isinstance(state, _lts.LtsState)
    chex.assert_trees_all_equal(state, whole)


@pytest.fixture
def registered(monkeypatch):
  """LTS in the registry for this test only (`line_jax.save` records the name)."""
  monkeypatch.setitem(_registry._REGISTRY, "lts", SCORER)
  monkeypatch.setitem(_registry._BY_STATE, _lts.LtsState, "lts")


def test_save_load_round_trip_scores_identically(tmp_path, registered):
  del registered
  train, labels, kernel, bias, test = _problem()
  state = SCORER.fit(train, labels, kernel, bias, percentile=85.0)
  line_jax.save(tmp_path / "lts", state)
  loaded = line_jax.load(tmp_path / "lts")
  assert type(loaded) is _lts.LtsState
  chex.assert_trees_all_equal(loaded, state)
  np.testing.assert_array_equal(np.asarray(SCORER.score(loaded, test)),
                                np.asarray(SCORER.score(state, test)))


@pytest.mark.parametrize("percentile, error, message", [
    (-1.0, ValueError, "percentile"), (100.5, ValueError, "percentile"),
    (float("nan"), ValueError, "percentile"), ("95", TypeError, "percentile")])
def test_bad_percentile_is_an_error_naming_it(percentile, error, message):
  train, labels, kernel, bias, _ = _problem()
  with pytest.raises(error, match=message):
    SCORER.fit(train, labels, kernel, bias, percentile=percentile)


def test_unknown_hyperparameter_names_percentile():
  train, labels, kernel, bias, _ = _problem()
  with pytest.raises(ValueError, match="valid: percentile"):
    SCORER.fit(train, labels, kernel, bias, p=0.05)


def test_nan_rows_score_nan_under_jit():
  train, labels, kernel, bias, test = _problem()
  state = SCORER.fit(train, labels, kernel, bias)
  bad = test.copy()
  bad[[1, 5], 3] = [np.nan, -np.inf]
  got = np.asarray(jax.jit(lambda s, f: SCORER.score_fn(s, f))(state, bad))
  assert np.isnan(got[[1, 5]]).all()
  rest = np.setdiff1d(np.arange(B), [1, 5])
  _close(got[rest], _reference(test, kernel, bias, 95.0)[rest])


def test_exports_with_a_symbolic_batch():
  train, labels, kernel, bias, test = _problem()
  state = SCORER.fit(train, labels, kernel, bias, percentile=75.0)
  fn = jax.jit(lambda f: SCORER.score_fn(state, f, layout=layout.ACCELERATOR))
  batch = jax.export.symbolic_shape("b")[0]
  exported = jax.export.export(fn, platforms=("cpu",))(
      jax.ShapeDtypeStruct((batch, M), jnp.float32))
  for rows in (test, test[:3]):
    _close(np.asarray(exported.call(rows)), _reference(rows, kernel, bias, 75.0))


def test_torch_baseline_matches_line_jax():
  pytest.importorskip("torch")
  from benchmarks import _torch_baselines_logit as baselines  # pylint: disable=g-import-not-at-top
  train, labels, kernel, bias, test = _problem()
  for p in (65.0, 95.0):
    state = SCORER.fit(train, labels, kernel, bias, percentile=p)
    module = baselines.from_state("lts", state)
    assert not module.training
    np.testing.assert_allclose(baselines.score(module, test),
                               np.asarray(SCORER.score(state, test)), rtol=2e-4, atol=2e-4)
