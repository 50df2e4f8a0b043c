"""Residual: minus the norm of `h - origin` outside ViM's principal space.

Against a float64 reference written as the official `benchmark.py` computes
it (`np.linalg.eig` of the covariance around the origin), on features near
a low-dimensional subspace, where rows off it score lower; the subspace is
ViM's (ViM's score is energy minus alpha times this residual); ViM's `dim`
rule and refusals. The fold (uneven batches, merged parts, NumPy parts),
save / load, NaN rows, a symbolic batch under `jax.export` and the PyTorch
baseline.
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
from line_jax.scorers import _registry
from line_jax.scorers import _residual
from line_jax.scorers import _vim
from line_jax.scorers._registry import _scorer

pytestmark = pytest.mark.filterwarnings("error")

SCORER = _scorer("residual", _residual, _residual.ResidualState)
N, M, C, B, D = 160, 16, 4, 20, 6


def _problem(seed=0):
  """Training rows near a D-dimensional subspace through the head's origin
  `-pinv(W) b` (ViM's subspace is around it, not around the mean); test
  rows: the first half near it, the second half off it."""
  rng = np.random.default_rng(seed)
  labels = np.arange(N) % C
  kernel = rng.normal(size=(M, C)).astype(np.float32)
  bias = rng.normal(size=(C,)).astype(np.float32)
  origin = -np.linalg.pinv(kernel.T.astype(np.float64)) @ bias
  basis = np.linalg.qr(rng.normal(size=(M, D)))[0].T  # [D, M] orthonormal rows
  def near(n, off):
    shift = np.eye(1, D)[0] * 3.0  # a mean off the origin, inside the subspace
    return (origin + (rng.normal(size=(n, D)) * 2.0 + shift) @ basis
            + rng.normal(size=(n, M)) * off).astype(np.float32)
  train = near(N, 0.05)
  test = np.concatenate([near(B // 2, 0.05), near(B // 2, 1.0)])
  return train, labels, kernel, bias, test


def _reference(train, test, kernel, bias, dim):
  """As the official code: origin -pinv(W) b, eig of the covariance around it."""
  w = kernel.T.astype(np.float64)
  origin = -np.linalg.pinv(w) @ bias.astype(np.float64)
  centred = train.astype(np.float64) - origin
  values, vectors = np.linalg.eig(centred.T @ centred / len(train))
  null = vectors.real[:, np.argsort(-values.real)[dim:]]
  return -np.linalg.norm((test.astype(np.float64) - origin) @ null, axis=-1)


def _close(got, want, rtol=1e-5):
  np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * max(1.0, np.abs(want).max()))


@pytest.mark.parametrize("where", [layout.CPU, layout.ACCELERATOR])
def test_scores_equal_the_float64_reference_and_rows_off_the_subspace_score_lower(where):
  train, labels, kernel, bias, test = _problem()
  state = SCORER.fit(train, labels, kernel, bias, dim=D)
  got = np.asarray(SCORER.score(state, test, layout=where))
  want = _reference(train, test, kernel, bias, D)
  _close(got, want)
  assert got[: B // 2].min() > got[B // 2:].max()
  chex.assert_shape(state.residual, (M, M - D))
  assert state.dim == D


def test_the_subspace_is_vims_and_vim_is_energy_minus_alpha_times_the_residual():
  train, labels, kernel, bias, test = _problem(seed=1)
  vim, energy = scorers.get("vim"), scorers.get("energy")
  vim_state = vim.fit(train, labels, kernel, bias, dim=D)
  state = SCORER.fit(train, labels, kernel, bias, dim=D)
  projector = lambda r: np.asarray(r, np.float64) @ np.asarray(r, np.float64).T
  np.testing.assert_allclose(projector(state.residual), projector(vim_state.residual),
                             atol=1e-6)
  np.testing.assert_allclose(np.asarray(state.origin), np.asarray(vim_state.origin))
  want = (np.asarray(energy.score(energy.fit(train, labels, kernel, bias), test), np.float64)
          + float(vim_state.alpha) * np.asarray(SCORER.score(state, test), np.float64))
  _close(np.asarray(vim.score(vim_state, test)), want, rtol=1e-4)


def test_default_dim_is_vims_rule_on_the_head():
  train, labels, kernel, bias, test = _problem()
  assert dict(SCORER.defaults) == {"dim": None} and dict(SCORER.grid) == dict(_vim.GRID)
  state = SCORER.fit(train, labels, kernel, bias)
  assert state.dim == _vim.default_dim(M) == M // 2
  assert scorers.resolved_hparams({"dim": None}, state) == {"dim": M // 2}
  _close(np.asarray(SCORER.score(state, test)), _reference(train, test, kernel, bias, M // 2))


@pytest.mark.parametrize("dim, error, message", [
    (M, ValueError, f"Residual's dim={M} must be below the feature count {M}"),
    (512, ValueError, "dim=512 must be below"), (0, ValueError, "dim must be at least 1"),
    (2.5, TypeError, "dim must be an integer"), (True, TypeError, "dim must be an integer")])
def test_bad_dim_is_an_error_naming_it(dim, error, message):
  train, labels, kernel, bias, _ = _problem()
  with pytest.raises(error, match=message):
    SCORER.fit(train, labels, kernel, bias, dim=dim)


def test_unknown_hyperparameter_lists_dim():
  train, labels, kernel, bias, _ = _problem()
  with pytest.raises(ValueError, match="valid: dim"):
    SCORER.fit(train, labels, kernel, bias, d=4)


def test_fit_from_uneven_batches_and_merged_parts_equal_the_whole():
  train, labels, kernel, bias, test = _problem()
  whole = SCORER.fit(train, labels, kernel, bias, dim=D)
  edges = (0, 1, 50, 57, 160)
  batches = [(train[a:b], None) for a, b in zip(edges[:-1], edges[1:])]
  streamed = SCORER.fit_from_batches(batches, kernel, bias, dim=D)
  merged = fold_lib.fit_parts(SCORER.fold, [batches[:2], [], batches[2:]], kernel, bias, dim=D)
  for state in (streamed, merged):
    assert isinstance(state, _residual.ResidualState)
    chex.assert_trees_all_close(state, whole, rtol=1e-6, atol=1e-6)
    _close(np.asarray(SCORER.score(state, test)), np.asarray(SCORER.score(whole, test)),
           rtol=1e-6)


def test_merging_numpy_accumulators_keeps_float64():
  train, labels, kernel, bias, _ = _problem()
  fold = SCORER.fold
  parts = [jax.tree.map(np.asarray, fold.update(fold.init(kernel, bias, dim=D), train[a:b], None))
           for a, b in ((0, 70), (70, N))]
  merged = fold.finalize(fold_lib.merge_all(fold, parts))
  direct = fold_lib.fit_parts(fold, [[(train[:70], None)], [(train[70:], None)]], kernel, bias,
                              dim=D)
  chex.assert_trees_all_equal(merged, direct)


@pytest.fixture
def registered(monkeypatch):
  """Residual in the registry for this test only (`line_jax.save` records the name)."""
  monkeypatch.setitem(_registry._REGISTRY, "residual", SCORER)
  monkeypatch.setitem(_registry._BY_STATE, _residual.ResidualState, "residual")


def test_save_load_round_trip_scores_identically(tmp_path, registered):
  del registered
  train, labels, kernel, bias, test = _problem()
  state = SCORER.fit(train, labels, kernel, bias, dim=D)
  line_jax.save(tmp_path / "residual", state)
  loaded = line_jax.load(tmp_path / "residual")
  assert type(loaded) is _residual.ResidualState
  chex.assert_trees_all_equal(loaded, state)
  np.testing.assert_array_equal(np.asarray(SCORER.score(loaded, test)),
                                np.asarray(SCORER.score(state, test)))


def test_nan_rows_score_nan_under_jit():
  train, labels, kernel, bias, test = _problem()
  state = SCORER.fit(train, labels, kernel, bias, dim=D)
  bad = test.copy()
  bad[[0, 11], 3] = [np.nan, -np.inf]
  got = np.asarray(jax.jit(lambda s, f: SCORER.score_fn(s, f))(state, bad))
  assert np.isnan(got[[0, 11]]).all()
  rest = np.setdiff1d(np.arange(B), [0, 11])
  _close(got[rest], _reference(train, test, kernel, bias, D)[rest])


def test_exports_with_a_symbolic_batch():
  train, labels, kernel, bias, test = _problem()
  state = SCORER.fit(train, labels, kernel, bias, dim=D)
  fn = jax.jit(lambda f: SCORER.score_fn(state, f, layout=layout.ACCELERATOR))
  batch = jax.export.symbolic_shape("b")[0]
  exported = jax.export.export(fn, platforms=("cpu",))(
      jax.ShapeDtypeStruct((batch, M), jnp.float32))
  for rows in (test, test[:3]):
    _close(np.asarray(exported.call(rows)), _reference(train, rows, kernel, bias, D))


def test_torch_baseline_matches_line_jax():
  pytest.importorskip("torch")
  baselines = pytest.importorskip("benchmarks._torch_baselines_feature")
  train, labels, kernel, bias, test = _problem()
  state = SCORER.fit(train, labels, kernel, bias, dim=D)
  module = baselines.from_state("residual", state)
  assert not module.training
  np.testing.assert_allclose(baselines.score(module, test),
                             np.asarray(SCORER.score(state, test)), rtol=2e-4, atol=2e-4)
