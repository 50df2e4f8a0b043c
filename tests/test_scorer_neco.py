"""NECO: the share of the standardised feature's norm in the top principal subspace.

Against a float64 NumPy reference and against the official code's own
pipeline (sklearn's `StandardScaler` and `PCA`, a dead unit included), with
and without the max logit, on collapsed class clusters where OOD rows score
lower; `dim` capped at the width (NECO is then MaxLogit). The fold (uneven
batches, merged parts, NumPy parts), save / load, bad values, NaN rows, a
symbolic batch under `jax.export` and the PyTorch baseline.
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
from line_jax.scorers import _neco
from line_jax.scorers import _registry
from line_jax.scorers._registry import _scorer

pytestmark = pytest.mark.filterwarnings("error")

SCORER = _scorer("neco", _neco, _neco.NecoState)
N, M, C, B = 200, 24, 5, 20
D = C - 1  # the class means of a collapsed network span C - 1 directions around their mean


def _problem(seed=0):
  """Collapsed ID features (class means plus small noise, the head aligned
  with them); test rows: the first half ID, the second half around the mean."""
  rng = np.random.default_rng(seed)
  labels = np.arange(N) % C
  means = np.abs(rng.normal(size=(C, M))) * 3.0
  kernel = (means.T - means.mean(axis=0)[:, None]).astype(np.float32) / 3.0
  bias = (0.1 * rng.normal(size=(C,))).astype(np.float32)
  train = (means[labels] + 0.3 * rng.normal(size=(N, M))).astype(np.float32)
  test_id = means[np.arange(B // 2) % C] + 0.3 * rng.normal(size=(B // 2, M))
  test_ood = means.mean(axis=0) + 1.5 * rng.normal(size=(B // 2, M))
  return train, labels, kernel, bias, np.concatenate([test_id, test_ood]).astype(np.float32)


def _reference(train, test, kernel, bias, dim, max_logit=True):
  """From the definition: unit-wise standardisation (ddof 0, scale 1 for a
  constant unit), the top-dim eigenvectors of the standardised covariance."""
  x = train.astype(np.float64)
  mean, std = x.mean(axis=0), x.std(axis=0)
  std[std == 0] = 1.0
  zt = (x - mean) / std
  _, vectors = np.linalg.eigh(zt.T @ zt / len(x))
  top = vectors[:, ::-1][:, :dim]
  z = (test.astype(np.float64) - mean) / std
  ratio = np.linalg.norm(z @ top, axis=1) / np.linalg.norm(z, axis=1)
  if max_logit:
    ratio *= (test.astype(np.float64) @ kernel.astype(np.float64) + bias).max(axis=1)
  return ratio


def _close(got, want, rtol=1e-5):
  np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * max(1.0, np.abs(want).max()))


@pytest.mark.parametrize("max_logit", [True, False])
@pytest.mark.parametrize("where", [layout.CPU, layout.ACCELERATOR])
def test_scores_equal_the_float64_reference(max_logit, where):
  train, labels, kernel, bias, test = _problem()
  state = SCORER.fit(train, labels, kernel, bias, dim=D, max_logit=max_logit)
  chex.assert_shape(state.components, (M, D))
  assert state.dim == D and state.max_logit is max_logit
  _close(np.asarray(SCORER.score(state, test, layout=where)),
         _reference(train, test, kernel, bias, D, max_logit))


def test_ood_rows_keep_less_of_their_norm_in_the_subspace():
  train, labels, kernel, bias, test = _problem()
  ratio = np.asarray(SCORER.score(SCORER.fit(train, labels, kernel, bias, dim=D,
                                             max_logit=False), test))
  assert ratio[: B // 2].min() > 0.8 > 0.5 > ratio[B // 2:].max()
  assert np.all((ratio >= 0) & (ratio <= 1 + 1e-6))


@pytest.mark.parametrize("max_logit", [True, False])
def test_scores_equal_the_official_sklearn_pipeline_with_a_dead_unit(max_logit):
  preprocessing = pytest.importorskip("sklearn.preprocessing")
  decomposition = pytest.importorskip("sklearn.decomposition")
  train, labels, kernel, bias, test = _problem(seed=1)
  train[:, 5] = 0.0  # a dead unit: StandardScaler keeps its scale at 1
  test[:, 5] = np.linspace(0.0, 2.0, B)
  state = SCORER.fit(train, labels, kernel, bias, dim=D, max_logit=max_logit)
  # The official `neco()`, on float64 copies.
  scaler = preprocessing.StandardScaler()
  pca = decomposition.PCA(M).fit(scaler.fit_transform(train.astype(np.float64)))
  scaled = scaler.transform(test.astype(np.float64))
  want = (np.linalg.norm(pca.transform(scaled)[:, :D], axis=1)
          / np.linalg.norm(scaled, axis=1))
  if max_logit:
    want *= (test.astype(np.float64) @ kernel + bias).max(axis=1)
  _close(np.asarray(SCORER.score(state, test)), want)
  assert float(state.inv_scale[5]) == 1.0


def test_dim_is_capped_at_the_width_where_neco_is_maxlogit():
  train, labels, kernel, bias, test = _problem()
  state = SCORER.fit(train, labels, kernel, bias, dim=1000)
  assert state.dim == M
  maxlogit = scorers.get("maxlogit")
  _close(np.asarray(SCORER.score(state, test)),
         np.asarray(maxlogit.score(maxlogit.fit(train, labels, kernel, bias), test)))


def test_defaults_and_grid():
  assert dict(SCORER.defaults) == {"dim": 100, "max_logit": True}
  assert dict(SCORER.grid) == {"dim": (16, 32, 64, 100, 128, 256, 512, 768)}
  assert SCORER.fold.passes == 1 and not SCORER.fold.needs_labels


@pytest.mark.parametrize("hparams, error, message", [
    ({"dim": 0}, ValueError, "dim must be at least 1, got 0"),
    ({"dim": 2.5}, TypeError, "dim must be an integer"),
    ({"dim": True}, TypeError, "dim must be an integer"),
    ({"max_logit": "yes"}, TypeError, "max_logit must be True or False, got 'yes'"),
    ({"max_logit": 1}, TypeError, "max_logit must be True or False, got 1")])
def test_bad_hyperparameters_are_errors_naming_them(hparams, error, message):
  train, labels, kernel, bias, _ = _problem()
  with pytest.raises(error, match=message):
    SCORER.fit(train, labels, kernel, bias, **hparams)


def test_unknown_hyperparameter_lists_the_valid_ones():
  train, labels, kernel, bias, _ = _problem()
  with pytest.raises(ValueError, match="valid: dim, max_logit"):
    SCORER.fit(train, labels, kernel, bias, d=4)


def test_fit_from_uneven_batches_and_merged_parts_equal_the_whole():
  train, labels, kernel, bias, test = _problem()
  train = train + 100.0  # a common offset, which Chan's merge keeps out of the scatter
  whole = SCORER.fit(train, labels, kernel, bias, dim=D)
  edges = (0, 1, 60, 67, 200)
  batches = [(train[a:b], None) for a, b in zip(edges[:-1], edges[1:])]
  streamed = SCORER.fit_from_batches(batches, kernel, bias, dim=D)
  merged = fold_lib.fit_parts(SCORER.fold, [batches[:2], [], batches[2:]], kernel, bias, dim=D)
  for state in (streamed, merged):
    assert isinstance(state, _neco.NecoState)
    chex.assert_trees_all_close(state, whole, rtol=1e-6, atol=1e-6)
  _close(np.asarray(SCORER.score(whole, test + 100.0)),
         _reference(train, test + 100.0, kernel, bias, D), rtol=1e-4)


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
  """NECO in the registry for this test only (`line_jax.save` records the name)."""
  monkeypatch.setitem(_registry._REGISTRY, "neco", SCORER)
  monkeypatch.setitem(_registry._BY_STATE, _neco.NecoState, "neco")


@pytest.mark.parametrize("max_logit", [True, False])
def test_save_load_round_trip_scores_identically(tmp_path, registered, max_logit):
  del registered
  train, labels, kernel, bias, test = _problem()
  state = SCORER.fit(train, labels, kernel, bias, dim=D, max_logit=max_logit)
  line_jax.save(tmp_path / "neco", state)
  loaded = line_jax.load(tmp_path / "neco")
  assert type(loaded) is _neco.NecoState and loaded.max_logit is max_logit
  chex.assert_trees_all_equal(loaded, state)
  np.testing.assert_array_equal(np.asarray(SCORER.score(loaded, test)),
                                np.asarray(SCORER.score(state, test)))


def test_nan_rows_score_nan_under_jit():
  train, labels, kernel, bias, test = _problem()
  state = SCORER.fit(train, labels, kernel, bias, dim=D)
  bad = test.copy()
  bad[[3, 14], 2] = [np.inf, np.nan]
  got = np.asarray(jax.jit(lambda s, f: SCORER.score_fn(s, f))(state, bad))
  assert np.isnan(got[[3, 14]]).all()
  rest = np.setdiff1d(np.arange(B), [3, 14])
  _close(got[rest], _reference(train, test, kernel, bias, D)[rest])


@pytest.mark.parametrize("max_logit", [True, False])
def test_exports_with_a_symbolic_batch(max_logit):
  train, labels, kernel, bias, test = _problem()
  state = SCORER.fit(train, labels, kernel, bias, dim=D, max_logit=max_logit)
  fn = jax.jit(lambda f: SCORER.score_fn(state, f, layout=layout.ACCELERATOR))
  batch = jax.export.symbolic_shape("b")[0]
  exported = jax.export.export(fn, platforms=("cpu",))(
      jax.ShapeDtypeStruct((batch, M), jnp.float32))
  for rows in (test, test[:3]):
    _close(np.asarray(exported.call(rows)), _reference(train, rows, kernel, bias, D, max_logit))


@pytest.mark.parametrize("max_logit", [True, False])
def test_torch_baseline_matches_line_jax(max_logit):
  pytest.importorskip("torch")
  baselines = pytest.importorskip("benchmarks._torch_baselines_feature")
  train, labels, kernel, bias, test = _problem()
  state = SCORER.fit(train, labels, kernel, bias, dim=D, max_logit=max_logit)
  module = baselines.from_state("neco", state)
  assert not module.training
  np.testing.assert_allclose(baselines.score(module, test),
                             np.asarray(SCORER.score(state, test)), rtol=2e-4, atol=2e-4)
