"""The scorer registry and what every scorer shares.

Registry names and the papers' defaults; finite float32 batch scores from
every scorer; in-distribution samples scored above out-of-distribution ones on
a toy; bad hyperparameter values, unknown hyperparameter names, and scorers
that need labels and every class; the tuning grids through the registry; the
equivalences between methods (ReAct at percentile 100 and LINe with every part
off are Energy, DICE at p = 0 drops one weight, ASH-P at percentile 0 is
Energy, ASH-S and SCALE at 0 scale by e); the exact selections under the
scorers (top_k_mask, top_k_sum, kth_largest); and the streamed percentile
behind TrainPercentile. Each detector against its own reference is in
test_scorers_logits.py and test_scorers_features.py.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _scorer_references import B
from _scorer_references import BIG_N
from _scorer_references import _big_problem
from _scorer_references import _energy
from _scorer_references import _fit_score
from _scorer_references import _logits
from _scorer_references import _problem
from _scorer_references import _top_k_mask
from conftest import random_problem
from line_jax import scorers
from line_jax.runs import tune
from line_jax.scorers import _quantile
from line_jax.scorers import _select
from line_jax.scorers import _shaping

pytestmark = pytest.mark.filterwarnings("error")

EXPECTED = (
    "msp", "maxlogit", "energy", "react", "dice", "ash_p", "ash_b", "ash_s",
    "scale", "mahalanobis", "knn", "vim", "gradnorm", "line",
    "gen", "entropy", "klm", "rmds", "she", "nnguide", "fdbd", "nci", "react_dice",
    "temp_scaling", "vra", "residual", "mcm", "pnml", "neco", "lts", "caref", "cadref", "optfs",
    "relation", "cfood", "openmax", "weiper",
)
# The nine scorers registered after the first fourteen.
NEW = ("gen", "entropy", "klm", "rmds", "she", "nnguide", "fdbd", "nci", "react_dice")
# Issue 24's (their own tests: tests/test_scorer_<name>.py).
ISSUE_24 = EXPECTED[EXPECTED.index("temp_scaling"):]


def test_issue_24s_scorers_with_the_official_defaults():
  defaults = {name: dict(scorers.get(name).defaults) for name in ISSUE_24}
  assert defaults["mcm"] == {"tau": 1.0}
  assert defaults["vra"] == {"percentile_high": 90.0, "percentile_low": 10.0}
  assert defaults["residual"] == {"dim": None}  # ViM's rule
  assert defaults["neco"]["dim"] == 100
  assert defaults["lts"] == {"percentile": 95.0}
  assert defaults["cadref"] == {"logit": "energy"}
  assert defaults["optfs"] == {"percentile": 0.1, "intervals": 100, "variant": "vanilla"}
  assert defaults["relation"]["power"] == 1 and defaults["relation"]["threshold"] == 0.03
  assert defaults["cfood"]["alpha"] == 0.1 and defaults["cfood"]["k"] == 0.01
  assert defaults["openmax"] == {"tailsize": 20, "alpha": 3, "distance": "euclidean",
                                 "output": "known"}
  assert defaults["weiper"]["n_repeats"] == 100 and defaults["weiper"]["lambda_1"] == 2.5
  for name in ("temp_scaling", "pnml", "caref"):
    assert defaults[name] == {}
  assert scorers.get("temp_scaling").fold.needs_labels
  assert scorers.get("temp_scaling").fold.passes == 4 and scorers.get("optfs").fold.passes == 3
  for name in ISSUE_24:
    assert tune.GRIDS.get(name, {}) == dict(scorers.get(name).grid)


# ---- The registry ------------------------------------------------------------


def test_registry_names_are_canonical_and_complete():
  assert scorers.names() == EXPECTED
  for name in EXPECTED:
    scorer = scorers.get(name)
    assert scorer.name == name
    assert isinstance(scorer.score_fn, type(jax.jit(lambda x: x)))  # jitted (score buckets it)


def test_registry_defaults_follow_the_papers():
  defaults = {name: dict(scorers.get(name).defaults) for name in EXPECTED}
  assert defaults["react"] == {"percentile": 90.0}
  assert defaults["dice"] == {"p": 70.0}
  assert defaults["ash_p"] == {"percentile": 60.0}
  assert defaults["ash_b"] == {"percentile": 65.0}
  assert defaults["ash_s"] == {"percentile": 90.0}
  assert defaults["scale"] == {"percentile": 85.0}
  assert defaults["knn"]["k"] is None  # One neighbour per 1,000 bank rows (50 of CIFAR's 50,000).
  assert defaults["vim"] == {"dim": None}  # The official rule on the head's width.
  # The paper's clip (0.8 on ResNet-50) is in that network's units: the
  # default is the percentile that holds on any model.
  assert defaults["line"] == {"p_w": 10.0, "p_a": 10.0, "clip": scorers.TrainPercentile(90.0)}
  for name in ("msp", "maxlogit", "energy", "mahalanobis", "gradnorm"):
    assert defaults[name] == {}


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


# ---- Every scorer ------------------------------------------------------------


@pytest.mark.parametrize("name", EXPECTED)
def test_every_scorer_returns_finite_batch_scores(name):
  scores, _ = _fit_score(name)
  chex.assert_shape(scores, (B,))
  assert scores.dtype == np.float32
  assert np.all(np.isfinite(scores))


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


# ---- Hyperparameters and labels ----------------------------------------------


BAD = [
    ("gen", {"gamma": 0.0}, ValueError, "gamma must be a positive finite number"),
    ("gen", {"gamma": "0.1"}, TypeError, "gamma must be a real number"),
    ("gen", {"m": 0}, ValueError, "m must be at least 1"),
    ("gen", {"m": 2.5}, TypeError, "m must be an integer"),
    ("nnguide", {"k": 0}, ValueError, "k must be at least 1"),
    ("nnguide", {"k": BIG_N + 1}, ValueError,
     f"k = {BIG_N + 1} needs at least {BIG_N + 1} bank rows"),
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
  train, labels, kernel, bias, _ = _big_problem()
  scorer = scorers.get(name)
  with pytest.raises(error, match=message):
    scorer.fit(train, labels, kernel, bias, **hparams)
  with pytest.raises(error, match=message):
    scorer.fit_from_batches([(train, labels)], kernel, bias, **hparams)


def test_unknown_hyperparameter_names_the_valid_ones():
  train, labels, kernel, bias, _ = _big_problem()
  with pytest.raises(ValueError, match="valid: gamma, m$"):
    scorers.get("gen").fit(train, labels, kernel, bias, M=10)


def test_rmds_needs_labels_and_every_class():
  train, labels, kernel, bias, _ = _big_problem()
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


# ---- Equivalences between methods --------------------------------------------


def test_react_at_percentile_100_is_energy():
  chex.assert_trees_all_close(_fit_score("react", percentile=100)[0], _fit_score("energy")[0])


def test_line_with_every_part_off_is_energy():
  off, _ = _fit_score("line", p_w=None, p_a=None, clip=None)
  np.testing.assert_allclose(off, _fit_score("energy")[0], rtol=1e-6, atol=1e-6)


def test_dice_at_p0_drops_only_the_smallest_contribution():
  train, labels, kernel, bias, test = _problem()
  contrib = train.astype(np.float64).mean(axis=0)[:, None] * kernel
  dropped = kernel.copy()
  dropped.flat[np.argmin(contrib)] = 0.0
  _, state = _fit_score("dice", p=0)
  np.testing.assert_array_equal(np.asarray(state.kernel), dropped)
  want = _energy(_logits(test, dropped, bias))
  np.testing.assert_allclose(_fit_score("dice", p=0)[0], want, rtol=1e-5)


def test_ash_p_at_percentile_0_is_energy():
  np.testing.assert_allclose(_fit_score("ash_p", percentile=0)[0], _fit_score("energy")[0],
                             rtol=1e-6, atol=1e-6)


def test_ash_s_and_scale_at_percentile_0_scale_every_activation_by_e():
  train, labels, kernel, bias, test = _problem()
  want = _energy(_logits(test * np.e, kernel, bias))
  np.testing.assert_allclose(_fit_score("ash_s", percentile=0)[0], want, rtol=1e-5)
  np.testing.assert_allclose(_fit_score("scale", percentile=0)[0], want, rtol=1e-5)


# ---- The exact selections under the scorers ----------------------------------


TIES = [[3.0, 1.0, 1.0, 1.0, 0.0], [2.0, 2.0, 2.0, 2.0, 2.0], [-1.0, 2.0, -1.0, 5.0, -3.0]]


# The CPU's rolled passes and the GPU's unrolled ones give the same, with
# and without the branch that skips the tie-breaking cumsum.
@pytest.mark.parametrize("branch,unroll", [(True, None), (True, True), (False, None)])
def test_top_k_mask_breaks_ties_by_lowest_index(branch, unroll):
  x = jnp.array(TIES)
  mask = np.asarray(_shaping.top_k_mask(x, 3, branch=branch, unroll=unroll))
  np.testing.assert_array_equal(mask, _top_k_mask(np.asarray(x), 3))
  np.testing.assert_array_equal(mask.sum(axis=1), [3, 3, 3])


@pytest.mark.parametrize("unroll", [None, True])
def test_top_k_sum_counts_ties_up_to_k(unroll):
  np.testing.assert_array_equal(
      np.asarray(_shaping.top_k_sum(jnp.array(TIES), 3, unroll=unroll)), [5.0, 6.0, 6.0])


def test_kth_largest_matches_numpy_on_signed_values_and_ties():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(6, 50)).astype(np.float32)
  x[:, :10] = 0.25  # ties
  x[0, 10:] = -0.0
  for k in (1, 7, 10, 11, 50):
    want = -np.sort(-x, axis=1)[:, k - 1]
    np.testing.assert_array_equal(np.asarray(_select.kth_largest(jnp.asarray(x), k)), want)
    np.testing.assert_array_equal(
        np.asarray(_select.kth_largest(jnp.asarray(x), k, unroll=True)), want)
    for by_product in (False, True):  # both ways the rolled passes count
      np.testing.assert_array_equal(np.asarray(_select.kth_largest(
          jnp.asarray(x), k, unroll=False, count_by_product=by_product)), want)


def test_rolled_passes_count_by_product_from_the_column_threshold(monkeypatch):
  """Rows at and above `COUNT_BY_PRODUCT_COLUMNS` (the columns of the passes)
  take the product, which selects what the reduction does, ties included."""
  rng = np.random.default_rng(3)
  x = np.round(rng.normal(size=(40, 30)), 1).astype(np.float32)  # many ties
  want = np.asarray(_select.kth_largest(jnp.asarray(x), 9, unroll=False,
                                        count_by_product=False))
  jaxpr = lambda rows: str(jax.make_jaxpr(
      lambda v: _select.kth_largest(v, 9, unroll=False))(jnp.asarray(x[:rows])))
  monkeypatch.setattr(_select, "COUNT_BY_PRODUCT_COLUMNS", 32)
  assert "dot_general" in jaxpr(32) and "dot_general" not in jaxpr(31)
  np.testing.assert_array_equal(np.asarray(_select.kth_largest(jnp.asarray(x), 9, unroll=False)),
                                want)
  np.testing.assert_array_equal(want, -np.sort(-x, axis=1)[:, 8])


# ---- Percentiles of the training features ------------------------------------


@pytest.mark.parametrize("p", [0.0, 12.5, 50.0, 90.0, 99.9, 100.0])
def test_streamed_percentile_is_numpy_percentile_exactly(p):
  rng = np.random.default_rng(2)
  values = [rng.normal(size=(30, 7)).astype(np.float32) for _ in range(3)]
  values[1][:, :3] = 0.0  # repeated values
  values[2][0] = np.float32(1e-30)
  want = np.percentile(np.concatenate(values).ravel().astype(np.float64), p)
  acc = _quantile.init(p)  # Two passes of the histograms over the batches.
  for x in values:
    acc = _quantile.update(acc, x)
  acc = _quantile.next_pass(acc)
  for x in values:
    acc = _quantile.update(acc, x)
  assert _quantile.value(acc) == want


@pytest.mark.parametrize("p", [12.5, 37.5, 90.0, 100.0])
def test_line_clip_as_a_training_percentile_is_resolved_exactly(p):
  features, labels, kernel, bias = random_problem(5, 16, 300, seed=4)
  line_scorer = scorers.get("line")
  batches = [(features[i:i + 64], labels[i:i + 64]) for i in range(0, 300, 64)]
  by_percentile = line_scorer.fit_from_batches(batches, kernel, bias, p_w=90, p_a=90,
                                               clip=scorers.TrainPercentile(p))
  value = float(np.percentile(features.astype(np.float64), p))
  assert float(by_percentile.clip) == np.float32(value)
  by_value = line_scorer.fit(features, labels, kernel, bias, p_w=90, p_a=90, clip=value)
  chex.assert_trees_all_equal(by_percentile, by_value)


def test_train_percentile_is_checked():
  with pytest.raises(ValueError, match="percentile"):
    scorers.TrainPercentile(101)
