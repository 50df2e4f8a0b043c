"""Relation: float64 references, the bounded bank, streaming, merging, saving, export.

The registry entry is built here (`_scorer`) as the registry builds it. The
problem makes the definition's parts matter: features of both signs (some
feature similarities are negative and clamped at 0), relations on both
sides of the 0.03 threshold, powers above 1, a bank of several blocks with
zero padding, and a bank smaller than the training set.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import line_jax
from conftest import random_problem
from line_jax import fold as fold_lib
from line_jax import layout
from line_jax.scorers import _row_subset
from line_jax.scorers import _registry
from line_jax.scorers import _relation
from line_jax.scorers._registry import _scorer

pytestmark = pytest.mark.filterwarnings("error")

SCORER = _scorer("relation", _relation, _relation.RelationState)
N, M, C, B = 150, 12, 5, 24


def _problem(seed=0):
  """Class-structured features of both signs; test rows: the first half near
  the training classes, the second half random directions."""
  rng = np.random.default_rng(seed)
  labels = rng.permutation(np.arange(N) % C)
  centres = rng.normal(size=(C, M)) * 2.0
  train = (centres[labels] + rng.normal(size=(N, M))).astype(np.float32)
  kernel = (centres.T / 2.0 + rng.normal(size=(M, C)) * 0.3).astype(np.float32)
  bias = rng.normal(size=(C,)).astype(np.float32) * 0.1
  near = centres[rng.integers(0, C, B // 2)] + rng.normal(size=(B // 2, M))
  far = rng.normal(size=(B // 2, M)) * 2.0
  test = np.concatenate([near, far]).astype(np.float32)
  return train, labels, kernel, bias, test


def _normalise(h):
  h = h.astype(np.float64)
  return h / np.sqrt((h * h).sum(axis=1, keepdims=True) + 1e-10)


def _softmax(h, kernel, bias):
  z = h.astype(np.float64) @ kernel.astype(np.float64) + bias.astype(np.float64)
  e = np.exp(z - z.max(axis=1, keepdims=True))
  return e / e.sum(axis=1, keepdims=True)


def _relations(bank, test, kernel, bias):
  dot = _normalise(test) @ _normalise(bank).T
  sim = _softmax(test, kernel, bias) @ _softmax(bank, kernel, bias).T
  return np.maximum(dot, 0.0) * sim, dot


def _reference(bank, test, kernel, bias, power=1, threshold=0.03):
  """As `get_relation`: mask |r| > thres, sum sign(r) |r| ** pow."""
  rel, _ = _relations(bank, test, kernel, bias)
  kept = np.where(np.abs(rel) > threshold, rel, 0.0)
  return (np.sign(kept) * np.abs(kept) ** power).sum(axis=1)


def _close(got, want, rtol=1e-5):
  np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * max(1.0, np.abs(want).max()))


def _bank_rows(train, bank_size, seed=0):
  """The rows of the `bank_size` smallest seeded row hashes."""
  keys = _row_subset.row_keys(train, seed)
  return train[np.sort(np.argsort(keys, kind="stable")[:bank_size])]


def test_the_problem_exercises_the_clamp_and_the_threshold():
  train, _, kernel, bias, test = _problem()
  rel, dot = _relations(train, test, kernel, bias)
  assert np.mean(dot < 0) > 0.2
  assert np.mean((rel > 0) & (rel <= 0.03)) > 0.05 and np.mean(rel > 0.03) > 0.2


@pytest.mark.parametrize("power", [1, 2, 4, 8])
@pytest.mark.parametrize("where", [layout.CPU, layout.ACCELERATOR])
def test_scores_equal_the_float64_reference_and_far_rows_score_lower(power, where):
  train, labels, kernel, bias, test = _problem()
  state = SCORER.fit(train, labels, kernel, bias, power=power)
  assert state.size == N and state.bank.shape[0] == 1
  got = np.asarray(SCORER.score(state, test, layout=where))
  want = _reference(train, test, kernel, bias, power)
  _close(got, want)
  assert np.median(got[: B // 2]) > np.median(got[B // 2:])


@pytest.mark.parametrize("threshold", [0.0, 0.03, 0.2])
def test_the_threshold_drops_weak_relations(threshold):
  train, labels, kernel, bias, test = _problem()
  state = SCORER.fit(train, labels, kernel, bias, power=2, threshold=threshold)
  want = _reference(train, test, kernel, bias, 2, threshold)
  _close(np.asarray(SCORER.score(state, test)), want)
  if threshold:
    assert not np.allclose(want, _reference(train, test, kernel, bias, 2, 0.0))


@pytest.mark.parametrize("block_rows", [1, 16, 64, 149])
def test_blocks_with_padding_give_the_same_scores(block_rows):
  train, labels, kernel, bias, test = _problem()
  state = SCORER.fit(train, labels, kernel, bias, power=4, block_rows=block_rows)
  assert state.bank.shape[:2] == (-(-N // block_rows), block_rows)
  _close(np.asarray(SCORER.score(state, test)), _reference(train, test, kernel, bias, 4))


@pytest.mark.parametrize("seed", [0, 3])
def test_a_bounded_bank_keeps_the_seeded_smallest_hashes(seed):
  train, labels, kernel, bias, test = _problem()
  state = SCORER.fit(train, labels, kernel, bias, bank_size=40, seed=seed, block_rows=16)
  assert state.size == 40
  rows = _bank_rows(train, 40, seed)
  got_bank = np.asarray(state.bank).reshape(-1, M)[:40]
  # The same rows (in hash order), normalised.
  order = np.lexsort(got_bank.T), np.lexsort(_normalise(rows).T)
  _close(got_bank[order[0]], _normalise(rows)[order[1]], rtol=1e-6)
  _close(np.asarray(SCORER.score(state, test)), _reference(rows, test, kernel, bias))
  assert not np.allclose(np.asarray(SCORER.score(state, test)),
                         _reference(train, test, kernel, bias))


@pytest.mark.parametrize("bank_size", [N, 40])
def test_streamed_fit_over_uneven_batches_equals_the_whole(bank_size):
  train, labels, kernel, bias, test = _problem()
  edges = np.cumsum((0, 1, 60, 7, 42, 40))
  batches = [(train[a:b], labels[a:b]) for a, b in zip(edges[:-1], edges[1:])]
  whole = SCORER.fit(train, labels, kernel, bias, bank_size=bank_size)
  streamed = SCORER.fit_from_batches(iter(batches), kernel, bias, bank_size=bank_size)
  chex.assert_trees_all_close(streamed, whole, rtol=1e-6, atol=1e-6)
  _close(np.asarray(SCORER.score(streamed, test)), np.asarray(SCORER.score(whole, test)))


@pytest.mark.parametrize("bank_size", [N, 40])
@pytest.mark.parametrize("edges", [(0, 75, 150), (0, 1, 64, 64, 150), (0, 0, 150)])
def test_merged_parts_equal_the_whole(bank_size, edges):
  train, labels, kernel, bias, _ = _problem()
  parts = [[(train[a:b], labels[a:b])] if b > a else [] for a, b in zip(edges[:-1], edges[1:])]
  merged = fold_lib.fit_parts(SCORER.fold, parts, kernel, bias, bank_size=bank_size)
  chex.assert_trees_all_close(merged, SCORER.fit(train, labels, kernel, bias,
                                                 bank_size=bank_size), rtol=1e-6, atol=1e-6)


def test_save_load_round_trip(tmp_path, monkeypatch):
  monkeypatch.setitem(_registry._REGISTRY, SCORER.name, SCORER)
  monkeypatch.setitem(_registry._BY_STATE, SCORER.state_type, SCORER.name)
  train, labels, kernel, bias, test = _problem()
  state = SCORER.fit(train, labels, kernel, bias, power=6, block_rows=64)
  line_jax.save(tmp_path / "relation", state)
  loaded = line_jax.load(tmp_path / "relation")
  assert type(loaded) is _relation.RelationState
  chex.assert_trees_all_equal(loaded, state)  # the static size included
  np.testing.assert_array_equal(np.asarray(SCORER.score(loaded, test)),
                                np.asarray(SCORER.score(state, test)))


@pytest.mark.parametrize("hparams, error, match", [
    ({"power": 0}, ValueError, "power must be a positive finite number"),
    ({"power": -1.0}, ValueError, "power must be a positive finite number"),
    ({"power": "2"}, TypeError, "power must be a real number"),
    ({"threshold": -0.1}, ValueError, "threshold must be a finite number >= 0"),
    ({"threshold": float("nan")}, ValueError, "threshold must be a finite number >= 0"),
    ({"threshold": True}, TypeError, "threshold must be a real number"),
    ({"bank_size": 0}, ValueError, "bank_size must be at least 1"),
    ({"seed": -1}, ValueError, "seed must be at least 0"),
    ({"block_rows": 1.5}, TypeError, "block_rows must be an integer"),
    ({"pow": 2}, ValueError, "unknown hyperparameter.*pow.*valid: power, threshold"),
])
def test_bad_hyperparameters_are_named(hparams, error, match):
  train, labels, kernel, bias, _ = _problem()
  with pytest.raises(error, match=match):
    SCORER.fit(train, labels, kernel, bias, **hparams)


def test_defaults_and_grid():
  assert dict(SCORER.defaults) == {"power": 1, "threshold": 0.03, "bank_size": 50_000,
                                   "seed": 0, "block_rows": 8192}
  assert dict(SCORER.grid) == {"power": (1, 2, 4, 6, 8)}


def test_grid_states_share_the_bank_and_stack():
  """Only power differs between the grid's states: they stack under vmap."""
  from line_jax.runs import tune  # pylint: disable=g-import-not-at-top
  train, labels, kernel, bias, test = _problem()
  states = [SCORER.fit(train, labels, kernel, bias, power=p) for p in (1, 4)]
  stacked, in_axes = tune.stack(SCORER.score, states,
                                jax.ShapeDtypeStruct((B, M), jnp.float32))
  assert in_axes.bank is None and in_axes.power == 0
  got = jax.vmap(SCORER.score_fn, in_axes=(in_axes, None))(stacked, jnp.asarray(test))
  for row, state in zip(np.asarray(got), states):
    _close(row, np.asarray(SCORER.score(state, test)))


