"""Detectors on feature-space statistics, against references.

Mahalanobis, RMDS, KNN, NNGuide, ViM, SHE, fDBD and NCI, each against an
independent float64 NumPy computation written from its paper (and official
code, where they differ), with what its statistics or bank need: RMDS as
Mahalanobis plus the background distance; KNN's and NNGuide's banks (one
block or several, states at several k under vmap, k_max, KNN's default k and
growing bank, NNGuide's seeded hash subset however the data arrive); ViM's
default dim and its limit; SHE's classes without correct samples; fDBD's
identical classes.
"""


import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _scorer_references import BIG_N
from _scorer_references import C
from _scorer_references import M
from _scorer_references import N
from _scorer_references import _big_problem
from _scorer_references import _close
from _scorer_references import _energy
from _scorer_references import _fit_score
from _scorer_references import _fit_score_big
from _scorer_references import _logits
from _scorer_references import _problem
from line_jax import fold as fold_lib
from line_jax import scorers
from line_jax.scorers import _knn
from line_jax.scorers import _row_subset
from line_jax.scorers import _vim

pytestmark = pytest.mark.filterwarnings("error")


# ---- Mahalanobis and RMDS ----------------------------------------------------


def test_mahalanobis_matches_numpy():
  train, labels, kernel, bias, test = _problem()
  x = train.astype(np.float64)
  means = np.stack([x[labels == c].mean(axis=0) for c in range(C)])
  centred = x - means[labels]
  precision = np.linalg.pinv(centred.T @ centred / N)
  diff = test[:, None, :] - means[None]
  distances = np.einsum("bcm,mn,bcn->bc", diff, precision, diff)
  scores, _ = _fit_score("mahalanobis")
  np.testing.assert_allclose(scores, -distances.min(axis=1), rtol=1e-4)


def test_rmds_matches_numpy():
  train, labels, kernel, bias, test = _big_problem()
  x = train.astype(np.float64)
  means = np.stack([x[labels == c].mean(axis=0) for c in range(C)])
  within = x - means[labels]
  precision = np.linalg.pinv(within.T @ within / BIG_N)
  mean0 = x.mean(axis=0)
  precision0 = np.linalg.pinv((x - mean0).T @ (x - mean0) / BIG_N)
  diff = test[:, None, :] - means[None]
  md = np.einsum("bcm,mn,bcn->bc", diff, precision, diff)
  md0 = np.einsum("bm,mn,bn->b", test - mean0, precision0, test - mean0)
  got, state = _fit_score_big("rmds")
  _close(got, -(md - md0[:, None]).min(axis=1), rtol=1e-4)
  np.testing.assert_allclose(np.asarray(state.background_mean), mean0, rtol=1e-6)


def test_rmds_is_mahalanobis_plus_the_background_distance():
  train, labels, kernel, bias, test = _big_problem()
  got, state = _fit_score_big("rmds")
  maha, _ = _fit_score_big("mahalanobis")
  x = test - np.asarray(state.background_mean, np.float64)
  _close(got - maha, np.einsum("bm,mn,bn->b", x, np.asarray(state.background_precision), x),
         rtol=1e-4)


# ---- KNN ---------------------------------------------------------------------


def test_knn_matches_numpy():
  train, labels, kernel, bias, test = _problem()
  normalise = lambda x: x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-10)
  bank, z = normalise(train.astype(np.float64)), normalise(test.astype(np.float64))
  distances = np.linalg.norm(z[:, None] - bank[None], axis=2)
  want = -np.sort(distances, axis=1)[:, 6]
  scores, state = _fit_score("knn", k=7)
  np.testing.assert_allclose(scores, want, atol=2e-6)
  kth = np.asarray(_knn.kth_affinity(state, jnp.asarray(z, jnp.float32)), np.float64)
  np.testing.assert_allclose(-np.sqrt(np.maximum(1.0 - kth, 0.0)), want, atol=2e-6)


