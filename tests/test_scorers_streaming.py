"""`fit_from_batches` agrees with the in-memory `fit` for every scorer."""

import chex
import jax
import numpy as np
import pytest

from line_jax import scorers

pytestmark = pytest.mark.filterwarnings("error")

N, M, C, B = 150, 10, 4, 12
SMALL = {"knn": {"k": 9}, "vim": {"dim": 5}}


def _problem(seed=0):
  rng = np.random.default_rng(seed)
  train = np.abs(rng.normal(size=(N, M))).astype(np.float32)
  labels = rng.permutation(np.arange(N) % C)
  train += np.eye(C, M, dtype=np.float32)[labels]
  # A head that reads the class structure: temperature scaling's optimum is finite.
  kernel = (rng.normal(size=(M, C)) + 2 * np.eye(M, C)).astype(np.float32)
  bias = rng.normal(size=(C,)).astype(np.float32)
  test = np.abs(rng.normal(size=(B, M))).astype(np.float32)
  return train, labels, kernel, bias, test


def _batches(train, labels, sizes=(1, 40, 7, 52, 50)):
  assert sum(sizes) == len(train)
  edges = np.cumsum((0,) + sizes)
  return [(train[a:b], labels[a:b]) for a, b in zip(edges[:-1], edges[1:])]


@pytest.mark.parametrize("name", scorers.names())
def test_streamed_fit_equals_in_memory_fit(name):
  train, labels, kernel, bias, test = _problem()
  scorer = scorers.get(name)
  hparams = SMALL.get(name, {})
  whole = scorer.fit(train, labels, kernel, bias, **hparams)
  streamed = scorer.fit_from_batches(_batches(train, labels), kernel, bias, **hparams)
  chex.assert_trees_all_close(streamed, whole, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
      np.asarray(scorer.score(streamed, test)), np.asarray(scorer.score(whole, test)),
      rtol=1e-5, atol=1e-5,
  )


def test_streamed_react_threshold_is_exact():
  train, labels, kernel, bias, _ = _problem()
  react = scorers.get("react")
  state = react.fit_from_batches(_batches(train, labels), kernel, bias, percentile=73)
  assert float(state.threshold) == np.float32(np.percentile(train.ravel().astype(np.float64), 73))


def test_streamed_mahalanobis_survives_batches_missing_classes_and_large_offsets():
  train, labels, kernel, bias, test = _problem()
  train = train + 1e4  # big common offset: a naive sum of squares would cancel
  order = np.argsort(labels, kind="stable")  # each batch holds one or two classes
  batches = _batches(train[order], labels[order], sizes=(30, 30, 30, 30, 30))
  state = scorers.get("mahalanobis").fit_from_batches(batches, kernel, bias)
  x = train.astype(np.float64)
  means = np.stack([x[labels == c].mean(axis=0) for c in range(C)])
  centred = x - means[labels]
  np.testing.assert_allclose(np.asarray(state.means) + np.asarray(state.center), means, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(state.precision), np.linalg.pinv(centred.T @ centred / N),
                             rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["react", "vim"])
def test_two_pass_scorers_reject_one_shot_iterators(name):
  train, labels, kernel, bias, _ = _problem()
  with pytest.raises(TypeError, match="re-iterable"):
    scorers.get(name).fit_from_batches(iter(_batches(train, labels)), kernel, bias,
                                       **SMALL.get(name, {}))


@pytest.mark.parametrize("name", ["react", "dice", "mahalanobis", "knn", "vim", "line"])
def test_empty_batches_are_an_error(name):
  _, _, kernel, bias, _ = _problem()
  with pytest.raises(ValueError, match="empty"):
    scorers.get(name).fit_from_batches([], kernel, bias)


def test_knn_blocks_give_the_exact_kth_neighbour():
  train, labels, kernel, bias, test = _problem()
  knn = scorers.get("knn")
  one = knn.fit(train, labels, kernel, bias, k=9)
  for block_rows in (16, 64, 149):  # padded last blocks, k spanning blocks
    blocked = knn.fit(train, labels, kernel, bias, k=9, block_rows=block_rows)
    assert blocked.bank.shape[0] == -(-N // block_rows)
    np.testing.assert_allclose(np.asarray(knn.score(blocked, test)),
                               np.asarray(knn.score(one, test)), rtol=1e-6, atol=1e-6)


def test_knn_subsample_is_seeded_and_the_same_in_memory_and_streamed():
  train, labels, kernel, bias, test = _problem()
  knn = scorers.get("knn")
  kw = dict(k=3, bank_fraction=0.3, seed=5)
  whole = knn.fit(train, labels, kernel, bias, **kw)
  streamed = knn.fit_from_batches(_batches(train, labels), kernel, bias, **kw)
  chex.assert_trees_all_equal(whole, streamed)
  assert 0.15 * N < whole.size < 0.45 * N
  other = knn.fit(train, labels, kernel, bias, k=3, bank_fraction=0.3, seed=6)
  assert not np.array_equal(np.asarray(other.bank[0, :10]), np.asarray(whole.bank[0, :10]))
  # The bank is exactly the normalised rows that the counter-based draw keeps.
  key = jax.random.key(5)
  u = np.asarray([jax.random.uniform(jax.random.fold_in(key, i)) for i in range(N)])
  kept = train[u < 0.3]
  np.testing.assert_allclose(np.asarray(whole.bank).reshape(-1, M)[: whole.size],
                             kept / np.linalg.norm(kept, axis=1, keepdims=True), rtol=1e-6)
