"""VRA: energy of features zeroed below one training percentile and clipped above another.

Against a float64 reference with `np.percentile` of every training
activation; values below the lower threshold are zeroed (the official code),
not clipped to it (OpenOOD), and that changes the scores; at percentiles
(100, 0) on training rows VRA is energy. The two-pass fold (uneven batches,
merged parts, an orbax round trip mid-stream, one-shot iterators refused),
save / load, bad values, NaN rows, a symbolic batch under `jax.export` and
the PyTorch baseline.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import line_jax
from line_jax import fold as fold_lib
from line_jax import layout
from line_jax import scorers
from line_jax.scorers import _registry
from line_jax.scorers import _vra
from line_jax.scorers._registry import _scorer

pytestmark = pytest.mark.filterwarnings("error")

SCORER = _scorer("vra", _vra, _vra.VraState)
N, M, C, B = 200, 24, 5, 16


def _problem(seed=0):
  rng = np.random.default_rng(seed)
  labels = np.arange(N) % C
  # Post-ReLU-like activations away from zero, so the lower percentile is
  # positive and cuts real values; a class block lifts some units.
  train = (np.abs(rng.normal(size=(N, M))) + 0.2).astype(np.float32)
  train += np.repeat(np.eye(C, dtype=np.float32), M // C + 1, axis=1)[labels, :M]
  kernel = (rng.normal(size=(M, C)) / np.sqrt(M)).astype(np.float32)
  bias = (0.1 * rng.normal(size=(C,))).astype(np.float32)
  # Test rows with small values (zeroed), large ones (clipped) and both.
  test = (np.abs(rng.normal(size=(B, M))) * rng.uniform(0.1, 3.0, size=(B, 1))).astype(np.float32)
  return train, labels, kernel, bias, test


def _energy(z):
  top = z.max(axis=1)
  return top + np.log(np.exp(z - top[:, None]).sum(axis=1))


def _thresholds(train, high, low):
  flat = train.astype(np.float64).ravel()
  return np.percentile(flat, low), np.percentile(flat, high)


def _reference(train, test, kernel, bias, high=90.0, low=10.0, below="zero"):
  """Energy of the rectified `test`; `below="clip"` is OpenOOD's variant."""
  lo, hi = _thresholds(train, high, low)
  h = test.astype(np.float64)
  h = np.where(h < lo, 0.0 if below == "zero" else lo, np.minimum(h, hi))
  return _energy(h @ kernel.astype(np.float64) + bias.astype(np.float64))


def _close(got, want, rtol=1e-5):
  np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * max(1.0, np.abs(want).max()))


@pytest.mark.parametrize("high, low", [(90.0, 10.0), (85.0, 15.0), (99.0, 1.0), (50.0, 50.0)])
@pytest.mark.parametrize("where", [layout.CPU, layout.ACCELERATOR])
def test_scores_equal_the_float64_reference(high, low, where):
  train, labels, kernel, bias, test = _problem()
  state = SCORER.fit(train, labels, kernel, bias, percentile_high=high, percentile_low=low)
  lo, hi = _thresholds(train, high, low)
  assert float(state.low) == np.float32(lo) and float(state.high) == np.float32(hi)
  assert lo > 0.2  # the lower threshold cuts real activations
  _close(np.asarray(SCORER.score(state, test, layout=where)),
         _reference(train, test, kernel, bias, high, low))


def test_values_below_the_lower_threshold_are_zeroed_not_clipped_to_it():
  train, labels, kernel, bias, test = _problem()
  state = SCORER.fit(train, labels, kernel, bias)  # 90, 10
  got = np.asarray(SCORER.score(state, test))
  lo, _ = _thresholds(train, 90.0, 10.0)
  below = np.any(test < lo, axis=1)
  assert below.sum() >= B // 2
  zeroed = _reference(train, test, kernel, bias)
  clipped = _reference(train, test, kernel, bias, below="clip")
  _close(got, zeroed)
  assert np.all(np.abs(zeroed - clipped)[below] > 1e-3)  # the variant matters on these rows
  np.testing.assert_allclose(zeroed[~below], clipped[~below])


def test_percentiles_100_and_0_leave_training_rows_alone_and_score_energy():
  train, labels, kernel, bias, _ = _problem()
  state = SCORER.fit(train, labels, kernel, bias, percentile_high=100.0, percentile_low=0.0)
  energy = scorers.get("energy")
  _close(np.asarray(SCORER.score(state, train[:40])),
         np.asarray(energy.score(energy.fit(train, labels, kernel, bias), train[:40])), rtol=1e-6)


