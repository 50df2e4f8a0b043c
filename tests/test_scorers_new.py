"""GEN, entropy, KL matching, RMDS, SHE, NNGuide, fDBD, NCI and DICE + ReAct.

Each against an independent float64 NumPy computation written from its paper
(and official code, where they differ), plus sign checks on an ID-like /
OOD-like toy, layouts, streaming details and hyperparameter errors.
"""

import hashlib

import chex
import jax
import numpy as np
import pytest

from line_jax import fold as fold_lib
from line_jax import scorers
from line_jax.runs import tune

pytestmark = pytest.mark.filterwarnings("error")

NEW = ("gen", "entropy", "klm", "rmds", "she", "nnguide", "fdbd", "nci", "react_dice")
N, M, C, B = 150, 12, 5, 24


def _problem(seed=0, scale=1.0):
  rng = np.random.default_rng(seed)
  train = np.abs(rng.normal(size=(N, M))).astype(np.float32)
  labels = np.arange(N) % C
  train += np.eye(C, M, dtype=np.float32)[labels] * 2  # class structure
  kernel = (rng.normal(size=(M, C)) * scale).astype(np.float32)
  bias = rng.normal(size=(C,)).astype(np.float32)
  test = np.abs(rng.normal(size=(B, M))).astype(np.float32) * 1.5
  return train, labels, kernel, bias, test


def _fit_score(name, problem=None, **hparams):
  train, labels, kernel, bias, test = problem or _problem()
  scorer = scorers.get(name)
  state = scorer.fit(train, labels, kernel, bias, **hparams)
  return np.asarray(scorer.score(state, test), np.float64), state


# ---- Independent float64 references ---------------------------------------


def _logits(h, kernel, bias):
  return h.astype(np.float64) @ kernel.astype(np.float64) + bias.astype(np.float64)


def _softmax(z):
  e = np.exp(z - z.max(axis=1, keepdims=True))
  return e / e.sum(axis=1, keepdims=True)


def _energy(z):
  top = z.max(axis=1)
  return top + np.log(np.exp(z - top[:, None]).sum(axis=1))


def _close(got, want, rtol=1e-5):
  scale = max(1.0, float(np.max(np.abs(want))))
  np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale)


def test_registered_with_the_papers_defaults():
  for name in NEW:
    scorer = scorers.get(name)
    assert scorer.name == name and name in scorers.names()
    assert isinstance(scorer.score_fn, type(jax.jit(lambda x: x)))
  defaults = {name: dict(scorers.get(name).defaults) for name in NEW}
  assert defaults["gen"] == {"gamma": 0.1, "m": 100}
  assert defaults["nnguide"] == {"k": 10, "bank_size": 12_811, "seed": 0, "block_rows": 32768,
                                 "k_max": None}
  assert defaults["fdbd"] == {"centred": True}
  assert defaults["nci"] == {"alpha": 1e-4}
  assert defaults["react_dice"] == {"p": 15.0, "percentile": 90.0}
  for name in ("entropy", "klm", "rmds", "she"):
    assert defaults[name] == {}
  assert scorers.get("rmds").fold.needs_labels and scorers.get("she").fold.needs_labels
  assert not scorers.get("gen").fold.reads_data and not scorers.get("entropy").fold.reads_data
  assert scorers.get("react_dice").fold.passes == 2
  # Every grid is in tune's, next to its method.
  for name in ("gen", "nnguide", "fdbd", "nci", "react_dice"):
    assert tune.GRIDS[name] == dict(scorers.get(name).grid)


# ---- GEN and entropy --------------------------------------------------------


def _gen_reference(z, gamma, m):
  e = np.exp(z - z.max(axis=1, keepdims=True))
  # 1 - p_j as the sum of the other classes' shares: exact where p_j ~ 1.
  others = np.where(np.eye(z.shape[1], dtype=bool)[None], 0.0, e[:, None, :]).sum(axis=2)
  p, q = e / e.sum(axis=1, keepdims=True), others / e.sum(axis=1, keepdims=True)
  order = np.argsort(p, axis=1)[:, -m:]
  p, q = np.take_along_axis(p, order, axis=1), np.take_along_axis(q, order, axis=1)
  return -np.sum(p ** gamma * q ** gamma, axis=1)


