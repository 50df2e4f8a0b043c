"""CFOOD: float64 references of the official code, the bounded reference set,
streaming, merging, saving, export.

The registry entry is built here (`_scorer`) as the registry builds it. The
reference follows `cfood_postprocessor.py` step by step (a sort of every
reference row's distances, the count loop per test row). The problem makes
the definition's parts matter: a reference set small enough that the share
grid has duplicate ranks (dropped), test rows inside the data (small
shares), off it (large ones) and opposite to it (no share reaches k: -1),
several k, and alpha below 1 with a bank smaller than alpha N.
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
from line_jax.scorers import _cfood
from line_jax.scorers import _row_subset
from line_jax.scorers import _registry
from line_jax.scorers._registry import _scorer

pytestmark = pytest.mark.filterwarnings("error")

SCORER = _scorer("cfood", _cfood, _cfood.CfoodState)
N, M, C, B = 200, 10, 4, 30


def _problem(seed=0):
  """Post-ReLU class-structured training rows; test rows near them, noisy,
  and opposite in sign."""
  rng = np.random.default_rng(seed)
  labels = rng.permutation(np.arange(N) % C)
  train = np.abs(rng.normal(size=(N, M))).astype(np.float32)
  train += np.eye(C, M, dtype=np.float32)[labels] * 2
  kernel = rng.normal(size=(M, C)).astype(np.float32)
  bias = rng.normal(size=(C,)).astype(np.float32)
  near = train[rng.integers(0, N, B // 3)] + rng.normal(size=(B // 3, M)) * 0.1
  noisy = np.abs(rng.normal(size=(B // 3, M))) * 1.5
  opposite = -np.abs(rng.normal(size=(B - 2 * (B // 3), M)))
  test = np.concatenate([near, noisy, opposite]).astype(np.float32)
  return train, labels, kernel, bias, test


def _normalise(h):
  h = h.astype(np.float64)
  return h / (np.linalg.norm(h, axis=1, keepdims=True) + 1e-10)


def _reference_rows(train, alpha, bank_size=10**9, seed=0):
  """The official n = int(alpha N) rows, as the rows of smallest seeded hash."""
  n = min(int(alpha * len(train)) if alpha < 1 else len(train), bank_size)
  keys = _row_subset.row_keys(train, seed)
  return train[np.argsort(keys, kind="stable")[:n]]


def _reference(ref_rows, test, k):
  """cfood_postprocessor.py's setup (after the subsample) and postprocess, in float64."""
  ref = _normalise(ref_rows)
  n = len(ref)
  kval = np.concatenate((np.linspace(0.001, 0.1, 100), np.linspace(0.105, 0.5, 81),
                         np.linspace(0.51, 0.99, 49)))
  kpos = np.array(kval * n - 1, dtype=int)
  keep = np.concatenate(([True], kpos[:-1] < kpos[1:]))
  kval, kpos = kval[keep], kpos[keep]
  knndst = np.zeros((n, len(kpos)))
  for i in range(n):
    knndst[i] = np.sort(np.sum((ref[i] - ref) ** 2, axis=1))[kpos + 1]
  scores = []
  for v in _normalise(test):
    dst = np.sum((v - ref) ** 2, axis=1)
    count = (knndst >= dst[:, None]).sum(axis=0).astype(np.float32) / np.float32(n)
    pos = np.flatnonzero(count >= np.float32(k))
    scores.append(kval[pos[0]] if pos.size else 1.0)
  return -np.asarray(scores), knndst, kval


def _close(got, want, rtol=1e-6):
  np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol)


@pytest.mark.parametrize("k", [0.001, 0.01, 0.05, 0.3, 1.0])
@pytest.mark.parametrize("where", [layout.CPU, layout.ACCELERATOR])
def test_scores_equal_the_official_reference(k, where):
  train, labels, kernel, bias, test = _problem()
  state = SCORER.fit(train, labels, kernel, bias, alpha=1.0, k=k)
  assert state.size == N
  got = np.asarray(SCORER.score(state, test, layout=where))
  want, _, _ = _reference(_reference_rows(train, 1.0), test, k)
  _close(got, want)
  if k <= 0.05:  # near rows score above noisy rows, noisy above opposite ones (-1)
    third = B // 3
    assert got[:third].mean() > got[third:2 * third].mean() > got[2 * third:].mean()
    np.testing.assert_array_equal(got[2 * third:], -1.0)
    assert len(np.unique(got[:2 * third])) > 5