def test_defaults_and_grid_are_openoods():
  assert dict(SCORER.defaults) == {"percentile_high": 90.0, "percentile_low": 10.0}
  assert dict(SCORER.grid) == {"percentile_high": (85.0, 90.0, 95.0, 99.0),
                               "percentile_low": (1.0, 5.0, 10.0, 15.0)}
  assert SCORER.fold.passes == 2 and not SCORER.fold.needs_labels


@pytest.mark.parametrize("hparams, error, message", [
    ({"percentile_high": 100.5}, ValueError, "percentile_high must be a percentile"),
    ({"percentile_low": -1.0}, ValueError, "percentile_low must be a percentile"),
    ({"percentile_high": float("nan")}, ValueError, "percentile_high"),
    ({"percentile_low": "10"}, TypeError, "percentile_low must be a real number"),
    ({"percentile_high": 40.0, "percentile_low": 60.0}, ValueError,
     "percentile_low=60.0 must not exceed percentile_high=40.0")])
def test_bad_percentiles_are_errors_naming_them(hparams, error, message):
  train, labels, kernel, bias, _ = _problem()
  with pytest.raises(error, match=message):
    SCORER.fit(train, labels, kernel, bias, **hparams)


def test_unknown_hyperparameter_lists_the_valid_ones():
  train, labels, kernel, bias, _ = _problem()
  with pytest.raises(ValueError, match="valid: percentile_high, percentile_low"):
    SCORER.fit(train, labels, kernel, bias, percentile=90.0)


def _batches(train, labels, edges=(0, 1, 60, 67, 150, 200)):
  return [(train[a:b], labels[a:b]) for a, b in zip(edges[:-1], edges[1:])]


def test_fit_from_uneven_batches_and_merged_parts_equal_the_whole():
  train, labels, kernel, bias, _ = _problem()
  hparams = {"percentile_high": 95.0, "percentile_low": 5.0}
  whole = SCORER.fit(train, labels, kernel, bias, **hparams)
  batches = _batches(train, labels)
  streamed = SCORER.fit_from_batches(batches, kernel, bias, **hparams)
  merged = fold_lib.fit_parts(SCORER.fold, [batches[:2], [], batches[2:]], kernel, bias,
                              **hparams)
  for state in (streamed, merged):
    assert isinstance(state, _vra.VraState)
    chex.assert_trees_all_equal(state, whole)  # exact percentiles, exactly
  with pytest.raises(TypeError, match="re-iterable"):
    SCORER.fit_from_batches(iter(batches), kernel, bias)


def test_accumulator_survives_an_orbax_round_trip_mid_stream(tmp_path):
  train, labels, kernel, bias, _ = _problem()
  fold = SCORER.fold
  acc = fold.update(fold.init(kernel, bias), train[:80], None)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "acc", acc)
  checkpointer.wait_until_finished()
  restored = checkpointer.restore(tmp_path / "acc", target=jax.tree.map(np.asarray, acc))
  whole = SCORER.fit(train, labels, kernel, bias)
  for a in (acc, restored):
    a = fold.next_pass(fold.update(a, train[80:], None))
    a = fold.update(fold.update(a, train[:80], None), train[80:], None)
    chex.assert_trees_all_equal(fold.finalize(a), whole)


@pytest.fixture
def registered(monkeypatch):
  """VRA in the registry for this test only (`line_jax.save` records the name)."""
  monkeypatch.setitem(_registry._REGISTRY, "vra", SCORER)
  monkeypatch.setitem(_registry._BY_STATE, _vra.VraState, "vra")


def test_save_load_round_trip_scores_identically(tmp_path, registered):
  del registered
  train, labels, kernel, bias, test = _problem()
  state = SCORER.fit(train, labels, kernel, bias, percentile_high=85.0, percentile_low=15.0)
  line_jax.save(tmp_path / "vra", state)
  loaded = line_jax.load(tmp_path / "vra")
  assert type(loaded) is _vra.VraState
  chex.assert_trees_all_equal(loaded, state)
  np.testing.assert_array_equal(np.asarray(SCORER.score(loaded, test)),
                                np.asarray(SCORER.score(state, test)))


def test_nan_rows_score_nan_under_jit():
  train, labels, kernel, bias, test = _problem()
  state = SCORER.fit(train, labels, kernel, bias)
  bad = test.copy()
  bad[[2, 7], 4] = [np.nan, np.inf]  # +inf would otherwise clip to `high`
  got = np.asarray(jax.jit(lambda s, f: SCORER.score_fn(s, f))(state, bad))
  assert np.isnan(got[[2, 7]]).all()
  rest = np.setdiff1d(np.arange(B), [2, 7])
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
  module = baselines.from_state("vra", state)
  assert not module.training
  np.testing.assert_allclose(baselines.score(module, test),
                             np.asarray(SCORER.score(state, test)), rtol=2e-4, atol=2e-4)
