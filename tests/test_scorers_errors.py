"""Bad input fails early with the same clear errors as `line_jax.line.fit`."""

import jax.numpy as jnp
import numpy as np
import pytest

from line_jax import line
from line_jax import scorers

pytestmark = pytest.mark.filterwarnings("error")

N, M, C = 40, 6, 3
SMALL = {"knn": {"k": 4}, "vim": {"dim": 3}}
NEEDS_LABELS = ("mahalanobis", "line", "rmds")
DATA_FREE = ("msp", "maxlogit", "energy", "ash_p", "ash_b", "ash_s", "scale", "gradnorm",
             "gen", "entropy", "mcm", "lts")


def test_data_free_lists_every_scorer_that_reads_no_data():
  assert set(DATA_FREE) == {n for n in scorers.names() if not scorers.get(n).fold.reads_data}


def _problem():
  rng = np.random.default_rng(0)
  train = np.abs(rng.normal(size=(N, M))).astype(np.float32)
  labels = np.arange(N) % C
  kernel = rng.normal(size=(M, C)).astype(np.float32)
  bias = rng.normal(size=(C,)).astype(np.float32)
  return train, labels, kernel, bias


def _line_error(**changes):
  """The error `line.fit` raises for the same bad input, as (type, message)."""
  train, labels, kernel, bias = _problem()
  args = {**dict(features=train, labels=labels, kernel=kernel, bias=bias), **changes}
  with pytest.raises((TypeError, ValueError)) as info:
    line.fit(args["features"], args["labels"], args["kernel"], args["bias"],
             p_w=10, p_a=10, clip=0.8)
  return type(info.value), str(info.value)


