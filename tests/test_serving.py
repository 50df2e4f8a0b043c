"""Serving: a stream of batch sizes compiles once per bucket, not once per size.

`Scorer.score` and `line.score` pad a batch to the next bucket
(`line_jax._buckets`) by repeating its last row, run the jitted score there
and drop the padding's scores. Compilations are counted with JAX's own
backend-compile event, so a padding or slicing op that compiled per size
would be counted too.
"""

import contextlib
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from line_jax import _buckets
from line_jax import layout
from line_jax import line
from line_jax import scorers

sys.path.insert(0, "tests")
from conftest import random_problem  # pylint: disable=g-import-not-at-top,wrong-import-position

pytestmark = pytest.mark.filterwarnings("error")

C, M = 5, 16
HPARAMS = {"knn": {"k": 5}, "vim": {"dim": 4}, "line": {"p_w": 90, "p_a": 10, "clip": 1.0},
           "nnguide": {"k": 5}}
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def count_compilations():
  """Yields a list that collects one entry per XLA backend compilation."""
  seen = []

  def listener(event, duration, **kwargs):
    del duration, kwargs
    if event == _COMPILE_EVENT:
      seen.append(event)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield seen
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


@pytest.fixture(scope="module")
def problem():
  features, labels, kernel, bias = random_problem(C, M, 200, seed=11)
  test = np.abs(np.random.default_rng(12).normal(size=(300, M))).astype(np.float32)
  return features, labels, kernel, bias, test


def _fit(name, problem):
  features, labels, kernel, bias, _ = problem
  with warnings.catch_warnings():
    # Random labels: temperature scaling warns that the head is no better than
    # chance (T at the grid's end); its padding is what is tested here.
    warnings.filterwarnings("ignore", "temperature scaling")
    return scorers.get(name).fit(features, labels, kernel, bias, **HPARAMS.get(name, {}))


def test_buckets_grow_geometrically():
  sizes = np.arange(1, 1 << 17)
  buckets = np.array([_buckets.bucket(int(n)) for n in sizes])
  assert np.all(buckets >= sizes) and np.all(np.diff(buckets) >= 0)
  assert _buckets.bucket(1) == _buckets.bucket(8) == 8
  assert [_buckets.bucket(n) for n in (9, 300, 4096, 4097, 5000, 8193)] == [
      16, 512, 4096, 4608, 5120, 9216]
  assert _buckets.bucket(0) == 0
  # Powers of two up to 4096 (10 buckets), then 8 per doubling: O(log n).
  assert len(set(buckets)) == 10 + 8 * 5
  big = sizes > 4096
  assert np.max((buckets[big] - sizes[big]) / sizes[big]) <= 0.125


@pytest.mark.parametrize("name", ["energy", "line", "knn"])
def test_a_stream_of_batch_sizes_compiles_once_per_bucket(problem, name):
  *_, test = problem
  state = _fit(name, problem)
  scorer = scorers.get(name)
  sizes = range(1, 301)
  with count_compilations() as compiled:
    for n in sizes:
      # NumPy and single-device JAX inputs alike (device_put compiles nothing).
      rows = test[:n] if n % 2 else jax.device_put(test[:n])
      scores = scorer.score(state, rows)
      assert scores.shape == (n,) and isinstance(scores, jax.Array)
  buckets = {_buckets.bucket(n) for n in sizes}
  assert len(buckets) == 7  # 8, 16, ..., 512
  assert 1 <= len(compiled) <= len(buckets), (name, len(compiled))


def test_line_score_itself_is_bucketed(problem):
  features, labels, kernel, bias, test = problem
  state = line.fit(features, labels, kernel, bias, p_w=90, p_a=10, clip=1.0)
  with count_compilations() as compiled:
    for n in range(1, 65):
      for strategy in ("grouped", "dense"):
        line.score(state, test[:n], strategy=strategy)
  assert len(compiled) <= 2 * 4  # buckets 8, 16, 32, 64; two strategies
  np.testing.assert_array_equal(  # Bucketed and registered are one function.
      np.asarray(line.score(state, test[:37])),
      np.asarray(scorers.get("line").score(_fit("line", problem), test[:37])))


@pytest.mark.parametrize("name", scorers.names())
def test_padded_scores_are_the_unpadded_scores(problem, name):
  *_, test = problem
  scorer = scorers.get(name)
  state = _fit(name, problem)
  for n in (3, 13):
    got = np.asarray(scorer.score(state, test[:n]))
    # Exactly the jitted score of the padded batch, padding dropped ...
    padded = np.concatenate([test[:n], np.repeat(test[n - 1:n], _buckets.bucket(n) - n, 0)])
    np.testing.assert_array_equal(got, np.asarray(scorer.score_fn(state, padded))[:n])
    # ... and the unpadded batch's scores up to float32 rounding: XLA's
    # matrix products may round differently at another row count.
    want = np.asarray(scorer.score_fn(state, test[:n]))
    scale = max(1.0, float(np.max(np.abs(want))))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale, err_msg=name)


def test_traced_calls_use_the_jitted_function(problem):
  # tune vmaps `scorer.score` under jit; sharding jits it: no host padding there.
  *_, test = problem
  scorer = scorers.get("react")
  states = [_fit("react", problem), _fit("react", problem)]
  stacked = jax.tree.map(lambda *x: jnp.stack(x), *states)
  vmapped = jax.jit(jax.vmap(scorer.score, in_axes=(0, None)))(stacked, test[:5])
  want = np.asarray(scorer.score_fn(states[0], test[:5]))
  np.testing.assert_allclose(np.asarray(vmapped), np.stack([want, want]), rtol=1e-6)
  assert jax.make_jaxpr(scorer.score)(states[0], test[:5]).out_avals[0].shape == (5,)
  assert (scorer.score.lower(states[0], test[:8]).as_text()
          == scorer.score_fn.lower(states[0], test[:8]).as_text())


def test_placed_features_at_a_bucket_run_as_they_are_with_their_devices_layout(problem):
  # The short path of `Bucketed`: one device's array, batch already a bucket.
  *_, test = problem
  state = _fit("energy", problem)
  scorer = scorers.get("energy")
  rows = jax.device_put(test[:8])
  device_layout = layout.for_device(next(iter(rows.devices())))
  want = np.asarray(scorer.score_fn(state, rows, layout=device_layout))
  np.testing.assert_array_equal(np.asarray(scorer.score(state, rows)), want)
  # A traced state with concrete features takes the same path.
  traced = jax.jit(lambda s: scorer.score(s, rows))(state)
  np.testing.assert_allclose(np.asarray(traced), want, rtol=1e-6)
  # A layout given by the caller is the caller's.
  other = layout.ACCELERATOR if device_layout.cpu else layout.CPU
  np.testing.assert_allclose(np.asarray(scorer.score(state, rows, layout=other)), want,
                             rtol=1e-5, atol=1e-5)
  with pytest.raises(TypeError, match="cannot score"):  # The state is still checked.
    scorer.score(_fit("react", problem), rows)


def test_inputs_it_cannot_pad_reach_the_jitted_functions_own_errors(problem):
  *_, test = problem
  state = _fit("energy", problem)
  score = scorers.get("energy").score
  with pytest.raises(ValueError, match=str(M)):
    score(state, test[:5, :M - 1])  # wrong width: padded, then the scorer's own check
  assert np.asarray(score(state, test[:5].tolist())).shape == (5,)