@pytest.mark.parametrize("block_rows", [None, 32])  # one block; four, the last padded
def test_knn_scores_under_vmap_over_k_as_each_k_alone(block_rows):
  train, labels, kernel, bias, test = _problem()
  knn = scorers.get("knn")
  blocks = {} if block_rows is None else {"block_rows": block_rows}
  ks = (1, 3, 7)
  states = [knn.fit(train, labels, kernel, bias, k=k, k_max=max(ks), **blocks) for k in ks]
  assert {s.k_max for s in states} == {7} and [int(s.k) for s in states] == list(ks)
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
  z = jnp.asarray(test / (np.linalg.norm(test, axis=1, keepdims=True) + 1e-10), jnp.float32)
  for k, state in zip(ks, states):
    alone = knn.fit(train, labels, kernel, bias, k=k, **blocks)  # k_max = k
    assert alone.k_max == k
    want = np.asarray(knn.score(alone, test))
    np.testing.assert_allclose(np.asarray(knn.score(state, test)), want, rtol=1e-6, atol=1e-6)
    if block_rows is None:  # the one-block selection, traced k
      kth = jax.vmap(lambda s: _knn.kth_affinity(s, z))(stacked)
      np.testing.assert_allclose(-np.sqrt(np.maximum(1.0 - np.asarray(kth[ks.index(k)]), 0)),
                                 want, atol=2e-6)
  vmapped = np.asarray(jax.vmap(knn.score, in_axes=(0, None))(stacked, test))
  for row, k in zip(vmapped, ks):
    np.testing.assert_allclose(row, np.asarray(knn.score(knn.fit(
        train, labels, kernel, bias, k=k, **blocks), test)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("size, want", [(1, 1), (999, 1), (1500, 2), (50_000, 50),
                                        (1_281_167, 1281)])
def test_knn_default_k_is_one_neighbour_per_thousand_rows(size, want):
  from line_jax.scorers import _knn  # pylint: disable=g-import-not-at-top
  assert _knn.default_k(size) == want


def test_knn_default_k_resolves_on_the_bank_and_pastes_back():
  train, labels, kernel, bias, test = _problem()
  scorer = scorers.get("knn")
  state = scorer.fit(train, labels, kernel, bias)  # k=None
  assert int(state.k) == max(1, round(N / 1000)) and state.k_max == int(state.k)
  resolved = scorers.resolved_hparams(dict(scorer.defaults), state)
  assert resolved["k"] == int(state.k)
  again = scorer.fit(train, labels, kernel, bias, **resolved)
  np.testing.assert_array_equal(np.asarray(scorer.score(again, test)),
                                np.asarray(scorer.score(state, test)))


def test_knn_bank_grows_in_place_yet_each_accumulator_keeps_its_own_rows():
  from line_jax.scorers import _knn  # pylint: disable=g-import-not-at-top
  train, labels, kernel, bias, _ = _problem()
  rng = np.random.default_rng(7)
  batches = [rng.random((n, M)).astype(np.float32) for n in (5, 700, 3, 400)]
  acc = _knn.init(kernel, bias, k=3)
  history = [acc]
  for batch in batches:
    history.append(_knn.update(history[-1], batch, None))
  normalise = lambda x: x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-10)
  want = normalise(np.concatenate(batches))
  np.testing.assert_allclose(history[-1].rows, want, rtol=1e-6)
  # The first batch's rows are kept as they are (a one-batch fit copies
  # none); appends then share one buffer until it is full (1,024 rows), then
  # it doubles...
  assert history[1].rows.base is not history[2].rows.base
  assert history[2].rows.base is history[3].rows.base
  assert history[4].rows.base is not history[3].rows.base
  # ...yet an older accumulator updated again gets rows of its own: the newer
  # ones keep theirs.
  branch = _knn.update(history[2], batches[0], None)
  np.testing.assert_allclose(branch.rows[705:], normalise(batches[0]), rtol=1e-6)
  np.testing.assert_allclose(history[3].rows[705:], normalise(batches[2]), rtol=1e-6)
  np.testing.assert_allclose(history[-1].rows, want, rtol=1e-6)
  state = _knn.finalize(history[-1])
  assert state.size == 1108


def test_knn_k_max_is_at_least_k_and_capped_at_the_bank():
  train, labels, kernel, bias, _ = _problem()
  knn = scorers.get("knn")
  with pytest.raises(ValueError, match="k_max must be at least k = 5, got 4"):
    knn.fit(train, labels, kernel, bias, k=5, k_max=4)
  assert knn.fit(train, labels, kernel, bias, k=5, k_max=10 * N).k_max == N


# ---- NNGuide -----------------------------------------------------------------


def _nnguide_reference(train, kernel, bias, test, k):
  normalise = lambda x: x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
  bank = normalise(train.astype(np.float64)) * _energy(_logits(train, kernel, bias))[:, None]
  sims = normalise(test.astype(np.float64)) @ bank.T
  guidance = np.sort(sims, axis=1)[:, -k:].mean(axis=1)
  return _energy(_logits(test, kernel, bias)) * guidance


@pytest.mark.parametrize("k", [1, 10, 37])
def test_nnguide_matches_numpy(k):
  train, labels, kernel, bias, test = _big_problem()
  got, state = _fit_score_big("nnguide", k=k)
  assert state.size == BIG_N and state.bank.shape[0] == 1
  _close(got, _nnguide_reference(train, kernel, bias, test, k), rtol=2e-5)


@pytest.mark.parametrize("block_rows", [16, 64, 149])
def test_nnguide_blocks_give_the_same_scores(block_rows):
  train, labels, kernel, bias, test = _big_problem()
  got, state = _fit_score_big("nnguide", k=20, block_rows=block_rows)
  assert state.bank.shape[0] == -(-BIG_N // block_rows)
  _close(got, _nnguide_reference(train, kernel, bias, test, 20), rtol=2e-5)


@pytest.mark.parametrize("block_rows", [None, 32])
def test_nnguide_states_at_several_k_stack_under_vmap(block_rows):
  train, labels, kernel, bias, test = _big_problem()
  blocks = {} if block_rows is None else {"block_rows": block_rows}
  ks = (1, 4, 9)
  states = [scorers.get("nnguide").fit(train, labels, kernel, bias, k=k, k_max=9, **blocks)
            for k in ks]
  assert {s.k_max for s in states} == {9}
  stacked = jax.tree.map(lambda *xs: np.stack(xs), *states)
  got = np.asarray(jax.vmap(scorers.get("nnguide").score, in_axes=(0, None))(stacked, test))
  for row, k in zip(got, ks):
    _close(row, _nnguide_reference(train, kernel, bias, test, k), rtol=2e-5)
  assert scorers.get("nnguide").fit(train, labels, kernel, bias, k=3,
                                    k_max=10 * BIG_N).k_max == BIG_N


def test_nnguide_bank_is_the_seeded_hash_subset_however_the_data_arrive():
  train, labels, kernel, bias, test = _big_problem()
  keys = _row_subset.row_keys(train, 7)  # The hash itself: tests/test_row_subset.py.
  kept = train[np.sort(np.argsort(keys)[:40])]
  hp = dict(k=5, bank_size=40, seed=7)
  whole = scorers.get("nnguide").fit(train, labels, kernel, bias, **hp)
  assert whole.size == 40
  _close(np.asarray(scorers.get("nnguide").score(whole, test)),
         _nnguide_reference(kept, kernel, bias, test, 5), rtol=2e-5)
  # Streamed in another order, or merged from parts: the same bank.
  order = np.random.default_rng(1).permutation(BIG_N)
  batches = [(train[order[a:a + 17]], labels[order[a:a + 17]]) for a in range(0, BIG_N, 17)]
  streamed = scorers.get("nnguide").fit_from_batches(batches, kernel, bias, **hp)
  merged = fold_lib.fit_parts(scorers.get("nnguide").fold, [batches[:3], batches[3:]],
                              kernel, bias, **hp)
  chex.assert_trees_all_equal(streamed, whole)
  chex.assert_trees_all_equal(merged, whole)
  other = scorers.get("nnguide").fit(train, labels, kernel, bias, **{**hp, "seed": 8})
  assert not np.array_equal(np.asarray(other.bank), np.asarray(whole.bank))


def test_nnguide_accumulator_stays_within_the_bank_size():
  train, labels, kernel, bias, _ = _big_problem()
  fold = scorers.get("nnguide").fold
  acc = fold.init(kernel, bias, bank_size=30)
  for start in range(0, BIG_N, 25):
    acc = fold.update(acc, train[start:start + 25], None)
    assert acc.rows.shape[0] <= 30 and np.all(np.diff(acc.keys.astype(np.float64)) >= 0)


# ---- ViM ---------------------------------------------------------------------


def test_vim_matches_numpy_as_the_official_code_computes_it():
  train, labels, kernel, bias, test = _problem()
  w = kernel.T.astype(np.float64)  # PyTorch layout
  origin = -np.linalg.pinv(w) @ bias
  centred = train - origin
  values, vectors = np.linalg.eig(centred.T @ centred / N)
  null = vectors.real[:, np.argsort(-values.real)[6:]]
  residual = lambda x: np.linalg.norm((x - origin) @ null, axis=-1)
  alpha = _logits(train, kernel, bias).max(axis=1).mean() / residual(train).mean()
  want = _energy(_logits(test, kernel, bias)) - alpha * residual(test)
  scores, state = _fit_score("vim", dim=6)
  np.testing.assert_allclose(float(state.alpha), alpha, rtol=1e-5)
  np.testing.assert_allclose(scores, want, rtol=1e-4, atol=1e-4)


def test_vim_dim_at_or_above_the_feature_count_is_refused():
  train, labels, kernel, bias, _ = _problem()
  for dim in (M, 512):
    with pytest.raises(ValueError, match=f"dim={dim} must be below the feature count {M}"):
      scorers.get("vim").fit(train, labels, kernel, bias, dim=dim)


@pytest.mark.parametrize("width, want", [(4096, 1000), (2048, 1000), (2047, 512), (768, 512),
                                         (767, 383), (342, 171), (128, 64), (2, 1)])
def test_vim_default_dim_follows_the_official_rule(width, want):
  assert _vim.default_dim(width) == want


def test_vim_default_dim_resolves_on_the_head():
  _, state = _fit_score("vim")  # dim=None
  chex.assert_shape(state.residual, (M, M - M // 2))


# ---- SHE ---------------------------------------------------------------------


def _she_reference(train, labels, kernel, bias, test):
  pred = _logits(train, kernel, bias).argmax(axis=1)
  patterns = np.zeros((C, M))
  for c in range(C):
    kept = (labels == c) & (pred == c)
    if kept.any():
      patterns[c] = train[kept].astype(np.float64).mean(axis=0)
  test_pred = _logits(test, kernel, bias).argmax(axis=1)
  return np.sum(test * patterns[test_pred], axis=1), patterns


def test_she_matches_numpy():
  train, labels, kernel, bias, test = _big_problem()
  want, patterns = _she_reference(train, labels, kernel, bias, test)
  got, state = _fit_score_big("she")
  np.testing.assert_allclose(np.asarray(state.patterns), patterns, rtol=1e-6, atol=1e-6)
  _close(got, want)


def test_she_gives_a_class_without_correct_samples_a_zero_pattern():
  train, labels, kernel, bias, test = _big_problem()
  bias = bias.copy()
  bias[2] = -50.0  # nothing is predicted as class 2
  got, state = _fit_score_big("she", (train, labels, kernel, bias, test))
  assert int(state.patterns_count[2]) == 0 and not np.any(np.asarray(state.patterns[2]))
  _close(got, _she_reference(train, labels, kernel, bias, test)[0])


# ---- fDBD --------------------------------------------------------------------


def _fdbd_reference(train, kernel, bias, test, centred=True):
  z = _logits(test, kernel, bias)
  pred = z.argmax(axis=1)
  w = kernel.T.astype(np.float64)
  total = np.zeros(len(test))
  for i, p in enumerate(pred):
    for c in range(C):
      if c != p:
        total[i] += abs(z[i, p] - z[i, c]) / np.linalg.norm(w[p] - w[c])
  mean = train.astype(np.float64).mean(axis=0) if centred else 0.0
  return total / np.linalg.norm(test - mean, axis=1)


@pytest.mark.parametrize("centred", [True, False])
def test_fdbd_matches_numpy(centred):
  train, labels, kernel, bias, test = _big_problem()
  got, _ = _fit_score_big("fdbd", centred=centred)
  _close(got, _fdbd_reference(train, kernel, bias, test, centred))


def test_fdbd_gives_identical_classes_no_boundary():
  train, labels, kernel, bias, test = _big_problem()
  kernel = kernel.copy()
  kernel[:, 4] = kernel[:, 1]
  got, state = _fit_score_big("fdbd", (train, labels, kernel, bias, test))
  gaps = np.asarray(state.inverse_gaps)
  assert gaps[1, 4] == 0 and gaps[4, 1] == 0 and np.all(np.diag(gaps) == 0)
  assert np.isfinite(got).all()


# ---- NCI ---------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.0, 1e-4, 0.1])
def test_nci_matches_numpy(alpha):
  train, labels, kernel, bias, test = _big_problem()
  mean = train.astype(np.float64).mean(axis=0)
  w = kernel.T.astype(np.float64)[_logits(test, kernel, bias).argmax(axis=1)]
  centred = test - mean
  want = np.sum(w * centred, axis=1) / np.linalg.norm(centred, axis=1)
  want += alpha * np.abs(test.astype(np.float64)).sum(axis=1)
  got, state = _fit_score_big("nci", alpha=alpha)
  _close(got, want)


@pytest.mark.parametrize("size, block_rows, shape", [
    (50_000, 32_768, (2, 25_000)),  # equal blocks, no padding
    (1_108, 500, (3, 370)),         # two zero rows at the end
    (9, 32_768, (1, 9)),
])
def test_knn_bank_blocks_are_equal_and_pad_least(size, block_rows, shape):
  rows = np.random.default_rng(3).random((size, 4)).astype(np.float32)
  bank = np.asarray(_knn.blocked(rows, block_rows))
  assert bank.shape == (*shape, 4)
  flat = bank.reshape(-1, 4)
  np.testing.assert_array_equal(flat[:size], rows)
  assert not flat[size:].any()


def test_knn_one_batch_fit_keeps_the_normalised_rows_without_a_copy():
  # The bank of a one-batch CPU fit is the normalising computation's own
  # buffer: update keeps a view of it, finalize hands it to the device as is.
  train, labels, kernel, bias, _ = _problem()
  acc = _knn.update(_knn.init(kernel, bias, k=3), jnp.asarray(train), None)
  state = _knn.finalize(acc)
  if jax.default_backend() == "cpu":  # XLA:CPU buffers are 64-byte aligned
    assert state.bank.unsafe_buffer_pointer() == acc.rows.ctypes.data
  np.testing.assert_array_equal(np.asarray(state.bank)[0], acc.rows)
