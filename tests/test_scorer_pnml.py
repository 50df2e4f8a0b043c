"""pNML: minus the normalised regret of the last layer's predictive NML.

Against a float64 reference of the official formula (normalised features,
`(X^T X)^-1` summed, not averaged, over the training set, the head on the
normalised feature), on features near a subspace where rows off it score
lower; probabilities that underflow float32 keep their limit; an all-zero
row scores 0; a one-class head is refused. The fold (uneven batches, merged
parts, NumPy parts), save / load, NaN rows, a symbolic batch under
`jax.export` and the PyTorch baseline.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import line_jax
from line_jax import fold as fold_lib
from line_jax import layout
from line_jax.scorers import _pnml
from line_jax.scorers import _registry
from line_jax.scorers._registry import _scorer

pytestmark = pytest.mark.filterwarnings("error")

SCORER = _scorer("pnml", _pnml, _pnml.PnmlState)
N, M, C, B, D = 240, 16, 5, 20, 6


def _problem(seed=0, head_scale=1.0):
  """Non-negative training rows near a D-dimensional subspace (full rank by a
  little noise); test rows: the first half near it, the second half off it."""
  rng = np.random.default_rng(seed)
  labels = np.arange(N) % C
  basis = np.abs(rng.normal(size=(D, M)))
  def near(n, off):
    return (np.abs(rng.normal(size=(n, D))) @ basis
            + np.abs(rng.normal(size=(n, M))) * off).astype(np.float32)
  train = near(N, 0.05)
  test = np.concatenate([near(B // 2, 0.05), near(B // 2, 2.0)])
  kernel = (rng.normal(size=(M, C)) * 3.0 * head_scale).astype(np.float32)
  bias = rng.normal(size=(C,)).astype(np.float32)
  return train, labels, kernel, bias, test


def _normalised(x):
  x = x.astype(np.float64)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _reference(train, test, kernel, bias):
  """The official `calc_regrets`, in float64 (log-space softmax only)."""
  x = _normalised(train)
  inverse = np.linalg.inv(x.T @ x)
  z = _normalised(test)
  projected = np.einsum("bi,ij,bj->b", z, inverse, z)
  g = (projected / (1.0 + projected))[:, None]
  logits = z @ kernel.astype(np.float64) + bias.astype(np.float64)
  log_p = logits - logits.max(axis=1, keepdims=True)
  log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
  p = np.exp(log_p)
  normaliser = np.sum(p / (p + (1.0 - p) * np.exp(g * log_p)), axis=1)
  return -np.log(normaliser) / np.log(kernel.shape[1])


def _close(got, want, rtol=1e-5):
  np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * max(1.0, np.abs(want).max()))


@pytest.mark.parametrize("where", [layout.CPU, layout.ACCELERATOR])
def test_scores_equal_the_float64_reference_and_rows_off_the_subspace_score_lower(where):
  train, labels, kernel, bias, test = _problem()
  state = SCORER.fit(train, labels, kernel, bias)
  got = np.asarray(SCORER.score(state, test, layout=where))
  _close(got, _reference(train, test, kernel, bias))
  assert np.all((got <= 0) & (got >= -1))
  assert got[: B // 2].min() > got[B // 2:].max()


def test_the_factor_is_the_inverse_of_the_summed_not_averaged_gram():
  train, labels, kernel, bias, _ = _problem()
  factor = np.asarray(SCORER.fit(train, labels, kernel, bias).factor, np.float64)
  x = _normalised(train)
  inverse = np.linalg.inv(x.T @ x)
  np.testing.assert_allclose(factor @ factor.T, inverse, rtol=1e-4,
                             atol=1e-4 * np.abs(inverse).max())


def test_probabilities_that_underflow_float32_keep_their_limit():
  train, labels, kernel, bias, test = _problem(head_scale=40.0)
  logits = _normalised(test) @ kernel + bias
  assert np.any((logits.max(axis=1, keepdims=True) - logits) > 110)  # exp underflows float32
  got = np.asarray(SCORER.score(SCORER.fit(train, labels, kernel, bias), test))
  assert np.all(np.isfinite(got))
  _close(got, _reference(train, test, kernel, bias))


def test_an_all_zero_row_normalises_to_zero_and_scores_zero():
  train, labels, kernel, bias, test = _problem()
  state = SCORER.fit(np.concatenate([train, np.zeros((3, M), np.float32)]),
                     np.arange(N + 3) % C, kernel, bias)  # zero rows add nothing to X^T X
  _close(np.asarray(SCORER.score(state, test)), _reference(train, test, kernel, bias))
  assert np.asarray(SCORER.score(state, np.zeros((2, M), np.float32))).tolist() == [0.0, 0.0]


def test_no_hyperparameters_and_a_one_class_head_is_refused():
  train, labels, kernel, bias, _ = _problem()
  assert dict(SCORER.defaults) == {} and dict(SCORER.grid) == {}
  with pytest.raises(ValueError, match="valid: none"):
    SCORER.fit(train, labels, kernel, bias, eps=1e-12)
  with pytest.raises(ValueError, match="pNML needs at least 2 classes .* got 1"):
    SCORER.fit(train, None, kernel[:, :1], bias[:1])


def test_fit_from_uneven_batches_and_merged_parts_equal_the_whole():
  train, labels, kernel, bias, test = _problem()
  whole = SCORER.fit(train, labels, kernel, bias)
  edges = (0, 1, 70, 77, 240)
  batches = [(train[a:b], None) for a, b in zip(edges[:-1], edges[1:])]
  streamed = SCORER.fit_from_batches(batches, kernel, bias)
  merged = fold_lib.fit_parts(SCORER.fold, [batches[:2], [], batches[2:]], kernel, bias)
  for state in (streamed, merged):
    assert isinstance(state, _pnml.PnmlState)
    chex.assert_trees_all_close(state, whole, rtol=1e-5, atol=1e-5)
    _close(np.asarray(SCORER.score(state, test)), np.asarray(SCORER.score(whole, test)),
           rtol=1e-6)


def test_merging_numpy_accumulators_keeps_float64():
  train, labels, kernel, bias, _ = _problem()
  fold = SCORER.fold
  parts = [jax.tree.map(np.asarray, fold.update(fold.init(kernel, bias), train[a:b], None))
           for a, b in ((0, 70), (70, N))]
  merged = fold.finalize(fold_lib.merge_all(fold, parts))
  direct = fold_lib.fit_parts(fold, [[(train[:70], None)], [(train[70:], None)]], kernel, bias)
  chex.assert_trees_all_equal(merged, direct)


@pytest.fixture
def registered(monkeypatch):
  """pNML in the registry for this test only (`line_jax.save` records the name)."""
  monkeypatch.setitem(_registry._REGISTRY, "pnml", SCORER)
  monkeypatch.setitem(_registry._BY_STATE, _pnml.PnmlState, "pnml")


def test_save_load_round_trip_scores_identically(tmp_path, registered):
  del registered
  train, labels, kernel, bias, test = _problem()
  state = SCORER.fit(train, labels, kernel, bias)
  line_jax.save(tmp_path / "pnml", state)
  loaded = line_jax.load(tmp_path / "pnml")
  assert type(loaded) is _pnml.PnmlState
  chex.assert_trees_all_equal(loaded, state)
  np.testing.assert_array_equal(np.asarray(SCORER.score(loaded, test)),
                                np.asarray(SCORER.score(state, test)))


def test_nan_rows_score_nan_under_jit():
  train, labels, kernel, bias, test = _problem()
  state = SCORER.fit(train, labels, kernel, bias)
  bad = test.copy()
  bad[[1, 12], 7] = [np.nan, np.inf]
  got = np.asarray(jax.jit(lambda s, f: SCORER.score_fn(s, f))(state, bad))
  assert np.isnan(got[[1, 12]]).all()
  rest = np.setdiff1d(np.arange(B), [1, 12])
  _close(got[rest], _reference(train, test, kernel, bias)[rest])


def test_exports_with_a_symbolic_batch():
  train, labels, kernel, bias, test = _problem()
  state = SCORER.fit(train, labels, kernel, bias)
  fn = jax.jit(lambda f: SCORER.score_fn(state, f, layout=layout.ACCELERATOR))
  batch = jax.export.symbolic_shape("b")[0]
  exported = jax.export.export(fn, platforms=("cpu",))(
      jax.ShapeDtypeStruct((batch, M), jnp.float32))
  for rows in (test, test[:3]):
    _close(np.asarray(exported.call(rows)), _reference(train, rows, kernel, bias))


def test_torch_baseline_matches_line_jax():
  pytest.importorskip("torch")
  baselines = pytest.importorskip("benchmarks._torch_baselines_feature")
  train, labels, kernel, bias, test = _problem()
  state = SCORER.fit(train, labels, kernel, bias)
  module = baselines.from_state("pnml", state)
  assert not module.training
  np.testing.assert_allclose(baselines.score(module, test),
                             np.asarray(SCORER.score(state, test)), rtol=2e-4, atol=2e-4)
  with pytest.raises(ValueError, match="no PyTorch baseline for 'odin'"):
    baselines.from_state("odin", state)
