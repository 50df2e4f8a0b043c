"""The head's two logit layouts, and ReAct's row chunks, give the same scores.

On CPU, batches up to `_common._CLASS_MAJOR_MAX_BATCH` rows are scored from
class-major logits `[classes, batch]` (ReAct in 64-row chunks); larger
batches, and accelerators, from `[batch, classes]`. Both paths must agree
with each other and with NumPy, chunk boundaries included.
"""

from conftest import random_problem
import jax
import numpy as np
import pytest

from line_jax import scorers
from line_jax.scorers import _common

pytestmark = pytest.mark.filterwarnings("error")

HEAD_SCORERS = ("msp", "maxlogit", "energy", "gradnorm", "dice", "react", "ash_p",
                "ash_b", "ash_s", "scale")
# 150 rows: two full 64-row ReAct chunks and a partial one.
N, M, C, B = 200, 24, 7, 150


def _problem():
  train, labels, kernel, bias = random_problem(C, M, N, seed=3)
  test = np.abs(np.random.default_rng(4).normal(size=(B, M))).astype(np.float32) * 1.5
  return train, labels, kernel, bias, test


@pytest.fixture
def batch_major(monkeypatch):
  """Forces `[batch, classes]` logits; traces made under it are dropped after."""
  monkeypatch.setattr(_common, "_CLASS_MAJOR_MAX_BATCH", -1)
  jax.clear_caches()
  yield
  monkeypatch.undo()
  jax.clear_caches()


def _scores(name):
  train, labels, kernel, bias, test = _problem()
  scorer = scorers.get(name)
  state = scorer.fit(train, labels, kernel, bias)
  return np.asarray(scorer.score(state, test))


def test_cpu_small_batches_are_class_major():
  assert jax.default_backend() == "cpu"
  assert _common.class_major(256) and _common.class_major(_common._CLASS_MAJOR_MAX_BATCH)
  assert not _common.class_major(_common._CLASS_MAJOR_MAX_BATCH + 1)
  _, _, kernel, bias, test = _problem()
  state = _common.head_state(kernel, bias)
  z, axis = _common.logits(state, test)
  assert (z.shape, axis) == ((C, B), 0)
  np.testing.assert_allclose(np.asarray(z).T, test @ kernel + bias, rtol=1e-5, atol=1e-5)


def test_head_state_keeps_the_flax_kernel_view():
  _, _, kernel, bias, _ = _problem()
  state = _common.head_state(kernel, bias)
  assert state.weight.shape == (C, M)
  np.testing.assert_array_equal(np.asarray(state.kernel), kernel)


@pytest.fixture(scope="module")
def class_major_scores():
  jax.clear_caches()
  return {name: _scores(name) for name in HEAD_SCORERS}


@pytest.mark.parametrize("name", HEAD_SCORERS)
def test_batch_major_scores_equal_class_major_scores(name, class_major_scores, batch_major):
  _, _, kernel, bias, test = _problem()
  z, axis = _common.logits(_common.head_state(kernel, bias), test)
  assert (z.shape, axis) == ((B, C), 1)
  np.testing.assert_allclose(_scores(name), class_major_scores[name], rtol=1e-5, atol=1e-6)


def test_react_in_chunks_matches_numpy():
  train, labels, kernel, bias, test = _problem()
  state = scorers.get("react").fit(train, labels, kernel, bias)
  z = np.minimum(test, float(state.threshold)).astype(np.float64) @ kernel + bias
  top = z.max(axis=1)
  want = top + np.log(np.exp(z - top[:, None]).sum(axis=1))
  np.testing.assert_allclose(_scores("react"), want, rtol=1e-5)
  assert np.any(test > float(state.threshold))  # the clip did something