def test_a_nan_row_scores_nan():
  train, labels, kernel, bias, test = _problem()
  state = SCORER.fit(train, labels, kernel, bias, block_rows=64)
  bad = test.copy()
  bad[2, 5] = np.nan
  got = np.asarray(SCORER.score(state, bad))
  assert np.isnan(got[2]) and np.all(np.isfinite(np.delete(got, 2)))
  np.testing.assert_array_equal(np.delete(got, 2),
                                np.delete(np.asarray(SCORER.score(state, test)), 2))


def test_an_all_zero_row_relates_to_nothing():
  train, labels, kernel, bias, test = _problem()
  state = SCORER.fit(train, labels, kernel, bias)
  test[0] = 0.0
  got = np.asarray(SCORER.score(state, test))
  assert got[0] == 0.0 and np.all(np.isfinite(got))


def test_random_problem_with_defaults():
  features, labels, kernel, bias = random_problem(4, 12, 48, seed=1)
  state = SCORER.fit(features, labels, kernel, bias)
  got = np.asarray(SCORER.score(state, features[:8]))
  assert np.all(np.isfinite(got)) and np.all(got > 0)
  _close(got, _reference(features, features[:8], kernel, bias))


def test_export_with_a_symbolic_batch():
  train, labels, kernel, bias, test = _problem()
  state = SCORER.fit(train, labels, kernel, bias, power=2, block_rows=64)
  batch = jax.export.symbolic_shape("b")[0]
  exported = jax.export.export(
      jax.jit(lambda f: SCORER.score_fn(state, f, layout=layout.ACCELERATOR)),
      platforms=("cpu",))(jax.ShapeDtypeStruct((batch, M), jnp.float32))
  for rows in (test, test[:3]):
    _close(np.asarray(exported.call(rows)), np.asarray(SCORER.score(state, rows)))


@pytest.mark.parametrize("power", [1, 4])
def test_torch_baseline_matches(power):
  baselines = pytest.importorskip("benchmarks._torch_baselines_bank")
  train, labels, kernel, bias, test = _problem()
  state = SCORER.fit(train, labels, kernel, bias, power=power, bank_size=100, block_rows=64)
  module = baselines.from_state("relation", state)
  assert not module.training
  np.testing.assert_allclose(baselines.score(module, test),
                             np.asarray(SCORER.score(state, test)), rtol=2e-4, atol=2e-4)
