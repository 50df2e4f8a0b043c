"""OptFS: float64 references, three streamed passes, merging, saving, export.

The registry entry is built here (`_scorer`) as the registry builds it. The
references follow the official code (`detector/ours.py`) step by step:
`np.quantile` of every activation, `np.arange` edges compared in float32,
one mask per interval.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import line_jax
from line_jax import fold as fold_lib
from line_jax import layout
from line_jax.scorers import _optfs
from line_jax.scorers import _registry
from line_jax.scorers._registry import _scorer

pytestmark = pytest.mark.filterwarnings("error")

OPTFS = _scorer("optfs", _optfs, _optfs.OptfsState)
N, M, C, B = 160, 12, 5, 24


def _problem(seed=0, signed=False):
  """Post-ReLU features (or signed ones, as a ViT's), class structure, a
  random head; test rows scaled up, so that some fall beyond the range."""
  rng = np.random.default_rng(seed)
  labels = rng.permutation(np.arange(N) % C)
  train = rng.normal(size=(N, M)).astype(np.float32)
  if not signed:
    train = np.abs(train)
  train += np.eye(C, M, dtype=np.float32)[labels] * 2
  kernel = rng.normal(size=(M, C)).astype(np.float32)
  bias = rng.normal(size=(C,)).astype(np.float32)
  test = rng.normal(size=(B, M)).astype(np.float32) * 2.0
  if not signed:
    test = np.abs(test)
  return train, labels, kernel, bias, test


def _logits(h, kernel, bias):
  z = h.astype(np.float64) @ kernel.astype(np.float64) + bias.astype(np.float64)
  top = np.sort(z, axis=1)
  assert np.all(top[:, -1] - top[:, -2] > 1e-4)  # float32 predicts the same class
  return z


def _reference_fit(train, kernel, bias, percentile=0.1, intervals=100):
  """`(lower, upper, theta)`: float32 edges as the code compares them, float64 theta."""
  values = train.astype(np.float64).ravel()
  left = np.quantile(values, percentile / 100)
  right = np.quantile(values, 1 - percentile / 100)
  width = (right - left) / intervals
  starts = np.arange(left, right, width)
  lower, upper = starts.astype(np.float32), (starts + width).astype(np.float32)
  pred = _logits(train, kernel, bias).argmax(axis=1)
  contribution = kernel.T[pred].astype(np.float64) * train.astype(np.float64)
  masks = (train[..., None] >= lower) & (train[..., None] < upper)
  per_interval = (masks * contribution[..., None]).sum(axis=1).mean(axis=0)
  return lower, upper, per_interval / np.linalg.norm(per_interval) * 1000


def _reference_shape(h, lower, upper, theta):
  masks = (h[..., None] >= lower) & (h[..., None] < upper)
  return h.astype(np.float64) * (masks * theta).sum(axis=-1)


def _reference_score(test, lower, upper, theta, kernel, bias, variant):
  shaped = _reference_shape(test, lower, upper, theta)
  z = _logits(test, kernel, bias)
  if variant == "energy":
    zs = shaped @ kernel.astype(np.float64) + bias
    top = zs.max(axis=1)
    return top + np.log(np.exp(zs - top[:, None]).sum(axis=1))
  return (kernel.T[z.argmax(axis=1)] * shaped).sum(axis=1)


def _close(got, want, rtol=1e-5):
  scale = max(1.0, float(np.max(np.abs(want))))
  np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale)


def _state_edges(state, count):
  lower, upper = np.asarray(state.lower), np.asarray(state.upper)
  assert np.all(np.isinf(lower[count:])) and np.all(np.asarray(state.theta)[count:] == 0)
  return lower[:count], upper[:count], np.asarray(state.theta)[:count]


@pytest.mark.parametrize("signed", [False, True], ids=["relu", "signed"])
@pytest.mark.parametrize("variant", ["vanilla", "energy"])
@pytest.mark.parametrize("percentile,intervals", [(0.1, 100), (10.0, 7)])
def test_scores_equal_the_reference(signed, variant, percentile, intervals):
  train, labels, kernel, bias, test = _problem(signed=signed)
  state = OPTFS.fit(train, labels, kernel, bias, percentile=percentile, intervals=intervals,
                    variant=variant)
  lower, upper, theta = _reference_fit(train, kernel, bias, percentile, intervals)
  got_lower, got_upper, got_theta = _state_edges(state, lower.size)
  np.testing.assert_array_equal(got_lower, lower)
  np.testing.assert_array_equal(got_upper, upper)
  _close(got_theta, theta)
  want = _reference_score(test, lower, upper, theta, kernel, bias, variant)
  _close(np.asarray(OPTFS.score(state, test)), want)
  # Values beyond the range are shaped to 0: the score is not the unshaped one's.
  assert np.any((test > upper[-1]) | (test < lower[0]))
  shaped = np.asarray(_optfs.shape(state, jnp.asarray(test)))
  assert np.all(shaped[(test >= upper[-1]) | (test < lower[0])] == 0)


def test_defaults_and_grid_are_the_official_ones():
  assert dict(OPTFS.defaults) == {"percentile": 0.1, "intervals": 100, "variant": "vanilla"}
  assert dict(OPTFS.grid) == {"variant": ("vanilla", "energy")}
  train, labels, kernel, bias, _ = _problem()
  state = OPTFS.fit(train, labels, kernel, bias)
  assert state.theta.shape == (101,) and state.variant == "vanilla"
  np.testing.assert_allclose(np.linalg.norm(np.asarray(state.theta, np.float64)), 1000,
                             rtol=1e-6)


def _extra_interval_problem(intervals=100):
  """Training data whose range `np.arange` cuts into `intervals + 1` pieces."""
  rng = np.random.default_rng(4)
  while True:
    low, high = np.sort(rng.uniform(0.0, 5.0, size=2).astype(np.float32)).astype(np.float64)
    if len(np.arange(low, high, (high - low) / intervals)) == intervals + 1:
      break
  train, labels, kernel, bias, test = _problem()
  train = rng.uniform(low, high, size=train.shape).astype(np.float32)
  train.flat[:2] = np.float32(low), np.float32(high)
  test = rng.uniform(low, high, size=test.shape).astype(np.float32)
  test.flat[:3] = np.float32(high)
  return train, labels, kernel, bias, test


def test_an_extra_interval_from_arange_rounding_is_kept_as_the_code_keeps_it():
  train, labels, kernel, bias, test = _extra_interval_problem()
  state = OPTFS.fit(train, labels, kernel, bias, percentile=0.0)
  lower, upper, theta = _reference_fit(train, kernel, bias, 0.0)
  assert lower.size == 101 and lower[100] <= train.max() < upper[100]
  got_lower, _, got_theta = _state_edges(state, 101)
  np.testing.assert_array_equal(got_lower, lower)
  _close(got_theta, theta)
  assert got_theta[100] != 0  # the largest activation's interval
  _close(np.asarray(OPTFS.score(state, test)),
         _reference_score(test, lower, upper, theta, kernel, bias, "vanilla"))


def test_a_value_shared_by_two_intervals_gets_both_thetas_and_a_gap_none():
  _, _, kernel, bias, _ = _problem()
  one, two = np.float32(1.0), np.float32(2.0)
  after_one, before_two = np.nextafter(one, np.float32(3)), np.nextafter(two, np.float32(0))
  lower = np.array([0.0, one, two, np.inf], np.float32)
  upper = np.array([after_one, before_two, 3.0, np.inf], np.float32)  # overlap at 1, gap below 2
  theta = np.array([10.0, 20.0, 40.0, 0.0], np.float32)
  state = _optfs.OptfsState(jnp.asarray(kernel.T), jnp.asarray(bias), jnp.asarray(lower),
                            jnp.asarray(upper), jnp.asarray(theta), "vanilla")
  h = np.array([[0.0, 0.5, one, after_one, before_two, two, 2.5, 3.0, -1.0, 7.0, 1.5, 0.25]],
               np.float32)
  got = np.asarray(_optfs.shape(state, jnp.asarray(h)))
  np.testing.assert_allclose(got, _reference_shape(h, lower, upper, theta), rtol=1e-7)
  assert got[0, 2] == 30.0 and got[0, 4] == 0.0


def test_streamed_fit_over_uneven_batches_equals_the_whole():
  train, labels, kernel, bias, test = _problem()
  edges = np.cumsum((0, 1, 60, 7, 52, 40))
  batches = [(train[a:b], labels[a:b]) for a, b in zip(edges[:-1], edges[1:])]
  whole = OPTFS.fit(train, labels, kernel, bias)
  streamed = OPTFS.fit_from_batches(batches, kernel, bias)
  chex.assert_trees_all_close(streamed, whole, rtol=1e-6, atol=1e-6)
  _close(np.asarray(OPTFS.score(streamed, test)), np.asarray(OPTFS.score(whole, test)))
  with pytest.raises(TypeError, match="reads the training batches 3 times"):
    OPTFS.fit_from_batches(iter(batches), kernel, bias)


@pytest.mark.parametrize("edges", [(0, 80, 160), (0, 1, 70, 70, 160), (0, 0, 160)])
def test_merged_parts_equal_the_whole(edges):
  train, labels, kernel, bias, _ = _problem()
  parts = [[(train[a:b], labels[a:b])] if b > a else [] for a, b in zip(edges[:-1], edges[1:])]
  merged = fold_lib.fit_parts(OPTFS.fold, parts, kernel, bias, variant="energy")
  chex.assert_trees_all_close(merged, OPTFS.fit(train, labels, kernel, bias, variant="energy"),
                              rtol=1e-6, atol=1e-6)


def test_no_data_is_an_error():
  _, _, kernel, bias, _ = _problem()
  with pytest.raises(ValueError, match="empty"):
    OPTFS.fit_from_batches([], kernel, bias)


def test_a_range_of_one_value_is_an_error():
  train, labels, kernel, bias, _ = _problem()
  with pytest.raises(ValueError, match="span no range"):
    OPTFS.fit(np.ones_like(train), labels, kernel, bias)


@pytest.mark.parametrize("variant", ["vanilla", "energy"])
def test_save_load_round_trip(variant, tmp_path, monkeypatch):
  monkeypatch.setitem(_registry._REGISTRY, OPTFS.name, OPTFS)
  monkeypatch.setitem(_registry._BY_STATE, OPTFS.state_type, OPTFS.name)
  train, labels, kernel, bias, test = _problem()
  state = OPTFS.fit(train, labels, kernel, bias, variant=variant, intervals=9)
  line_jax.save(tmp_path / "optfs", state)
  loaded = line_jax.load(tmp_path / "optfs")
  assert type(loaded) is _optfs.OptfsState and loaded.variant == variant
  chex.assert_trees_all_equal(loaded, state)
  np.testing.assert_array_equal(np.asarray(OPTFS.score(loaded, test)),
                                np.asarray(OPTFS.score(state, test)))


@pytest.mark.parametrize("hparams,match", [
    ({"percentile": 50.0}, "percentile must be below 50"),
    ({"percentile": -1.0}, "percentile must be a percentile"),
    ({"percentile": "low"}, "percentile"),
    ({"intervals": 0}, "intervals must be at least 1"),
    ({"intervals": 2.5}, "intervals must be an integer"),
    ({"intervals": True}, "intervals must be an integer"),
    ({"variant": "max"}, "variant must be one of"),
    ({"tail": 0.1}, "unknown hyperparameter.*tail.*'optfs'"),
])
def test_bad_hyperparameters_are_named(hparams, match):
  train, labels, kernel, bias, _ = _problem()
  with pytest.raises((ValueError, TypeError), match=match):
    OPTFS.fit(train, labels, kernel, bias, **hparams)


def test_a_nan_row_scores_nan():
  train, labels, kernel, bias, test = _problem()
  state = OPTFS.fit(train, labels, kernel, bias)
  bad = test.copy()
  bad[4, 1] = np.nan
  got = np.asarray(OPTFS.score(state, bad))
  assert np.isnan(got[4]) and np.all(np.isfinite(np.delete(got, 4)))
  np.testing.assert_array_equal(np.delete(got, 4),
                                np.delete(np.asarray(OPTFS.score(state, test)), 4))


@pytest.mark.parametrize("variant", ["vanilla", "energy"])
def test_export_with_a_symbolic_batch(variant):
  train, labels, kernel, bias, test = _problem()
  state = OPTFS.fit(train, labels, kernel, bias, variant=variant)
  batch = jax.export.symbolic_shape("b")[0]
  exported = jax.export.export(
      jax.jit(lambda f: OPTFS.score_fn(state, f, layout=layout.ACCELERATOR)),
      platforms=("cpu",))(jax.ShapeDtypeStruct((batch, M), jnp.float32))
  for rows in (test, test[:3]):
    _close(np.asarray(exported.call(rows)), np.asarray(OPTFS.score(state, rows)))


@pytest.mark.parametrize("variant", ["vanilla", "energy"])
def test_torch_baseline_matches(variant):
  baselines = pytest.importorskip("benchmarks._torch_baselines_shaping")
  train, labels, kernel, bias, test = _extra_interval_problem()
  state = OPTFS.fit(train, labels, kernel, bias, percentile=0.0, variant=variant)
  module = baselines.from_state("optfs", state)
  assert not module.training
  want = np.asarray(OPTFS.score(state, test))
  scale = max(1.0, float(np.max(np.abs(want))))
  np.testing.assert_allclose(baselines.score(module, test), want, rtol=2e-4, atol=2e-4 * scale)
