"""Temperature scaling: MSP at the temperature that minimises the labelled NLL.

Guo, Pleiss, Sun, Weinberger, "On Calibration of Modern Neural Networks",
ICML 2017. One temperature T for the head's logits `z`, fitted on labelled
ID data by minimising the mean negative log-likelihood

    NLL(T) = mean_i [logsumexp(z_i / T) - z_{i, y_i} / T],

then `score(x) = max_c softmax(z / T)_c`; higher = more ID. This is OpenOOD's
postprocessor (`openood/postprocessors/temp_scaling_postprocessor.py`:
LBFGS from T = 1.5, line 17, `lr=0.01, max_iter=50`, line 44, on the ID
validation set, line 21; the score, lines 70-71) and pytorch-ood's
`TemperatureScaling`. Where they stop after LBFGS's iterations, this fit
gives the minimiser itself (no hyperparameter, nothing to tune).

The fit streams in four passes over the labelled batches, memory
independent of their number. In `b = 1 / T` the NLL is convex
(`logsumexp(b z)` is convex in b), so its derivative
`sum_i (E_softmax(b z_i)[z_i] - z_{i, y_i})` rises through zero once, at
the minimiser. Each pass sums, in float64 for each of 32 candidate b, the
NLL and its first and second derivatives (the second: the softmax variance
of the logits):

1. b on a geometric grid from 1e-8 to 1e8 (T from 1e8 down to 1e-8); the
   derivative changes sign between two neighbours, a bracket;
2. to 4. 32 equally spaced b across the bracket, which shrinks 31-fold
   each pass, to under 1e-4 of b;
then the root of the cubic that matches the derivative and its slope at
both ends of the last bracket (Hermite interpolation), found by bisection.
Its error is fourth order in the bracket, `h^4 / 384` times the fourth
derivative, orders of magnitude below the float32 rounding of T that the
state keeps: the minimiser to float precision, not an iterate. `merge`
adds the sums of disjoint parts of one pass, so processes reduce exactly.

The fit needs labelled ID data (`FOLD.needs_labels`), and fits on whatever
labelled features it is given. The method means held-out validation data
(OpenOOD asserts its ID validation split): on the training set of a
network that classifies every sample correctly with a margin, the NLL
falls for ever as T shrinks: the fit stops at T = 1e-8 and warns (and at
T = 1e8 where the head is no better than chance on the labels).
"""

from __future__ import annotations

import warnings

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from line_jax import _matmul
from line_jax import fold
from line_jax import layout as layout_lib
from line_jax.scorers import _common
from line_jax.scorers import _mcm

CANDIDATES = 32  # inverse temperatures evaluated per pass
PASSES = 4
# Pass 1's inverse temperatures span these (T from 1e8 down to 1e-8).
LOWEST, HIGHEST = 1e-8, 1e8


@flax.struct.dataclass
class TempScalingState(_common.HeadState):
  """A fitted temperature-scaling scorer.

  Attributes:
    weight: `[classes, features]` float32 head weight (class-major, as
      `HeadState`; `kernel` is its transpose).
    bias: `[classes]` float32 head bias.
    temperature: float32 scalar T minimising the labelled data's NLL.
  """

  temperature: jax.Array


@flax.struct.dataclass
class TempScalingAcc:
  """The accumulator of one pass: candidates and the sums at each.

  Attributes:
    head: the `HeadState`.
    betas: `[CANDIDATES]` float64 inverse temperatures this pass evaluates.
    sums: `[3, CANDIDATES]` float64 sums over samples of the NLL and of its
      first and second derivatives in the inverse temperature.
    index: int32 scalar, the pass (0-based); data, not static, so that one
      compiled update serves every pass.
  """

  head: _common.HeadState
  betas: jax.Array
  sums: jax.Array
  index: jax.Array


def init(kernel, bias) -> TempScalingAcc:
  """Starts the fit: pass 1's geometric grid of inverse temperatures.

  The fit needs labelled in-distribution data, ideally held out (a
  validation split), not the training set; it fits on whatever labelled
  features it is given, reading them four times (a re-iterable, not a
  generator).

  Args:
    kernel: `[features, classes]` head kernel (Flax layout).
    bias: `[classes]` head bias or None.
  """
  _common.check_head(kernel, bias)
  betas = np.geomspace(LOWEST, HIGHEST, CANDIDATES)
  with jax.enable_x64(True):
    return TempScalingAcc(_common.head_state(kernel, bias), jnp.asarray(betas, jnp.float64),
                          jnp.zeros((3, CANDIDATES), jnp.float64), jnp.zeros((), jnp.int32))


@jax.jit
def _add(acc: TempScalingAcc, features: jax.Array, labels: jax.Array) -> TempScalingAcc:
  z = _matmul.dot(features.astype(jnp.float32), acc.head.kernel) + acc.head.bias
  # Float64 from the float32 logits; shifted by the row maximum (every
  # derivative is unchanged) so that `exp` never overflows.
  d = z.astype(jnp.float64)
  d = d - jnp.max(d, axis=1, keepdims=True)
  d_label = jnp.take_along_axis(d, labels.astype(jnp.int32)[:, None], axis=1)[:, 0]

  def at(beta):
    # One candidate at a time: a [batch, classes] temporary, not [K, batch, classes].
    log_total = jax.nn.logsumexp(beta * d, axis=1)
    p = jnp.exp(beta * d - log_total[:, None])
    mean = jnp.sum(p * d, axis=1)
    variance = jnp.sum(p * jnp.square(d - mean[:, None]), axis=1)
    return jnp.stack([jnp.sum(log_total - beta * d_label), jnp.sum(mean - d_label),
                      jnp.sum(variance)])

  return acc.replace(sums=acc.sums + jax.lax.map(at, acc.betas).T)


