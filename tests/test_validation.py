"""Bad input gets an error that names the problem, before anything is traced."""

import numpy as np
import pytest

from line_jax import line


@pytest.fixture
def ok(problem):
  features, labels, kernel, bias = problem(3, 5, 12)
  return dict(features=features, labels=labels, kernel=kernel, bias=bias)


def _fit(ok, **changes):
  args = {**ok, **changes}
  hp = dict(p_w=90, p_a=90, clip=1.0)
  hp.update({k: args.pop(k) for k in list(args) if k in hp})
  return line.fit(args["features"], args["labels"], args["kernel"], args["bias"], **hp)


@pytest.mark.parametrize("change,error,message", [
    (dict(features=np.zeros((12,), np.float32)), ValueError, r"features must be 2-D"),
    (dict(features=np.zeros((0, 5), np.float32)), ValueError, r"features is empty"),
    (dict(features=np.ones((12, 5), np.int32)), TypeError, r"features must be a floating-point"),
    (dict(features=np.full((12, 5), np.nan, np.float32)), ValueError, r"features contains NaN or Inf"),
    (dict(kernel=np.ones((4, 3), np.float32)), ValueError, r"kernel has 4 input features but features have 5"),
    (dict(kernel=np.ones((5,), np.float32)), ValueError, r"kernel must be 2-D"),
    (dict(kernel=np.full((5, 3), np.inf, np.float32)), ValueError, r"kernel contains NaN or Inf"),
    (dict(bias=np.ones((4,), np.float32)), ValueError, r"bias must have shape \(3,\)"),
    (dict(bias=np.array([0, np.nan, 0], np.float32)), ValueError, r"bias contains NaN or Inf"),
    (dict(labels=np.zeros((11,), np.int32)), ValueError, r"labels has 11 entries but features have 12"),
    (dict(labels=np.zeros((12,), np.float32)), TypeError, r"labels must be integers"),
    (dict(labels=np.full((12,), 3)), ValueError, r"labels must lie in \[0, 3\)"),
    (dict(labels=np.full((12,), -1)), ValueError, r"labels must lie in \[0, 3\)"),
    (dict(labels=np.array([0, 1] * 6)), ValueError, r"no training sample: 2"),
    (dict(p_w=101), ValueError, r"p_w must be a percentile in \[0, 100\]"),
    (dict(p_a=-1), ValueError, r"p_a must be a percentile in \[0, 100\]"),
    (dict(p_w="90"), TypeError, r"p_w must be a real number"),
    (dict(p_a=True), TypeError, r"p_a must be a real number"),
    (dict(clip=0.0), ValueError, r"clip must be a positive finite number"),
    (dict(clip=float("inf")), ValueError, r"clip must be a positive finite number"),
    (dict(clip=-1.0), ValueError, r"clip must be a positive finite number"),
    (dict(features=[[1.0] * 5] * 12), TypeError, r"features must be an array"),
])
def test_fit_rejects(ok, change, error, message):
  with pytest.raises(error, match=message):
    _fit(ok, **change)


def test_contributions_reject_bad_labels(ok):
  with pytest.raises(ValueError, match=r"labels must lie in"):
    line.contributions(ok["features"], ok["labels"] + 5, ok["kernel"])


def test_fit_from_contributions_rejects_wrong_shape(ok):
  with pytest.raises(ValueError, match=r"contributions must have shape \(3, 5\)"):
    line.fit_from_contributions(np.zeros((5, 3)), ok["kernel"], ok["bias"], p_w=90, p_a=90, clip=1.0)


@pytest.mark.parametrize("features,message", [
    (np.ones((4, 6), np.float32), r"features have 6 features per sample but the fitted head expects 5"),
    (np.ones((4, 5, 1), np.float32), r"features must be 2-D"),
    (np.ones((5,), np.float32), r"features must be 2-D"),
])
def test_score_rejects_wrong_rank_or_width(ok, features, message):
  state = _fit(ok)
  with pytest.raises(ValueError, match=message):
    line.score(state, features)


def test_score_rejects_unknown_strategy(ok):
  with pytest.raises(ValueError, match=r"strategy must be one of"):
    line.score(_fit(ok), ok["features"], strategy="fast")
