"""Bad input gets an error that names the problem, before anything is traced."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from line_jax import line
from line_jax import scorers


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
    (dict(features={"rows": 12}), TypeError, r"features must be a NumPy or JAX array"),
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


# --- fit and score take NumPy, JAX, lists and PyTorch tensors; anything else names itself -----


def _as(kind, array):
  if kind == "numpy":
    return array
  if kind == "jax":
    return jnp.asarray(array)
  if kind == "list":
    return array.tolist()
  torch = pytest.importorskip("torch")
  tensor = torch.from_numpy(np.array(array))
  if kind == "torch_grad" and tensor.is_floating_point():
    return torch.nn.Parameter(tensor)  # requires grad: .numpy() alone would fail
  return tensor


KINDS = ["numpy", "jax", "list", "torch", "torch_grad"]


@pytest.fixture(scope="module")
def io_problem():
  import sys  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, "tests")
  from conftest import random_problem  # pylint: disable=g-import-not-at-top
  features, labels, kernel, bias = random_problem(3, 6, 30, seed=4)
  test = np.abs(np.random.default_rng(5).normal(size=(9, 6))).astype(np.float32)
  return features, labels, kernel, bias, test


@pytest.mark.parametrize("name", ["line", "knn", "mahalanobis", "energy"])
@pytest.mark.parametrize("kind", KINDS)
def test_fit_and_score_take_every_array_kind(io_problem, name, kind):
  features, labels, kernel, bias, test = io_problem
  scorer = scorers.get(name)
  hp = {"knn": {"k": 2}, "line": {"clip": None}}.get(name, {})
  want_state = scorer.fit(features, labels, kernel, bias, **hp)
  want = np.asarray(scorer.score(want_state, test))
  state = scorer.fit(*(_as(kind, a) for a in (features, labels, kernel, bias)), **hp)
  jax.tree.map(np.testing.assert_array_equal, state, want_state)
  np.testing.assert_array_equal(np.asarray(scorer.score(state, _as(kind, test))), want)
  batches = [(_as(kind, features[:20]), _as(kind, labels[:20])),
             (_as(kind, features[20:]), _as(kind, labels[20:]))]
  streamed = scorer.fit_from_batches(batches, _as(kind, kernel), _as(kind, bias), **hp)
  np.testing.assert_allclose(np.asarray(scorer.score(streamed, test)), want, rtol=1e-5,
                             atol=1e-5)


def test_torch_bfloat16_and_float64_tensors():
  torch = pytest.importorskip("torch")
  from line_jax import _validation  # pylint: disable=g-import-not-at-top
  half = _validation.as_array("features", torch.ones(2, 3, dtype=torch.bfloat16))
  assert half.dtype == jnp.bfloat16 and half.shape == (2, 3)
  double = _validation.as_array("features", torch.ones(2, 3, dtype=torch.float64))
  assert isinstance(double, np.ndarray) and double.dtype == np.float64
  transposed = _validation.as_array("kernel", torch.arange(6.0).reshape(2, 3).T)
  np.testing.assert_array_equal(transposed, np.arange(6.0).reshape(2, 3).T)


def test_streamed_torch_batches_keep_one_shot_and_re_iterable_apart(io_problem):
  torch = pytest.importorskip("torch")
  features, labels, kernel, bias, _ = io_problem
  one_shot = ((torch.from_numpy(features[i:i + 10]), torch.from_numpy(labels[i:i + 10]))
              for i in range(0, 30, 10))
  with pytest.raises(TypeError, match="re-iterable"):  # ReAct reads the batches twice
    scorers.get("react").fit_from_batches(one_shot, kernel, bias)
  one_shot = ((torch.from_numpy(features[i:i + 10]), None) for i in range(0, 30, 10))
  state = scorers.get("scale").fit_from_batches(one_shot, kernel, bias)
  want = scorers.get("scale").fit(features, None, kernel, bias)
  jax.tree.map(np.testing.assert_array_equal, state, want)


class _Frame:  # stands in for a pandas DataFrame or any other container
  pass


@pytest.mark.parametrize("which", ["features", "labels", "kernel", "bias"])
@pytest.mark.parametrize("value,shown", [
    ({"a": 1.0}, "got dict"),
    ("features.npy", "got str"),
    (3.0, "got float"),
    (_Frame(), "got test_validation._Frame"),
    ({1.0, 2.0}, "got set"),
])
def test_fit_names_what_it_cannot_take(io_problem, which, value, shown):
  features, labels, kernel, bias, _ = io_problem
  args = dict(features=features, labels=labels, kernel=kernel, bias=bias)
  args[which] = value
  with pytest.raises(TypeError, match=rf"^{which} must be a NumPy or JAX array, a \(nested\) "
                     rf"list or a PyTorch tensor, {shown}$"):
    scorers.get("line").fit(**args)
  with pytest.raises(TypeError, match=rf"^{which} must be .* {shown}$"):
    batches = [(args["features"], args["labels"])]
    scorers.get("mahalanobis").fit_from_batches(batches, args["kernel"], args["bias"])


@pytest.mark.parametrize("value,error,message", [
    ({"a": 1.0}, TypeError, r"^features must be a NumPy or JAX array, .*, got dict$"),
    (_Frame(), TypeError, r"got test_validation\._Frame$"),
    ([["a", "b"]], TypeError, r"^features must hold numbers, got a list of <U1 values$"),
    ([[1.0, 2.0], [1.0]], ValueError, r"^features is a ragged list"),
    ([[1.0] * 5], ValueError, r"features have 5 features per sample but the fitted head "
                              r"expects 6"),
])
def test_score_names_what_it_cannot_take(io_problem, value, error, message):
  features, labels, kernel, bias, _ = io_problem
  state = scorers.get("energy").fit(features, labels, kernel, bias)
  with pytest.raises(error, match=message):
    scorers.get("energy").score(state, value)


@pytest.mark.parametrize("kind", KINDS)
def test_the_line_module_api_takes_every_array_kind(io_problem, kind):
  """`line.fit` / `fit_from_contributions` / `contributions*` / `score`, not only the registry."""
  features, labels, kernel, bias, test = io_problem
  hp = dict(p_w=50, p_a=30, clip=1.2)
  want_state = line.fit(features, labels, kernel, bias, **hp)
  want = np.asarray(line.score(want_state, test))
  state = line.fit(*(_as(kind, a) for a in (features, labels, kernel, bias)), **hp)
  jax.tree.map(np.testing.assert_array_equal, state, want_state)
  np.testing.assert_array_equal(np.asarray(line.score(state, _as(kind, test))), want)
  contrib = line.contributions(_as(kind, features), _as(kind, labels), _as(kind, kernel))
  streamed = line.contributions_from_batches(
      [(_as(kind, features[:20]), _as(kind, labels[:20])),
       (_as(kind, features[20:]), _as(kind, labels[20:]))], _as(kind, kernel))
  np.testing.assert_allclose(streamed, contrib, rtol=1e-12)
  from_contrib = line.fit_from_contributions(_as(kind, np.asarray(contrib)), _as(kind, kernel),
                                             _as(kind, bias), **hp)
  np.testing.assert_array_equal(np.asarray(line.score(from_contrib, test)), want)


@pytest.mark.parametrize("which", ["features", "labels", "kernel", "bias"])
def test_line_fit_names_what_it_cannot_take(io_problem, which):
  features, labels, kernel, bias, test = io_problem
  args = dict(features=features, labels=labels, kernel=kernel, bias=bias)
  args[which] = {"a": 1.0}
  with pytest.raises(TypeError, match=rf"^{which} must be a NumPy or JAX array, .*, got dict$"):
    line.fit(**args, p_w=50, p_a=30, clip=None)
  state = line.fit(features, labels, kernel, bias, p_w=50, p_a=30, clip=None)
  with pytest.raises(TypeError, match=r"^features must be .*, got str$"):
    line.score(state, "features.npy")


# ---- the NaN / Inf scan ------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize("where", ["numpy", "jax", "jax, past the host-check size"])
def test_all_finite_finds_any_nan_or_inf_and_is_not_fooled_by_an_overflowing_sum(dtype, where):
  from line_jax import _validation  # pylint: disable=import-outside-toplevel
  big = float(jnp.finfo(dtype).max)
  rows = 64 if "past" not in where else _validation._HOST_CHECK_MAX // 7 + 1  # pylint: disable=protected-access
  clean = np.full((rows, 7), big, np.float64)  # Finite entries whose sum overflows.
  clean[::3] = -0.5
  cases = {"clean": clean}
  for bad in (np.nan, np.inf, -np.inf):
    x = clean.copy()
    x[37, 5] = bad
    cases[str(bad)] = x
  for name, x in cases.items():
    x = x.astype(jnp.dtype(dtype))
    with jax.enable_x64(dtype == "float64"):
      x = jnp.asarray(x) if where.startswith("jax") else x
      assert _validation.all_finite(x) is (name == "clean"), (name, x.dtype)


@pytest.mark.parametrize("size", [12, 300_000])  # checked on the host; on the device
def test_jax_labels_out_of_range_are_named_wherever_they_are_checked(size):
  from line_jax import _validation  # pylint: disable=import-outside-toplevel
  y = np.zeros(size, np.int32)
  _validation.labels(jnp.asarray(y), size, 3)
  y[size // 2] = 3
  with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\), got values in \[0, 3\]"):
    _validation.labels(jnp.asarray(y), size, 3)
  y[size // 2] = -2
  with pytest.raises(ValueError, match=r"got values in \[-2, 0\]"):
    _validation.labels(jnp.asarray(y), size, 3)
