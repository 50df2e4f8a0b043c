"""Problems and float64 NumPy references shared by the scorer tests.

Two random problems of one recipe (non-negative features with class
structure, a random head, test rows drawn the same way and scaled up) at two
sizes: `_problem` (120 training rows, 16 test rows; `_fit_score` fits on it
with SMALL's hyperparameters and returns float32 scores) and `_big_problem`
(150 and 24, with an optional scale on the head; `_fit_score_big` fits on it,
or on a problem given, and returns float64). Each test keeps the problem it
was written on, and with it its data and tolerances. The references are
written from each paper's definition, independently of line_jax.
"""

import numpy as np

from line_jax import scorers

M, C = 12, 5  # Both problems' features and classes.
N, B = 120, 16  # _problem's training and test rows.
BIG_N, BIG_B = 150, 24  # _big_problem's.
SMALL = {"knn": {"k": 7}, "vim": {"dim": 6}}  # _fit_score's KNN and ViM on the 120-row bank.


def _problem(seed=0):
  rng = np.random.default_rng(seed)
  train = np.abs(rng.normal(size=(N, M))).astype(np.float32)
  labels = np.arange(N) % C
  train += np.eye(C, M, dtype=np.float32)[labels] * 2  # class structure
  kernel = rng.normal(size=(M, C)).astype(np.float32)
  bias = rng.normal(size=(C,)).astype(np.float32)
  test = np.abs(rng.normal(size=(B, M))).astype(np.float32) * 1.5
  return train, labels, kernel, bias, test


def _big_problem(seed=0, scale=1.0):
  rng = np.random.default_rng(seed)
  train = np.abs(rng.normal(size=(BIG_N, M))).astype(np.float32)
  labels = np.arange(BIG_N) % C
  train += np.eye(C, M, dtype=np.float32)[labels] * 2  # class structure
  kernel = (rng.normal(size=(M, C)) * scale).astype(np.float32)
  bias = rng.normal(size=(C,)).astype(np.float32)
  test = np.abs(rng.normal(size=(BIG_B, M))).astype(np.float32) * 1.5
  return train, labels, kernel, bias, test


def _fit_score(name, **hparams):
  train, labels, kernel, bias, test = _problem()
  scorer = scorers.get(name)
  state = scorer.fit(train, labels, kernel, bias, **{**SMALL.get(name, {}), **hparams})
  return np.asarray(scorer.score(state, test)), state


def _fit_score_big(name, problem=None, **hparams):
  train, labels, kernel, bias, test = problem or _big_problem()
  scorer = scorers.get(name)
  state = scorer.fit(train, labels, kernel, bias, **hparams)
  return np.asarray(scorer.score(state, test), np.float64), state


# Independent float64 NumPy references, written from each paper's definition.
def _logits(h, kernel, bias):
  return h.astype(np.float64) @ kernel.astype(np.float64) + bias.astype(np.float64)


def _energy(z):
  top = z.max(axis=1)
  return top + np.log(np.exp(z - top[:, None]).sum(axis=1))


def _top_k_mask(h, k):
  order = np.argsort(-h, axis=1, kind="stable")[:, :k]
  mask = np.zeros(h.shape, bool)
  np.put_along_axis(mask, order, True, axis=1)
  return mask


def _close(got, want, rtol=1e-5):
  scale = max(1.0, float(np.max(np.abs(want))))
  np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale)