def test_the_radii_are_the_official_precompute():
  train, labels, kernel, bias, _ = _problem()
  state = SCORER.fit(train, labels, kernel, bias, alpha=1.0, block_rows=64)
  _, knndst, kval = _reference(_reference_rows(train, 1.0), train[:1], 0.01)
  radii = np.asarray(state.radii).reshape(-1, knndst.shape[1])
  _close(radii[:N], knndst, rtol=2e-5)
  assert np.all(radii[N:] == -np.inf)
  _close(np.asarray(state.kappas), np.append(kval, 1.0))
  assert state.bank.shape[:2] == (4, 64) and int(state.count) == 2


def test_host_and_device_sorts_give_the_same_radii_computed_once(monkeypatch):
  """The CPU layout sorts the distances with NumPy, an accelerator's on the
  device: the same values. Equal reference rows (tune's grid of k at one
  alpha) reuse the last radii instead of recomputing them."""
  ref = _cfood.normalise(jnp.asarray(_problem()[0]))
  _, kpos = _cfood.shares(N)
  monkeypatch.setattr(_cfood, "_last_radii", None)
  host = _cfood._radii(ref, kpos + 1)
  assert _cfood._radii(jnp.array(ref, copy=True), kpos + 1) is host
  monkeypatch.setattr(_cfood, "_last_radii", None)
  monkeypatch.setattr(layout.Layout, "sorts_on_host", lambda self: False)
  device = _cfood._radii(ref, kpos + 1)
  assert device is not host
  np.testing.assert_array_equal(device, host)
  other = _cfood._radii(ref, kpos[:-1] + 1)  # other ranks: computed anew
  np.testing.assert_array_equal(other, host[:, :-1])


@pytest.mark.parametrize("n", [2, 3, 15, 150, 1000, 5000])
def test_the_share_grid_drops_duplicate_ranks(n):
  kval, kpos = _cfood.shares(n)
  assert np.all(np.diff(kpos) > 0) and kpos[0] >= 0 and kpos[-1] + 1 <= n - 1
  assert len(kval) == (230 if n >= 1000 else len(np.unique(np.array(
      np.concatenate((np.linspace(0.001, 0.1, 100), np.linspace(0.105, 0.5, 81),
                      np.linspace(0.51, 0.99, 49))) * n - 1, dtype=int))))


def test_the_needed_count_compares_float32_shares():
  assert _cfood.needed(0.01, 200) == 2 and _cfood.needed(1.0, 7) == 7
  assert _cfood.needed(0.001, 200) == 1 and _cfood.needed(0.05, 30) == 2
  for k, n in ((0.1, 30), (0.3, 10), (0.07, 100)):
    c = _cfood.needed(k, n)
    assert np.float32(c) / np.float32(n) >= np.float32(k) > np.float32(c - 1) / np.float32(n)


@pytest.mark.parametrize("alpha, bank_size, size", [(0.1, 1000, 20), (0.5, 1000, 100),
                                                    (0.5, 60, 60), (1.0, 30, 30)])
def test_the_reference_set_is_alpha_of_the_samples_capped_at_bank_size(alpha, bank_size, size):
  train, labels, kernel, bias, test = _problem()
  state = SCORER.fit(train, labels, kernel, bias, alpha=alpha, bank_size=bank_size, seed=4)
  assert state.size == size
  ref = _reference_rows(train, alpha, bank_size, seed=4)
  assert len(ref) == size
  _close(np.asarray(state.bank).reshape(-1, M)[:size], _normalise(ref), rtol=1e-6)
  _close(np.asarray(SCORER.score(state, test)), _reference(ref, test, 0.01)[0])


