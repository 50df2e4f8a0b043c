"""Bad inputs at scoring, for every registered scorer (issue 20).

* A row holding NaN or Inf scores NaN, never a finite number (a row of +inf
  used to pass LINe's and ReAct's clipping and score as more in-distribution
  than real inputs); the other rows score as they would alone.
* Integer and boolean features are a TypeError, as at fit; an empty batch
  scores `[]` (LINe's grouped CPU path used to raise IndexError).
* `Scorer.score_all` (what the CLIs and runs call) refuses non-finite rows
  with an error naming them, unless `nonfinite="nan"`.
* A scorer refuses another scorer's state.
* LINe's CPU (grouped) score is differentiable, with the dense path's gradient.

Property tests draw shapes, dtypes and NaN / Inf placement with hypothesis;
shapes are few and fixed so that each scorer compiles a handful of times.
"""

import hypothesis
from hypothesis import given
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import random_problem
from line_jax import _scoring
from line_jax import line
from line_jax import metrics
from line_jax import scorers

CLASSES, FEATURES, TRAIN = 4, 12, 48
HPARAMS = {"knn": dict(k=5), "vim": dict(dim=6), "line": dict(p_w=50, p_a=50, clip=1.0)}
SETTINGS = hypothesis.settings(max_examples=6, deadline=None, derandomize=True,
                               suppress_health_check=[hypothesis.HealthCheck.too_slow])


@pytest.fixture(scope="module")
def states():
  features, labels, kernel, bias = random_problem(CLASSES, FEATURES, TRAIN, seed=5)
  return {name: scorers.get(name).fit(features, labels, kernel, bias, **HPARAMS.get(name, {}))
          for name in scorers.names()}


def _rows(seed: int, n: int) -> np.ndarray:
  return np.abs(np.random.default_rng(seed).normal(size=(n, FEATURES))).astype(np.float32)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, jnp.bfloat16])
def test_finite_rows_is_all_isfinite_per_row(dtype):
  """The guard's `x * 0` sum against NumPy's elementwise test, with the
  largest finite values of the dtype (whose plain sum would overflow)."""
  big = float(jnp.finfo(dtype).max)
  x = np.full((7, 5), big, np.float64)
  x[1, 2], x[2, 0], x[3, 4] = np.nan, np.inf, -np.inf
  x[4] = -big
  x[5, :] = np.inf
  x = jnp.asarray(x, dtype)
  want = np.all(np.isfinite(np.asarray(x, np.float64)), axis=1)
  assert want.tolist() == [True, False, False, False, True, False, True]
  np.testing.assert_array_equal(np.asarray(jax.jit(_scoring.finite_rows)(x)), want)


