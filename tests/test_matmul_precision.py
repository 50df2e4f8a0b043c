"""Every float32 product of a score runs at full float32 precision.

On a GPU, JAX's default precision would run them in TF32; these tests read
the precision each `dot_general` of a traced score asks for, so they hold
the GPU's behaviour on the CPU that CI has.
"""

import functools

import jax
from jax.extend import core as jex_core
import numpy as np
import pytest

from conftest import random_problem
from line_jax import _matmul
from line_jax import layout
from line_jax import line
from line_jax import scorers
from line_jax.runs import tune
from line_jax.scorers import _vim

HIGHEST = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)


def _dot_precisions(jaxpr) -> list:
  """The `precision` of every float32 dot_general in `jaxpr` and the jaxprs inside it.

  Float64 products are left out: TF32 and bfloat16 passes never apply to them.
  """
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general" and eqn.invars[0].aval.dtype == np.float32:
      found.append(eqn.params["precision"])
    for value in eqn.params.values():
      for inner in value if isinstance(value, (list, tuple)) else (value,):
        if isinstance(inner, jex_core.ClosedJaxpr):
          found += _dot_precisions(inner.jaxpr)
        elif isinstance(inner, jex_core.Jaxpr):
          found += _dot_precisions(inner)
  return found


def _traced(fn, *args) -> list:
  return _dot_precisions(jax.make_jaxpr(fn)(*args).jaxpr)


@pytest.fixture(scope="module")
def problem():
  features, labels, kernel, bias = random_problem(4, 12, 64, seed=5)
  test = np.abs(np.random.default_rng(7).normal(size=(9, features.shape[1]))).astype(np.float32)
  return features, labels, kernel, bias, test


@pytest.mark.parametrize("name", scorers.names())
def test_every_scorer_asks_for_float32_products(problem, name):
  features, labels, kernel, bias, test = problem
  scorer = scorers.get(name)
  hparams = {"k": 5} if name == "knn" else {"dim": 4} if name == "vim" else {}
  state = scorer.fit(features, labels, kernel, bias, **hparams)
  precisions = _traced(scorer.score, state, test)
  assert precisions, f"{name}: no matrix product traced"
  assert all(p == HIGHEST for p in precisions), (name, precisions)


@pytest.mark.parametrize("strategy", ["grouped", "dense"])
def test_line_asks_for_float32_products_in_both_strategies(problem, strategy):
  features, labels, kernel, bias, test = problem
  state = line.fit(features, labels, kernel, bias, p_w=50.0, p_a=50.0, clip=1.0)
  precisions = _traced(lambda s, x: line.score(s, x, strategy=strategy), state, test)
  assert precisions and all(p == HIGHEST for p in precisions), precisions


def test_a_default_precision_the_user_chose_applies_instead(problem):
  features, labels, kernel, bias, test = problem
  state = scorers.get("energy").fit(features, labels, kernel, bias)
  assert _matmul.precision() == jax.lax.Precision.HIGHEST
  with jax.default_matmul_precision("tensorfloat32"):
    assert _matmul.precision() is None
    precisions = _traced(scorers.get("energy").score, state, test)
  tf32 = (jax.lax.Precision.HIGH, jax.lax.Precision.HIGH)  # what JAX makes of "tensorfloat32"
  assert precisions == [tf32, tf32]  # The head's product and the guard's (`_scoring.finite_rows`).


@pytest.mark.parametrize("method", sorted(tune.GRIDS))
def test_tuning_grids_ask_for_float32_products(problem, method):
  # The registry's own score, vmapped over stacked states.
  features, labels, kernel, bias, test = problem
  points = tune.feasible(method, tune.grid_points(tune.GRIDS[method]), kernel, bias)[0][:3]
  if not points:
    pytest.skip(f"no point of {method}'s grid fits this {features.shape[1]}-feature head")
  built = tune.vmapped_grid(method, points, features, labels, kernel, bias)
  if built is None:
    pytest.skip(f"{method}'s states do not stack: tuned by the registry loop")
  score_fn, states, in_axes = built
  assert score_fn is scorers.get(method).score
  precisions = _dot_precisions(jax.make_jaxpr(tune.grid_scores, static_argnums=(0, 3))(
      score_fn, states, test, in_axes).jaxpr)
  assert precisions and all(p == HIGHEST for p in precisions), precisions


@pytest.mark.parametrize("device", [layout.CPU, layout.ACCELERATOR])
def test_vim_fitting_products_ask_for_float32(problem, device):
  features, labels, kernel, bias, _ = problem
  acc = _vim.init(kernel, bias, dim=4)
  with jax.enable_x64(True):  # as `_vim.update` runs them: float32 products, float64 sums
    first = _traced(functools.partial(_vim._first, layout=device), acc, features)
    second = _traced(_vim._second, acc.replace(second=True), features)
  assert first == [HIGHEST] and second == [HIGHEST]