def update(acc: TempScalingAcc, features, labels) -> TempScalingAcc:
  """Adds a `[batch, features]` batch and its `[batch]` labels at every candidate."""
  with jax.enable_x64(True):
    return _add(acc, features, labels)


def _bracket(acc: TempScalingAcc) -> tuple[int, np.ndarray, np.ndarray]:
  """`(j, betas, sums)`: the derivative turns non-negative between candidates
  j - 1 and j (first pass: checked to happen inside the grid)."""
  betas, sums = np.asarray(acc.betas, np.float64), np.asarray(acc.sums, np.float64)
  slope = sums[1]
  if int(acc.index) == 0:
    if not np.any(sums[2] > 0):
      raise ValueError(
          "temperature scaling: every labelled sample has equal logits for all classes, "
          "so the NLL does not depend on the temperature")
    # At the grid's ends the NLL has no interior minimum: the fit goes on to
    # that end (as LBFGS would drift there) and says so, rather than stop a
    # run of many scorers.
    if slope[0] >= 0:
      warnings.warn(
          f"temperature scaling: the NLL of the labelled data is smallest at T above "
          f"{1 / LOWEST:g}: the head's logits are no better than chance on these labels; "
          f"T = {1 / LOWEST:g} (every score close to 1 / classes)", stacklevel=2)
    # With no misclassified sample the slope is negative for every b, and
    # underflows to exactly 0 at large b; one misclassified sample keeps it
    # positive there (its term tends to its logit's gap below the top).
    elif slope[-1] <= 0:
      warnings.warn(
          f"temperature scaling: the NLL of the labelled data still falls at T = "
          f"{1 / HIGHEST:g}: the head classifies every sample correctly, so no finite "
          f"temperature minimises it; T = {1 / HIGHEST:g}. Fit on held-out labelled data, "
          "not on the training set", stacklevel=2)
  j = int(np.argmax(slope >= 0)) if np.any(slope >= 0) else len(slope) - 1
  return min(max(j, 1), len(slope) - 1), betas, sums


def next_pass(acc: TempScalingAcc) -> TempScalingAcc:
  """Equally spaced candidates across the bracket; sums restart at zero."""
  j, betas, _ = _bracket(acc)
  with jax.enable_x64(True):
    return acc.replace(
        betas=jnp.asarray(np.linspace(betas[j - 1], betas[j], CANDIDATES), jnp.float64),
        sums=jnp.zeros((3, CANDIDATES), jnp.float64),
        index=jnp.asarray(int(acc.index) + 1, jnp.int32))


def _hermite_root(lo, hi, f0, f1, d0, d1) -> float:
  """The root in `[lo, hi]` of the cubic with values `f0 < 0 <= f1` and slopes
  `d0`, `d1` at the ends, by bisection (to float64 resolution)."""
  h = hi - lo

  def cubic(t):
    return ((2 * t**3 - 3 * t**2 + 1) * f0 + (t**3 - 2 * t**2 + t) * h * d0
            + (3 * t**2 - 2 * t**3) * f1 + (t**3 - t**2) * h * d1)

  a, b = 0.0, 1.0
  for _ in range(64):
    mid = 0.5 * (a + b)
    if cubic(mid) < 0:
      a = mid
    else:
      b = mid
  return lo + 0.5 * (a + b) * h


def finalize(acc: TempScalingAcc) -> TempScalingState:
  """`T = 1 / b*`, b* inside the last bracket (`_hermite_root`)."""
  j, betas, sums = _bracket(acc)
  if sums[1, j - 1] >= 0:  # The slope is zero at the bracket's lower end.
    beta = betas[j - 1]
  else:
    beta = _hermite_root(betas[j - 1], betas[j], sums[1, j - 1], sums[1, j],
                         sums[2, j - 1], sums[2, j])
  return TempScalingState(acc.head.weight, acc.head.bias,
                          jnp.asarray(1.0 / beta, jnp.float32))


# Four passes over labelled data (see the module docstring); `needs_labels`.
FOLD = fold.Fold(init=init, update=update, finalize=finalize,
                 merge=fold.add_fields("sums"), passes=PASSES, next_pass=next_pass,
                 needs_labels=True)


@_common.score_jit
def score(state: TempScalingState, features: jax.Array,
          layout: layout_lib.Layout | None = None) -> jax.Array:
  """`[batch]` largest softmax probabilities at the fitted temperature; higher = more ID.

  Args:
    state: from `fit` (the head and T).
    features: `[batch, features]` penultimate activations.
  """
  _common.check_width(features, state.weight.shape[1])
  z, axis = _common.logits(state, features, layout)
  return _mcm.max_softmax(z, axis, state.temperature)