@pytest.mark.parametrize("gamma, m", [(0.1, 100), (0.1, 3), (0.5, 1), (2.0, 4), (1.0, 5)])
def test_gen_matches_numpy(gamma, m):
  train, labels, kernel, bias, test = _problem()
  want = _gen_reference(_logits(test, kernel, bias), gamma, min(m, C))
  got, state = _fit_score("gen", gamma=gamma, m=m)
  assert int(state.m) == min(m, C) and float(state.gamma) == np.float32(gamma)
  _close(got, want)


def test_gen_keeps_the_top_term_of_confident_samples():
  # Logit gaps of ~20: 1 - p of the top class is ~1e-9, which float32 `1 - p`
  # rounds to 0 (term 0); its exact term is (1e-9)^0.1 ~ 0.13.
  problem = _problem(scale=12.0)
  train, labels, kernel, bias, test = problem
  z = _logits(test, kernel, bias)
  p = _softmax(z)
  assert np.any(1.0 - p.max(axis=1) < 1e-8)
  got, _ = _fit_score("gen", problem)
  _close(got, _gen_reference(z, 0.1, C))


def test_gen_counts_ties_at_the_mth_probability():
  kernel = np.zeros((M, C), np.float32)
  bias = np.array([3.0, 1.0, 1.0, 1.0, -2.0], np.float32)  # three-way tie
  test = np.ones((2, M), np.float32)
  want = _gen_reference(_logits(test, kernel, bias), 0.3, 2)
  state = scorers.get("gen").fit(test, None, kernel, bias, gamma=0.3, m=2)
  _close(np.asarray(scorers.get("gen").score(state, test)), want)


def test_entropy_matches_numpy():
  train, labels, kernel, bias, test = _problem()
  p = _softmax(_logits(test, kernel, bias))
  got, _ = _fit_score("entropy")
  _close(got, np.sum(p * np.log(p), axis=1))


def test_gen_at_gamma_one_with_every_class_is_a_quadratic_entropy():
  train, labels, kernel, bias, test = _problem()
  p = _softmax(_logits(test, kernel, bias))
  got, _ = _fit_score("gen", gamma=1.0, m=C)
  _close(got, -(1.0 - np.sum(p * p, axis=1)))  # sum p (1 - p) = 1 - sum p^2


# ---- KL matching -------------------------------------------------------------


def _klm_reference(train, kernel, bias, test):
  p_train = _softmax(_logits(train, kernel, bias))
  pred = p_train.argmax(axis=1)
  templates = [p_train[pred == k].mean(axis=0) for k in range(C) if np.any(pred == k)]
  p = _softmax(_logits(test, kernel, bias))
  kl = np.array([[np.sum(np.where(q != 0, q * np.log(q / d), 0.0)) for d in templates]
                 for q in p])
  return -kl.min(axis=1)


def test_klm_matches_numpy():
  train, labels, kernel, bias, test = _problem()
  got, state = _fit_score("klm")
  _close(got, _klm_reference(train, kernel, bias, test), rtol=2e-5)


def test_klm_leaves_out_classes_nothing_is_predicted_as():
  train, labels, kernel, bias, test = _problem()
  bias = bias.copy()
  bias[3] = -50.0  # class 3 never wins
  got, state = _fit_score("klm", (train, labels, kernel, bias, test))
  assert np.isneginf(np.asarray(state.offsets)[3]) and np.isfinite(got).all()
  _close(got, _klm_reference(train, kernel, bias, test), rtol=2e-5)


# ---- RMDS --------------------------------------------------------------------


def test_rmds_matches_numpy():
  train, labels, kernel, bias, test = _problem()
  x = train.astype(np.float64)
  means = np.stack([x[labels == c].mean(axis=0) for c in range(C)])
  within = x - means[labels]
  precision = np.linalg.pinv(within.T @ within / N)
  mean0 = x.mean(axis=0)
  precision0 = np.linalg.pinv((x - mean0).T @ (x - mean0) / N)
  diff = test[:, None, :] - means[None]
  md = np.einsum("bcm,mn,bcn->bc", diff, precision, diff)
  md0 = np.einsum("bm,mn,bn->b", test - mean0, precision0, test - mean0)
  got, state = _fit_score("rmds")
  _close(got, -(md - md0[:, None]).min(axis=1), rtol=1e-4)
  np.testing.assert_allclose(np.asarray(state.background_mean), mean0, rtol=1e-6)