@pytest.mark.parametrize("name", scorers.names())
@SETTINGS
@given(data=st.data())
def test_non_finite_rows_score_nan_and_leave_the_others_alone(name, states, data):
  scorer, state = scorers.get(name), states[name]
  x = _rows(data.draw(st.integers(0, 1000), label="seed"), 8)
  bad = data.draw(st.lists(st.integers(0, 7), min_size=1, max_size=4, unique=True), label="rows")
  for row in bad:
    column = data.draw(st.integers(0, FEATURES - 1), label="column")
    x[row, column] = data.draw(st.sampled_from([np.nan, np.inf, -np.inf]), label="value")
    if data.draw(st.booleans(), label="whole row"):
      x[row] = x[row, column]
  scores = np.asarray(scorer.score(state, x))
  assert np.all(np.isnan(scores[bad])), scores
  good = np.setdiff1d(np.arange(8), bad)
  alone = np.asarray(scorer.score(state, x[good]))
  assert np.all(np.isfinite(scores[good]))
  np.testing.assert_allclose(scores[good], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", scorers.names())
@SETTINGS
@given(dtype=st.sampled_from([np.int8, np.int32, np.int64, np.uint8, np.bool_]),
       rows=st.sampled_from([0, 1, 5]))
def test_integer_and_boolean_features_are_refused(name, states, dtype, rows):
  with pytest.raises(TypeError, match="features must be a floating-point array"):
    scorers.get(name).score(states[name], np.ones((rows, FEATURES), dtype))


@pytest.mark.parametrize("name", scorers.names())
@SETTINGS
@given(dtype=st.sampled_from([np.float16, np.float32, np.float64]),
       width=st.sampled_from([FEATURES, FEATURES - 1, FEATURES + 3]))
def test_an_empty_batch_scores_nothing_and_its_width_is_checked(name, states, dtype, width):
  scorer = scorers.get(name)
  empty = np.zeros((0, width), dtype)
  if width != FEATURES:
    with pytest.raises(ValueError, match=f"features have {width} features per sample"):
      scorer.score(states[name], empty)
    return
  scores = np.asarray(scorer.score(states[name], empty))
  assert scores.shape == (0,) and scores.dtype.kind == "f"
  assert scorer.score_all(states[name], empty).shape == (0,)


@pytest.mark.parametrize("name", scorers.names())
@SETTINGS
@given(shape=st.sampled_from([(FEATURES,), (2, 3, FEATURES), (1, 1)]))
def test_features_of_another_rank_are_refused(name, states, shape):
  with pytest.raises(ValueError, match="features must be 2-D|features have"):
    scorers.get(name).score(states[name], np.ones(shape, np.float32))


@pytest.mark.parametrize("strategy", ["grouped", "dense"])
def test_line_scores_an_empty_batch_with_either_strategy(states, strategy):
  out = line.score(states["line"], np.zeros((0, FEATURES), np.float32), strategy=strategy)
  assert out.shape == (0,)


def test_score_all_names_the_non_finite_rows(states):
  scorer = scorers.get("line")
  x = _rows(0, 30)
  x[4, 2], x[17] = np.nan, np.inf
  with pytest.raises(ValueError, match=r"row\(s\) 4, 17 \(2 of 30\) contain NaN or Inf"):
    scorer.score_all(states["line"], x)
  scores = scorer.score_all(states["line"], x, nonfinite="nan")
  assert np.isnan(scores[[4, 17]]).all() and np.isfinite(np.delete(scores, [4, 17])).all()
  with pytest.raises(ValueError, match="nonfinite must be 'raise' or 'nan'"):
    scorer.score_all(states["line"], x, nonfinite="skip")


def test_metrics_name_the_nan_scores():
  with pytest.raises(ValueError, match=r"score_ood contains NaN or Inf at row\(s\) 1 \(1 of 3\)"):
    metrics.ood_metrics([1.0, 2.0], [0.5, np.nan, 0.1])


def test_a_row_of_inf_is_no_longer_the_most_in_distribution(states):
  x = _rows(3, 8)
  x[0] = np.inf
  for name in ("line", "react"):
    scores = np.asarray(scorers.get(name).score(states[name], x))
    assert np.isnan(scores[0]) and np.isfinite(scores[1:]).all()


def test_each_scorer_refuses_the_other_scorers_states(states):
  names = scorers.names()
  for i, name in enumerate(names):
    other = names[(i + 1) % len(names)]
    with pytest.raises(TypeError, match=f"scorer '{name}' cannot score a "
                       f"{type(states[other]).__name__}: it is the state of scorer '{other}'"):
      scorers.get(name).score(states[other], _rows(0, 3))


def test_line_grouped_gradient_equals_the_dense_one(states):
  state = states["line"]
  x = jnp.asarray(_rows(7, 37))
  fn = line.score.__wrapped__

  def total(strategy):
    return lambda kernel, features: fn(state.replace(kernel=kernel), features,
                                       strategy=strategy).sum()

  grouped = jax.grad(total("grouped"), argnums=(0, 1))(state.kernel, x)
  dense = jax.grad(total("dense"), argnums=(0, 1))(state.kernel, x)
  for g, d in zip(grouped, dense):
    assert float(jnp.abs(d).max()) > 0
    np.testing.assert_allclose(g, d, rtol=1e-5, atol=1e-5)
  # The CPU default (grouped) differentiates through the public, bucketed score.
  by_default = jax.grad(lambda f: line.score(state, f).sum())(x)
  np.testing.assert_allclose(by_default, dense[1], rtol=1e-5, atol=1e-5)


_FIT_ERRORS = {
    "nan": (ValueError, "features contains NaN or Inf"),
    "inf": (ValueError, "features contains NaN or Inf"),
    "integer": (TypeError, "features must be a floating-point array"),
    "empty": (ValueError, "features is empty"),
    "label_range": (ValueError, r"labels must lie in \[0, 4\)"),
    "label_count": (ValueError, "labels has"),
    "width": (ValueError, "kernel has"),
}


@pytest.mark.parametrize("name", scorers.names())
@SETTINGS
@given(data=st.data())
def test_bad_training_input_is_refused_before_any_work(name, data):
  features, labels, kernel, bias = random_problem(CLASSES, FEATURES, TRAIN, seed=1)
  kind = data.draw(st.sampled_from(sorted(_FIT_ERRORS)), label="kind")
  row = data.draw(st.integers(0, TRAIN - 1), label="row")
  column = data.draw(st.integers(0, FEATURES - 1), label="column")
  if kind in ("nan", "inf"):
    features[row, column] = np.nan if kind == "nan" else data.draw(
        st.sampled_from([np.inf, -np.inf]), label="sign")
  elif kind == "integer":
    features = features.astype(data.draw(st.sampled_from([np.int32, np.uint8]), label="dtype"))
  elif kind == "empty":
    features, labels = features[:0], labels[:0]
  elif kind == "label_range":
    labels[row] = data.draw(st.sampled_from([-1, CLASSES, CLASSES + 7]), label="label")
  elif kind == "label_count":
    labels = labels[:row]
  else:
    kernel = kernel[:-1]
  error, message = _FIT_ERRORS[kind]
  with pytest.raises(error, match=message):
    scorers.get(name).fit(features, labels, kernel, bias, **HPARAMS.get(name, {}))


def test_evaluate_refuses_a_nan_score_by_its_row_in_the_set(states):
  from line_jax.runs import evaluate  # pylint: disable=g-import-not-at-top
  x = _rows(2, 10)
  x[3, 1] = np.nan
  with pytest.raises(ValueError, match=r"ood: energy scores NaN at row\(s\) 3 \(1 of 10\)"):
    evaluate._gathered_scores(scorers.get("energy"), states["energy"], x, "ood")
  np.testing.assert_array_equal(
      evaluate._gathered_scores(scorers.get("energy"), states["energy"], x[4:], "ood"),
      scorers.get("energy").score_all(states["energy"], x[4:]))


def test_forward_mode_needs_the_dense_strategy_on_the_grouped_path(states):
  # The grouped walk has a custom VJP (reverse mode); forward mode goes through dense.
  state, x = states["line"], jnp.asarray(_rows(8, 9))
  fn = line.score.__wrapped__
  tangent = jnp.ones_like(x)
  _, dense = jax.jvp(lambda f: fn(state, f, strategy="dense"), (x,), (tangent,))
  reverse = jax.grad(lambda f: fn(state, f, strategy="grouped").sum())(x)
  np.testing.assert_allclose(dense, (reverse * tangent).sum(axis=1), rtol=1e-5, atol=1e-5)
  with pytest.raises(TypeError, match="forward-mode"):
    jax.jvp(lambda f: fn(state, f, strategy="grouped"), (x,), (tangent,))
