"""Properties every registered scorer must have, on small random problems.

For every scorer and any finite, non-negative (post-ReLU) batch:
* permuting the batch permutes the scores;
* the scores are finite (an all-zero row: see the last test);
* a sample's score does not depend on the other samples of its batch, nor on
  padding rows appended to it (relative 1e-6).

Shapes are fixed (batches of 3 or 8 rows, 16 with company or padding) so
that each scorer compiles three times, not once per example.
"""

import hypothesis
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
import numpy as np
import pytest

from conftest import random_problem
from line_jax import scorers

CLASSES, FEATURES, TRAIN, FULL = 4, 12, 48, 16
# Hyperparameters that fit a 48-sample problem (KNN's default k is 1000).
HPARAMS = {"knn": dict(k=5), "vim": dict(dim=6),
           "line": dict(p_w=50, p_a=50, clip=1.0)}

_values = st.floats(0.0, 8.0, width=32, allow_subnormal=False)


def _close(got, want, what):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  scale = max(1.0, float(np.max(np.abs(want))))
  # Relative 1e-6, measured against the batch's score scale near zero.
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * scale, err_msg=what)


@pytest.mark.parametrize("name", scorers.names())
@hypothesis.settings(max_examples=4, deadline=None, derandomize=True,
                     suppress_health_check=[hypothesis.HealthCheck.too_slow])
@given(data=st.data())
def test_scores_are_per_sample_finite_and_permutation_equivariant(name, data):
  seed = data.draw(st.integers(0, 2**16), label="problem seed")
  features, labels, kernel, bias = random_problem(CLASSES, FEATURES, TRAIN, seed=seed)
  scorer = scorers.get(name)
  state = scorer.fit(features, labels, kernel, bias, **HPARAMS.get(name, {}))

  rows = data.draw(st.sampled_from([3, 8]), label="rows")
  x = data.draw(hnp.arrays(np.float32, (rows, FEATURES), elements=_values), label="x")
  others = data.draw(hnp.arrays(np.float32, (FULL - rows, FEATURES), elements=_values),
                     label="others")
  perm = np.asarray(data.draw(st.permutations(range(rows)), label="perm"))

  scores = np.asarray(scorer.score(state, x))
  assert scores.shape == (rows,)
  nonzero = np.any(x != 0, axis=1)
  assert np.all(np.isfinite(scores[nonzero])), scores
  _close(scorer.score(state, x[perm]), scores[perm], "permuted batch")
  in_company = scorer.score(state, np.concatenate([others, x]))[FULL - rows:]
  _close(in_company, scores, "same rows in another batch")
  padded = scorer.score(state, np.concatenate([x, np.zeros_like(others)]))[:rows]
  _close(padded, scores, "same rows with zero padding")


# ASH-S and SCALE scale by exp(sum / top-k sum), 0 / 0 for an all-zero row
# (as the official ASH code does). The fix is in the report for
# line_jax/scorers/_ash.py and _scale.py; strict, so the fix flips this test.
_ZERO_ROW_NAN = set()


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.xfail(
        strict=True, reason="0 / 0 in exp(sum / top-k sum); fix pending"))
    if n in _ZERO_ROW_NAN else n
    for n in scorers.names()])
def test_an_all_zero_row_scores_finite(name):
  features, labels, kernel, bias = random_problem(CLASSES, FEATURES, TRAIN, seed=1)
  scorer = scorers.get(name)
  state = scorer.fit(features, labels, kernel, bias, **HPARAMS.get(name, {}))
  x = np.concatenate([np.zeros((1, FEATURES), np.float32), features[:2]])
  assert np.all(np.isfinite(np.asarray(scorer.score(state, x))))
