"""OOD detection metrics: FPR at 95 % TPR, AUROC, AUPR-In, AUPR-Out.

In-distribution (ID) samples are the positives and higher scores mean more
in-distribution, the one convention of line_jax. Computed in float64 NumPy on
the host: they run once per evaluation, and exact tie handling matters more
than speed here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from line_jax import _scoring


def _scores(name: str, x) -> np.ndarray:
  x = np.asarray(x, dtype=np.float64)
  if x.ndim != 1:
    raise ValueError(f"{name} must be 1-D [samples], got shape {x.shape}")
  if x.size == 0:
    raise ValueError(f"{name} is empty")
  bad = np.flatnonzero(~np.isfinite(x))
  if bad.size:
    raise ValueError(f"{name} contains NaN or Inf at {_scoring.named_rows(bad, x.size)}; "
                     "a scorer gives NaN to a feature row holding NaN or Inf")
  return x


def fpr_at_95_tpr(score_id, score_ood) -> float:
  """Fraction of OOD scores at or above the threshold that keeps 95 % of ID.

  The threshold is the largest value t with at least 95 % of ID scores >= t,
  i.e. the ceil(0.95 n)-th largest ID score.
  """
  score_id = np.sort(_scores("score_id", score_id))
  score_ood = _scores("score_ood", score_ood)
  keep = -(-95 * score_id.size // 100)  # ceil(0.95 n) in exact integers
  threshold = score_id[score_id.size - keep]
  return float(np.mean(score_ood >= threshold))


def auroc(score_id, score_ood) -> float:
  """Area under the ROC curve: P(id > ood) + P(id == ood) / 2."""
  score_id = _scores("score_id", score_id)
  score_ood = _scores("score_ood", score_ood)
  both = np.concatenate([score_id, score_ood])
  _, inverse, counts = np.unique(both, return_inverse=True, return_counts=True)
  # Average 1-based rank of each distinct value: ties share their mean rank.
  upper = np.cumsum(counts)
  mean_rank = upper - (counts - 1) / 2.0
  rank_sum_id = np.sum(mean_rank[inverse[: score_id.size]])
  n_id, n_ood = score_id.size, score_ood.size
  return float((rank_sum_id - n_id * (n_id + 1) / 2.0) / (n_id * n_ood))


def average_precision(score_pos, score_neg) -> float:
  """Area under the precision-recall curve as a step sum (no interpolation).

  `sum_k (R_k - R_{k-1}) P_k` over distinct thresholds, as scikit-learn's
  `average_precision_score`; positives are `score_pos`, higher = positive.
  """
  score_pos = _scores("positive scores", score_pos)
  score_neg = _scores("negative scores", score_neg)
  scores = np.concatenate([score_pos, score_neg])
  positive = np.concatenate([np.ones(score_pos.size), np.zeros(score_neg.size)])
  order = np.argsort(-scores, kind="stable")
  scores, positive = scores[order], positive[order]
  # Last index of each run of equal scores: one threshold per distinct value.
  last = np.flatnonzero(np.diff(scores, append=-np.inf))
  tp = np.cumsum(positive)[last]
  precision = tp / (last + 1)
  recall = tp / score_pos.size
  return float(np.sum(np.diff(recall, prepend=0.0) * precision))


# What `ood_metrics` returns, in this order.
NAMES = ("fpr95", "auroc", "aupr_in", "aupr_out")


def averaged(rows: Mapping[str, Mapping[str, float]], groups: Mapping[str, Sequence[str]]
             ) -> dict[str, dict[str, float]]:
  """`rows` (OOD set -> `ood_metrics`) plus one entry per group: the plain
  mean of each metric over the group's sets in `rows`; a group with none of
  them is left out.

  Args:
    rows: OOD set -> metrics.
    groups: entry name ("average", "near", ...) -> its set names.
  """
  out = dict(rows)
  for group, members in groups.items():
    present = [rows[name] for name in members if name in rows]
    if present:
      out[group] = {m: float(np.mean([r[m] for r in present])) for m in NAMES}
  return out


def ood_metrics(score_id, score_ood) -> dict[str, float]:
  """All four metrics (`NAMES`), as fractions in [0, 1].

  Args:
    score_id: `[n_id]` scores of in-distribution samples.
    score_ood: `[n_ood]` scores of OOD samples.

  Returns:
    `{"fpr95", "auroc", "aupr_in", "aupr_out"}`. AUPR-In takes ID as positive;
    AUPR-Out takes OOD as positive with negated scores.
  """
  score_id = _scores("score_id", score_id)
  score_ood = _scores("score_ood", score_ood)
  return {
      "fpr95": fpr_at_95_tpr(score_id, score_ood),
      "auroc": auroc(score_id, score_ood),
      "aupr_in": average_precision(score_id, score_ood),
      "aupr_out": average_precision(-score_ood, -score_id),
  }