@pytest.mark.parametrize("block_rows", [1, 7, 64, 199, 200])
def test_blocks_with_padding_give_the_same_scores(block_rows):
  train, labels, kernel, bias, test = _problem()
  state = SCORER.fit(train, labels, kernel, bias, alpha=1.0, k=0.05, block_rows=block_rows)
  assert state.bank.shape[:2] == (-(-N // block_rows), block_rows)
  _close(np.asarray(SCORER.score(state, test)),
         _reference(_reference_rows(train, 1.0), test, 0.05)[0])


def test_the_precompute_runs_in_bounded_blocks(monkeypatch):
  monkeypatch.setattr(_cfood, "_PRECOMPUTE_FLOATS", 7 * N)  # 7 rows per block
  train, labels, kernel, bias, test = _problem()
  state = SCORER.fit(train, labels, kernel, bias, alpha=1.0)
  _, knndst, _ = _reference(_reference_rows(train, 1.0), test, 0.01)
  _close(np.asarray(state.radii).reshape(-1, knndst.shape[1])[:N], knndst, rtol=2e-5)


@pytest.mark.parametrize("hparams", [{"alpha": 1.0}, {"alpha": 0.5, "bank_size": 64}])
def test_streamed_fit_over_uneven_batches_equals_the_whole(hparams):
  train, labels, kernel, bias, test = _problem()
  edges = np.cumsum((0, 1, 90, 7, 62, 40))
  batches = [(train[a:b], None) for a, b in zip(edges[:-1], edges[1:])]
  whole = SCORER.fit(train, labels, kernel, bias, **hparams)
  streamed = SCORER.fit_from_batches(iter(batches), kernel, bias, **hparams)
  chex.assert_trees_all_close(streamed, whole, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(SCORER.score(streamed, test)),
                                np.asarray(SCORER.score(whole, test)))


@pytest.mark.parametrize("hparams", [{}, {"alpha": 1.0, "bank_size": 64}])
@pytest.mark.parametrize("edges", [(0, 100, 200), (0, 1, 64, 64, 200), (0, 0, 200)])
def test_merged_parts_equal_the_whole(hparams, edges):
  train, labels, kernel, bias, _ = _problem()
  parts = [[(train[a:b], labels[a:b])] if b > a else [] for a, b in zip(edges[:-1], edges[1:])]
  merged = fold_lib.fit_parts(SCORER.fold, parts, kernel, bias, **hparams)
  chex.assert_trees_all_close(merged, SCORER.fit(train, labels, kernel, bias, **hparams),
                              rtol=1e-6, atol=1e-6)


def test_save_load_round_trip(tmp_path, monkeypatch):
  monkeypatch.setitem(_registry._REGISTRY, SCORER.name, SCORER)
  monkeypatch.setitem(_registry._BY_STATE, SCORER.state_type, SCORER.name)
  train, labels, kernel, bias, test = _problem()
  state = SCORER.fit(train, labels, kernel, bias, alpha=0.5, k=0.05, block_rows=32)
  line_jax.save(tmp_path / "cfood", state)
  loaded = line_jax.load(tmp_path / "cfood")
  assert type(loaded) is _cfood.CfoodState
  chex.assert_trees_all_equal(loaded, state)  # the static size included
  np.testing.assert_array_equal(np.asarray(SCORER.score(loaded, test)),
                                np.asarray(SCORER.score(state, test)))


@pytest.mark.parametrize("hparams, error, match", [
    ({"alpha": 0}, ValueError, "alpha must be a positive finite number"),
    ({"alpha": 1.5}, ValueError, r"alpha must lie in \(0, 1\], got 1.5"),
    ({"alpha": "0.1"}, TypeError, "alpha must be a real number"),
    ({"k": -0.01}, ValueError, "k must be a positive finite number"),
    ({"k": 2.0}, ValueError, r"k must lie in \(0, 1\], got 2.0"),
    ({"k": float("nan")}, ValueError, "k must be a positive finite number"),
    ({"bank_size": 1}, ValueError, "bank_size must be at least 2"),
    ({"seed": -1}, ValueError, "seed must be at least 0"),
    ({"block_rows": 0}, ValueError, "block_rows must be at least 1"),
    ({"avg_topk": True}, ValueError, "unknown hyperparameter.*avg_topk.*valid: alpha, k"),
])
def test_bad_hyperparameters_are_named(hparams, error, match):
  train, labels, kernel, bias, _ = _problem()
  with pytest.raises(error, match=match):
    SCORER.fit(train, labels, kernel, bias, **hparams)


def test_too_few_reference_rows_are_refused():
  train, labels, kernel, bias, _ = _problem()
  with pytest.raises(ValueError, match="at least 2 reference rows, but alpha = 0.1 of 15 "
                                       "training samples gives 1"):
    SCORER.fit(train[:15], labels[:15], kernel, bias)


def test_defaults_and_grid():
  assert dict(SCORER.defaults) == {"alpha": 0.1, "k": 0.01, "bank_size": 50_000, "seed": 0,
                                   "block_rows": 1024}
  assert dict(SCORER.grid) == {"alpha": (0.1, 0.5, 1.0), "k": (0.001, 0.005, 0.01, 0.05)}


def test_states_at_several_k_stack():
  from line_jax.runs import tune  # pylint: disable=g-import-not-at-top
  train, labels, kernel, bias, test = _problem()
  states = [SCORER.fit(train, labels, kernel, bias, k=k) for k in (0.01, 0.05)]
  stacked, in_axes = tune.stack(SCORER.score, states, jax.ShapeDtypeStruct((B, M), jnp.float32))
  assert in_axes.bank is None and in_axes.count == 0
  got = jax.vmap(SCORER.score_fn, in_axes=(in_axes, None))(stacked, jnp.asarray(test))
  for row, state in zip(np.asarray(got), states):
    np.testing.assert_array_equal(row, np.asarray(SCORER.score(state, test)))


def test_a_nan_row_scores_nan():
  train, labels, kernel, bias, test = _problem()
  state = SCORER.fit(train, labels, kernel, bias, alpha=1.0, block_rows=64)
  bad = test.copy()
  bad[2, 5] = np.nan
  got = np.asarray(SCORER.score(state, bad))
  assert np.isnan(got[2]) and np.all(np.isfinite(np.delete(got, 2)))
  np.testing.assert_array_equal(np.delete(got, 2),
                                np.delete(np.asarray(SCORER.score(state, test)), 2))


def test_random_problem_with_defaults():
  features, labels, kernel, bias = random_problem(4, 12, 48, seed=1)
  state = SCORER.fit(features, labels, kernel, bias)
  assert state.size == 4
  x = np.concatenate([np.zeros((1, 12), np.float32), features[:8]])
  got = np.asarray(SCORER.score(state, x))
  _close(got, _reference(_reference_rows(features, 0.1), x, 0.01)[0])


def test_export_with_a_symbolic_batch():
  train, labels, kernel, bias, test = _problem()
  state = SCORER.fit(train, labels, kernel, bias, alpha=0.5, block_rows=32)
  batch = jax.export.symbolic_shape("b")[0]
  exported = jax.export.export(
      jax.jit(lambda f: SCORER.score_fn(state, f, layout=layout.ACCELERATOR)),
      platforms=("cpu",))(jax.ShapeDtypeStruct((batch, M), jnp.float32))
  for rows in (test, test[:3]):
    np.testing.assert_array_equal(np.asarray(exported.call(rows)),
                                  np.asarray(SCORER.score(state, rows)))


@pytest.mark.parametrize("k", [0.01, 0.3])
def test_torch_baseline_matches(k):
  baselines = pytest.importorskip("benchmarks._torch_baselines_bank")
  train, labels, kernel, bias, test = _problem()
  state = SCORER.fit(train, labels, kernel, bias, alpha=0.5, k=k, block_rows=32)
  module = baselines.from_state("cfood", state)
  assert not module.training
  np.testing.assert_allclose(baselines.score(module, test),
                             np.asarray(SCORER.score(state, test)), rtol=2e-4, atol=2e-4)
