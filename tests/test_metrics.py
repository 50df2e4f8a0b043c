"""Metrics against scikit-learn and hand counts, ties included."""

import numpy as np
import pytest
from sklearn import metrics as skm

from line_jax import metrics


def _cases():
  rng = np.random.default_rng(0)
  yield rng.normal(1, 1, 500), rng.normal(0, 1, 300)
  # Heavy ties: scores on a coarse grid, shared between ID and OOD.
  yield np.round(rng.normal(1, 1, 400)), np.round(rng.normal(0, 1, 400))
  yield np.array([1.0, 1.0, 2.0, 3.0]), np.array([1.0, 2.0, 2.0])


@pytest.mark.parametrize("score_id,score_ood", list(_cases()))
def test_against_scikit_learn(score_id, score_ood):
  y = np.r_[np.ones(score_id.size), np.zeros(score_ood.size)]
  s = np.r_[score_id, score_ood]
  got = metrics.ood_metrics(score_id, score_ood)
  assert got["auroc"] == pytest.approx(skm.roc_auc_score(y, s), abs=1e-12)
  assert got["aupr_in"] == pytest.approx(skm.average_precision_score(y, s), abs=1e-12)
  assert got["aupr_out"] == pytest.approx(skm.average_precision_score(1 - y, -s), abs=1e-12)
  # FPR95 from sklearn's ROC: the FPR at the largest threshold reaching TPR >= 0.95.
  fpr, tpr, _ = skm.roc_curve(y, s, drop_intermediate=False)
  assert got["fpr95"] == pytest.approx(fpr[np.argmax(tpr >= 0.95)], abs=1e-12)


def test_fpr95_hand_count():
  score_id = np.arange(1, 21, dtype=float)  # 20 ID scores; keeping 19 puts the threshold at 2
  score_ood = np.array([0.5, 1.5, 2.0, 2.5, 30.0])  # 2.0, 2.5, 30 are at or above it
  assert metrics.fpr_at_95_tpr(score_id, score_ood) == pytest.approx(3 / 5)


def test_auroc_counts_ties_as_half():
  assert metrics.auroc([1.0, 2.0], [1.0, 0.0]) == pytest.approx((1 + 1 + 0.5 + 1) / 4)


def test_perfect_and_inverted_separation():
  good = metrics.ood_metrics([2.0, 3.0], [0.0, 1.0])
  assert good == {"fpr95": 0.0, "auroc": 1.0, "aupr_in": 1.0, "aupr_out": 1.0}
  assert metrics.ood_metrics([0.0, 1.0], [2.0, 3.0])["fpr95"] == 1.0


@pytest.mark.parametrize("bad,message", [
    ([], "score_id is empty"), ([np.nan], "score_id contains NaN"), ([[1.0]], "score_id must be 1-D")])
def test_bad_scores(bad, message):
  with pytest.raises(ValueError, match=message):
    metrics.ood_metrics(bad, [1.0])