def test_rmds_is_mahalanobis_plus_the_background_distance():
  train, labels, kernel, bias, test = _problem()
  got, state = _fit_score("rmds")
  maha, _ = _fit_score("mahalanobis")
  x = test - np.asarray(state.background_mean, np.float64)
  _close(got - maha, np.einsum("bm,mn,bn->b", x, np.asarray(state.background_precision), x),
         rtol=1e-4)


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
  train, labels, kernel, bias, test = _problem()
  want, patterns = _she_reference(train, labels, kernel, bias, test)
  got, state = _fit_score("she")
  np.testing.assert_allclose(np.asarray(state.patterns), patterns, rtol=1e-6, atol=1e-6)
  _close(got, want)


def test_she_gives_a_class_without_correct_samples_a_zero_pattern():
  train, labels, kernel, bias, test = _problem()
  bias = bias.copy()
  bias[2] = -50.0  # nothing is predicted as class 2
  got, state = _fit_score("she", (train, labels, kernel, bias, test))
  assert int(state.patterns_count[2]) == 0 and not np.any(np.asarray(state.patterns[2]))
  _close(got, _she_reference(train, labels, kernel, bias, test)[0])


# ---- NNGuide -----------------------------------------------------------------


def _nnguide_reference(train, kernel, bias, test, k):
  normalise = lambda x: x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
  bank = normalise(train.astype(np.float64)) * _energy(_logits(train, kernel, bias))[:, None]
  sims = normalise(test.astype(np.float64)) @ bank.T
  guidance = np.sort(sims, axis=1)[:, -k:].mean(axis=1)
  return _energy(_logits(test, kernel, bias)) * guidance


@pytest.mark.parametrize("k", [1, 10, 37])
def test_nnguide_matches_numpy(k):
  train, labels, kernel, bias, test = _problem()
  got, state = _fit_score("nnguide", k=k)
  assert state.size == N and state.bank.shape[0] == 1
  _close(got, _nnguide_reference(train, kernel, bias, test, k), rtol=2e-5)


