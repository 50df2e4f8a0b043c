"""Deployment thresholds from held-out scores, with how sure we are of them.

    cal = calibration.at_tpr(id_scores, tpr=0.95)        # the field's FPR95 threshold
    cal = calibration.at_fpr(id_scores, ood_scores, fpr=0.05)
    is_ood = calibration.decide(scores, cal.threshold)

An input is in-distribution where its score is at least the threshold
(higher score = more ID); a NaN score (a bad input) is out. `at_tpr` keeps
the `ceil(tpr * n)` highest of `n` held-out ID scores; on fresh ID data from
the same distribution the share kept is itself uncertain, and `interval`
(Clopper-Pearson, exact) holds it with probability `confidence`. A
calibration set too small to put `MIN_TAIL` scores on the far side of the
threshold is refused: the threshold would be set by a handful of inputs.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
from scipy import stats

# Held-out scores that must fall beyond a threshold for it to be estimated:
# at a TPR of 95 % that is 200 ID inputs, at 99 % 1,000.
MIN_TAIL = 10


@dataclasses.dataclass(frozen=True)
class Calibration:
  """A threshold and what it achieved on the data it was set on.

  Attributes:
    threshold: inputs scoring at least this are in-distribution.
    target: "tpr" (share of ID inputs kept) or "fpr" (share of OOD inputs kept).
    rate: the rate asked for.
    achieved: the rate on the calibration data (ties can raise a TPR above `rate`).
    interval: `(low, high)`: where the rate on fresh data from the same
      distribution lies, with probability `confidence` (Clopper-Pearson).
    confidence: of `interval`.
    count: the scores the rate is measured on (ID for "tpr", OOD for "fpr").
    tpr: the share of ID calibration inputs kept (equal to `achieved` for "tpr").
  """

  threshold: float
  target: str
  rate: float
  achieved: float
  interval: tuple[float, float]
  confidence: float
  count: int
  tpr: float

  def to_json(self) -> dict[str, Any]:
    return {**dataclasses.asdict(self), "interval": list(self.interval)}

  @classmethod
  def from_json(cls, value: dict[str, Any]) -> "Calibration":
    return cls(**{**value, "interval": tuple(value["interval"])})

  def summary(self) -> str:
    """One line for people: the threshold, the rate, its interval."""
    low, high = self.interval
    return (f"threshold {self.threshold:.6g}: {self.target.upper()} {100 * self.achieved:.2f} % "
            f"on {self.count:,} calibration inputs (asked {100 * self.rate:g} %; "
            f"{100 * self.confidence:g} % interval for fresh data "
            f"{100 * low:.2f}-{100 * high:.2f} %)")


def decide(scores, threshold: float) -> np.ndarray:
  """`[n]` bool, True where out-of-distribution: below `threshold`, or NaN."""
  return ~(np.asarray(scores) >= threshold)


def clopper_pearson(successes: int, trials: int, confidence: float = 0.95
                    ) -> tuple[float, float]:
  """The exact binomial interval of a rate seen as `successes` of `trials`."""
  alpha = 1.0 - confidence
  low = 0.0 if successes == 0 else float(stats.beta.ppf(alpha / 2, successes,
                                                         trials - successes + 1))
  high = 1.0 if successes == trials else float(stats.beta.ppf(1 - alpha / 2, successes + 1,
                                                               trials - successes))
  return low, high


def at_tpr(id_scores, tpr: float = 0.95, *, confidence: float = 0.95) -> Calibration:
  """The threshold that keeps a share `tpr` of the held-out ID `id_scores` `[n]`.

  Raises:
    ValueError: a rate outside (0, 1), scores that are not finite (named),
      or fewer than `MIN_TAIL / (1 - tpr)` scores.
  """
  scores = _checked("id_scores", id_scores)
  _check_rate("tpr", tpr, confidence)
  n = scores.size
  kept = math.ceil(round(tpr * n, 9))
  _check_tail(n - kept, n, f"a TPR of {100 * tpr:g} %", "ID", MIN_TAIL / (1 - tpr))
  threshold = float(np.sort(scores)[::-1][kept - 1])
  passed = int(np.sum(scores >= threshold))
  return Calibration(threshold, "tpr", float(tpr), passed / n,
                     clopper_pearson(passed, n, confidence), float(confidence), n, passed / n)


def at_fpr(id_scores, ood_scores, fpr: float = 0.05, *, confidence: float = 0.95
           ) -> Calibration:
  """The lowest threshold that keeps at most a share `fpr` of validation OOD
  `ood_scores` `[m]`; `tpr` says what it keeps of the ID `id_scores` `[n]`.

  Raises:
    ValueError: as `at_tpr`; fewer than `MIN_TAIL / fpr` OOD scores.
  """
  ids = _checked("id_scores", id_scores)
  ood = _checked("ood_scores", ood_scores)
  _check_rate("fpr", fpr, confidence)
  m = ood.size
  allowed = math.floor(round(fpr * m, 9))
  _check_tail(allowed, m, f"an FPR of {100 * fpr:g} %", "OOD", MIN_TAIL / fpr)
  ranked = np.sort(ood)[::-1]
  # Just above the first OOD score past the allowance, so every tie of it is out
  # too; a float32 number, so the float32 comparison of `predict` keeps it exact.
  threshold = float(np.nextafter(np.float32(ranked[allowed]), np.float32(np.inf)))
  passed = int(np.sum(ood >= threshold))
  return Calibration(threshold, "fpr", float(fpr), passed / m,
                     clopper_pearson(passed, m, confidence), float(confidence), m,
                     float(np.mean(ids >= threshold)))


def _checked(name: str, scores) -> np.ndarray:
  scores = np.asarray(scores, np.float64)
  if scores.ndim != 1:
    raise ValueError(f"{name} must be [n] scores, got shape {scores.shape}")
  bad = np.flatnonzero(~np.isfinite(scores))
  if bad.size:
    shown = ", ".join(str(int(i)) for i in bad[:10])
    raise ValueError(f"{name} at {shown} ({bad.size} of {scores.size}) are NaN or Inf: "
                     "a threshold from them would be wrong; remove those inputs")
  return scores


def _check_rate(name: str, rate: float, confidence: float) -> None:
  for what, value in ((name, rate), ("confidence", confidence)):
    if not 0.0 < float(value) < 1.0:
      raise ValueError(f"{what} must lie strictly between 0 and 1, got {value}")


def _check_tail(tail: int, n: int, asked: str, kind: str, need: float) -> None:
  if tail < MIN_TAIL:
    raise ValueError(
        f"{n:,} {kind} calibration inputs are too few for {asked}: only {tail} would fall "
        f"beyond the threshold; give at least {math.ceil(need):,} (MIN_TAIL = {MIN_TAIL})")