BAD_INPUTS = {
    "nan features": dict(features=np.full((N, M), np.nan, np.float32)),
    "1-d features": dict(features=np.ones((N,), np.float32)),
    "integer features": dict(features=np.ones((N, M), np.int32)),
    "kernel in PyTorch layout": dict(kernel=np.ones((C, M), np.float32)),
    "bias of wrong length": dict(bias=np.ones((C + 1,), np.float32)),
    "labels out of range": dict(labels=np.full((N,), C)),
    "labels of wrong length": dict(labels=np.zeros((N - 1,), np.int64)),
    "float labels": dict(labels=np.zeros((N,), np.float32)),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
@pytest.mark.parametrize("name", scorers.names())
def test_bad_training_input_gets_line_fits_error(name, case):
  train, labels, kernel, bias = _problem()
  args = {**dict(features=train, labels=labels, kernel=kernel, bias=bias), **BAD_INPUTS[case]}
  want_type, want_message = _line_error(**BAD_INPUTS[case])
  with pytest.raises(want_type) as info:
    scorers.get(name).fit(args["features"], args["labels"], args["kernel"], args["bias"],
                          **SMALL.get(name, {}))
  assert str(info.value) == want_message


@pytest.mark.parametrize("name", [n for n in scorers.names() if n not in DATA_FREE])
def test_bad_batch_in_a_stream_is_rejected(name):
  train, labels, kernel, bias = _problem()
  bad = train.copy()
  bad[3, 2] = np.inf
  fit = scorers.get(name).fit_from_batches
  with pytest.raises(ValueError, match="^features contains NaN or Inf$"):
    fit([(train, labels), (bad, labels)], kernel, bias, **SMALL.get(name, {}))
  width = "^features has 5 features per sample but the head expects 6$"
  with pytest.raises(ValueError, match=width):
    fit([(train, labels), (train[:, :5], labels)], kernel, bias, **SMALL.get(name, {}))


class _Unreadable:
  def __iter__(self):
    raise AssertionError("a scorer that fits nothing read the batches")


@pytest.mark.parametrize("name", DATA_FREE)
def test_data_free_scorers_check_the_head_but_never_read_batches(name):
  train, labels, kernel, bias = _problem()
  scorer = scorers.get(name)
  state = scorer.fit_from_batches(_Unreadable(), kernel, bias)
  np.testing.assert_array_equal(np.asarray(state.kernel), kernel)
  with pytest.raises(ValueError, match="^bias must have shape \\(3,\\) to match kernel"):
    scorer.fit_from_batches(_Unreadable(), kernel, bias[:2])


@pytest.mark.parametrize("name", NEEDS_LABELS)
def test_per_class_scorers_need_labels_and_every_class(name):
  train, labels, kernel, bias = _problem()
  with pytest.raises(ValueError, match="labels are required"):
    scorers.get(name).fit(train, None, kernel, bias)
  with pytest.raises(ValueError, match="1 class\\(es\\) have no training sample: 2"):
    scorers.get(name).fit(train, labels % 2, kernel, bias)


def test_unknown_scorer_lists_the_registered_names():
  with pytest.raises(ValueError, match="unknown scorer 'ebo'; registered: msp, maxlogit, energy"):
    scorers.get("ebo")


@pytest.mark.parametrize("name, wrong, valid", [
    ("react", "p", "percentile"),
    ("dice", "percentile", "p"),
    ("knn", "K", "k, bank_fraction, seed, block_rows, k_max"),
    ("line", "pw", "p_w, p_a, clip"),
    ("energy", "temperature", "none"),
])
def test_unknown_hyperparameter_lists_the_valid_ones(name, wrong, valid):
  train, labels, kernel, bias = _problem()
  message = f"unknown hyperparameter(s) {wrong} for scorer '{name}'; valid: {valid}"
  for call in (lambda: scorers.get(name).fit(train, labels, kernel, bias, **{wrong: 1}),
               lambda: scorers.get(name).fit_from_batches([], kernel, bias, **{wrong: 1})):
    with pytest.raises(ValueError) as info:
      call()
    assert str(info.value) == message


@pytest.mark.parametrize("name, hparams, error, message", [
    ("react", {"percentile": 101}, ValueError, "percentile must be a percentile in \\[0, 100\\]"),
    ("react", {"percentile": "90"}, TypeError, "percentile must be a real number"),
    ("dice", {"p": -1}, ValueError, "p must be a percentile in \\[0, 100\\]"),
    ("ash_b", {"percentile": 95}, ValueError, "keeps no activation of 6 features"),
    ("scale", {"percentile": None}, TypeError, "percentile must be a real number"),
    ("knn", {"k": 0}, ValueError, "k must be at least 1"),
    ("knn", {"k": 2.5}, TypeError, "k must be an integer"),
    ("knn", {"k": N + 1}, ValueError, f"k = {N + 1} needs at least {N + 1} bank rows"),
    ("knn", {"k": 4, "bank_fraction": 1.5}, ValueError, "bank_fraction must lie in \\(0, 1\\]"),
    ("knn", {"k": 4, "bank_fraction": 0.0}, ValueError, "bank_fraction must be a positive"),
    ("vim", {"dim": 0}, ValueError, "dim must be at least 1"),
    ("line", {"p_w": 200}, ValueError, "p_w must be a percentile in \\[0, 100\\]"),
    ("line", {"clip": -1.0}, ValueError, "clip must be a positive finite number"),
])
def test_bad_hyperparameters(name, hparams, error, message):
  train, labels, kernel, bias = _problem()
  with pytest.raises(error, match=message):
    scorers.get(name).fit(train, labels, kernel, bias, **hparams)
  with pytest.raises(error, match=message):
    scorers.get(name).fit_from_batches([(train, labels)], kernel, bias, **hparams)


@pytest.mark.parametrize("name", scorers.names())
def test_score_rejects_features_of_the_wrong_width(name):
  train, labels, kernel, bias = _problem()
  scorer = scorers.get(name)
  state = scorer.fit(train, labels, kernel, bias, **SMALL.get(name, {}))
  with pytest.raises(ValueError, match=f"features have {M + 1} features per sample"):
    scorer.score(state, jnp.ones((2, M + 1)))
  with pytest.raises(ValueError, match="features must be 2-D"):
    scorer.score(state, jnp.ones((M,)))