@pytest.mark.parametrize("block_rows", [16, 64, 149])
def test_nnguide_blocks_give_the_same_scores(block_rows):
  train, labels, kernel, bias, test = _problem()
  got, state = _fit_score("nnguide", k=20, block_rows=block_rows)
  assert state.bank.shape[0] == -(-N // block_rows)
  _close(got, _nnguide_reference(train, kernel, bias, test, 20), rtol=2e-5)


@pytest.mark.parametrize("block_rows", [None, 32])
def test_nnguide_states_at_several_k_stack_under_vmap(block_rows):
  train, labels, kernel, bias, test = _problem()
  blocks = {} if block_rows is None else {"block_rows": block_rows}
  ks = (1, 4, 9)
  states = [scorers.get("nnguide").fit(train, labels, kernel, bias, k=k, k_max=9, **blocks)
            for k in ks]
  assert {s.k_max for s in states} == {9}
  stacked = jax.tree.map(lambda *xs: np.stack(xs), *states)
  got = np.asarray(jax.vmap(scorers.get("nnguide").score, in_axes=(0, None))(stacked, test))
  for row, k in zip(got, ks):
    _close(row, _nnguide_reference(train, kernel, bias, test, k), rtol=2e-5)
  assert scorers.get("nnguide").fit(train, labels, kernel, bias, k=3, k_max=10 * N).k_max == N


def test_nnguide_bank_is_the_seeded_hash_subset_however_the_data_arrive():
  train, labels, kernel, bias, test = _problem()
  keys = np.array([int.from_bytes(hashlib.blake2b(row.tobytes(), digest_size=8,
                                                  salt=(7).to_bytes(16, "little")).digest(),
                                  "little") for row in train], dtype=np.uint64)
  kept = train[np.sort(np.argsort(keys)[:40])]
  hp = dict(k=5, bank_size=40, seed=7)
  whole = scorers.get("nnguide").fit(train, labels, kernel, bias, **hp)
  assert whole.size == 40
  _close(np.asarray(scorers.get("nnguide").score(whole, test)),
         _nnguide_reference(kept, kernel, bias, test, 5), rtol=2e-5)
  # Streamed in another order, or merged from parts: the same bank.
  order = np.random.default_rng(1).permutation(N)
  batches = [(train[order[a:a + 17]], labels[order[a:a + 17]]) for a in range(0, N, 17)]
  streamed = scorers.get("nnguide").fit_from_batches(batches, kernel, bias, **hp)
  merged = fold_lib.fit_parts(scorers.get("nnguide").fold, [batches[:3], batches[3:]],
                              kernel, bias, **hp)
  chex.assert_trees_all_equal(streamed, whole)
  chex.assert_trees_all_equal(merged, whole)
  other = scorers.get("nnguide").fit(train, labels, kernel, bias, **{**hp, "seed": 8})
  assert not np.array_equal(np.asarray(other.bank), np.asarray(whole.bank))


def test_nnguide_accumulator_stays_within_the_bank_size():
  train, labels, kernel, bias, _ = _problem()
  fold = scorers.get("nnguide").fold
  acc = fold.init(kernel, bias, bank_size=30)
  for start in range(0, N, 25):
    acc = fold.update(acc, train[start:start + 25], None)
    assert acc.rows.shape[0] <= 30 and np.all(np.diff(acc.keys.astype(np.float64)) >= 0)


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
  train, labels, kernel, bias, test = _problem()
  got, _ = _fit_score("fdbd", centred=centred)
  _close(got, _fdbd_reference(train, kernel, bias, test, centred))


def test_fdbd_gives_identical_classes_no_boundary():
  train, labels, kernel, bias, test = _problem()
  kernel = kernel.copy()
  kernel[:, 4] = kernel[:, 1]
  got, state = _fit_score("fdbd", (train, labels, kernel, bias, test))
  gaps = np.asarray(state.inverse_gaps)
  assert gaps[1, 4] == 0 and gaps[4, 1] == 0 and np.all(np.diag(gaps) == 0)
  assert np.isfinite(got).all()


# ---- NCI ---------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.0, 1e-4, 0.1])
def test_nci_matches_numpy(alpha):
  train, labels, kernel, bias, test = _problem()
  mean = train.astype(np.float64).mean(axis=0)
  w = kernel.T.astype(np.float64)[_logits(test, kernel, bias).argmax(axis=1)]
  centred = test - mean
  want = np.sum(w * centred, axis=1) / np.linalg.norm(centred, axis=1)
  want += alpha * np.abs(test.astype(np.float64)).sum(axis=1)
  got, state = _fit_score("nci", alpha=alpha)
  _close(got, want)


# ---- DICE + ReAct ------------------------------------------------------------


@pytest.mark.parametrize("p, percentile", [(15.0, 90.0), (60.0, 75.0), (0.0, 50.0)])
def test_react_dice_matches_numpy(p, percentile):
  train, labels, kernel, bias, test = _problem()
  contrib = train.astype(np.float64).mean(axis=0)[:, None] * kernel  # unclipped mean
  mask = contrib > np.percentile(contrib, p)
  threshold = np.percentile(train.ravel().astype(np.float64), percentile)
  got, state = _fit_score("react_dice", p=p, percentile=percentile)
  assert float(state.threshold) == np.float32(threshold)
  np.testing.assert_array_equal(np.asarray(state.kernel) != 0, mask)
  _close(got, _energy(_logits(np.minimum(test, threshold), kernel * mask, bias)))
  assert np.any(test > threshold)


def test_react_dice_without_clipping_is_dice_and_streams_exactly():
  train, labels, kernel, bias, test = _problem()
  both, _ = _fit_score("react_dice", p=40.0, percentile=100.0)
  dice, _ = _fit_score("dice", p=40.0)
  np.testing.assert_allclose(both, dice, rtol=1e-6)
  batches = [(train[a:a + 31], None) for a in range(0, N, 31)]
  streamed = scorers.get("react_dice").fit_from_batches(batches, kernel, bias)
  whole = scorers.get("react_dice").fit(train, labels, kernel, bias)
  chex.assert_trees_all_equal(streamed.threshold, whole.threshold)
  chex.assert_trees_all_equal(streamed.weight != 0, whole.weight != 0)
  with pytest.raises(TypeError, match="re-iterable"):
    scorers.get("react_dice").fit_from_batches(iter(batches), kernel, bias)


# ---- Every new scorer ----------------------------------------------------------


def _toy(seed=0):
  """ID: a block of strong units per class, the head aligned with it; OOD: flat noise."""
  rng = np.random.default_rng(seed)
  n, m, c = 400, 16, 4
  labels = np.arange(n) % c
  blocks = np.repeat(np.eye(c), m // c, axis=1)  # [classes, features]
  prototypes = 3.0 * blocks
  train = (prototypes[labels] + rng.uniform(0, 1, (n, m))).astype(np.float32)
  kernel = (blocks.T + 0.05 * rng.normal(size=(m, c))).astype(np.float32)
  bias = np.zeros(c, np.float32)
  test_id = (prototypes[np.arange(200) % c] + rng.uniform(0, 1, (200, m))).astype(np.float32)
  test_ood = rng.uniform(0, 2, (200, m)).astype(np.float32)
  return train, labels, kernel, bias, test_id, test_ood


@pytest.mark.parametrize("name", NEW)
def test_in_distribution_scores_higher(name):
  train, labels, kernel, bias, test_id, test_ood = _toy()
  scorer = scorers.get(name)
  state = scorer.fit(train, labels, kernel, bias)
  id_scores = np.asarray(scorer.score(state, test_id))
  ood_scores = np.asarray(scorer.score(state, test_ood))
  # AUROC: the share of (ID, OOD) pairs ranked the right way.
  auroc = np.mean(id_scores[:, None] > ood_scores[None, :])
  assert auroc > 0.95, (name, auroc)


BAD = [
    ("gen", {"gamma": 0.0}, ValueError, "gamma must be a positive finite number"),
    ("gen", {"gamma": "0.1"}, TypeError, "gamma must be a real number"),
    ("gen", {"m": 0}, ValueError, "m must be at least 1"),
    ("gen", {"m": 2.5}, TypeError, "m must be an integer"),
    ("nnguide", {"k": 0}, ValueError, "k must be at least 1"),
    ("nnguide", {"k": N + 1}, ValueError, f"k = {N + 1} needs at least {N + 1} bank rows"),
    ("nnguide", {"k": 5, "bank_size": 4}, ValueError, "k = 5 needs at least 5 bank rows"),
    ("nnguide", {"bank_size": 0}, ValueError, "bank_size must be at least 1"),
    ("nnguide", {"seed": -1}, ValueError, "seed must be at least 0"),
    ("nnguide", {"block_rows": 1.5}, TypeError, "block_rows must be an integer"),
    ("nnguide", {"k": 5, "k_max": 4}, ValueError, "k_max must be at least k = 5, got 4"),
    ("fdbd", {"centred": "yes"}, TypeError, "centred must be True or False"),
    ("nci", {"alpha": -1e-3}, ValueError, "alpha must be a non-negative finite number"),
    ("nci", {"alpha": float("nan")}, ValueError, "alpha must be a non-negative finite number"),
    ("nci", {"alpha": None}, TypeError, "alpha must be a real number"),
    ("react_dice", {"p": 101}, ValueError, "p must be a percentile in \\[0, 100\\]"),
    ("react_dice", {"percentile": -1}, ValueError,
     "percentile must be a percentile in \\[0, 100\\]"),
]


@pytest.mark.parametrize("name, hparams, error, message", BAD)
def test_bad_hyperparameters(name, hparams, error, message):
  train, labels, kernel, bias, _ = _problem()
  scorer = scorers.get(name)
  with pytest.raises(error, match=message):
    scorer.fit(train, labels, kernel, bias, **hparams)
  with pytest.raises(error, match=message):
    scorer.fit_from_batches([(train, labels)], kernel, bias, **hparams)


def test_unknown_hyperparameter_names_the_valid_ones():
  train, labels, kernel, bias, _ = _problem()
  with pytest.raises(ValueError, match="valid: gamma, m$"):
    scorers.get("gen").fit(train, labels, kernel, bias, M=10)


def test_rmds_needs_labels_and_every_class():
  train, labels, kernel, bias, _ = _problem()
  with pytest.raises(ValueError, match="labels are required"):
    scorers.get("rmds").fit(train, None, kernel, bias)
  with pytest.raises(ValueError, match="have no training sample: 4"):
    scorers.get("rmds").fit(train, labels % 4, kernel, bias)
  with pytest.raises(ValueError, match="labels are required"):
    scorers.get("she").fit(train, None, kernel, bias)


def test_grids_tune_through_the_registry():
  train, labels, kernel, bias, test_id, test_ood = _toy()
  result = tune.tune_method("nci", train, labels, kernel, bias, test_id[:50], test_ood[:50])
  assert result["grid_size"] == 4 and result["metrics"]["auroc"] > 0.95
