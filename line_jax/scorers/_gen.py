"""GEN: generalized entropy of the largest softmax probabilities.

Liu, Lochman, Zach, "GEN: Pushing the Limits of Softmax-Based
Out-of-Distribution Detection", CVPR 2023. With `p = softmax(logits)` and
`p_(1) >= p_(2) >= ...` its probabilities in decreasing order,

    G(x) = sum_{j <= M} p_(j)^gamma (1 - p_(j))^gamma,    score(x) = -G(x),

the generalized (Tsallis-like) entropy of the top-M probabilities; higher =
more ID. Defaults gamma = 0.1, M = 100: the official code's (XixiLiu95/GEN,
`benchmark.py`, `--gamma 0.1`, `--M 100`, its ImageNet benchmark), M
capped at the class count (the code's `sort(p)[:, -M:]` takes every class
when M exceeds it). Paper and code agree.

Numerics: each term is `exp(gamma (log p + log(1 - p)))` from the
log-softmax, with `1 - p` of the top class taken from the sum of the other
classes, so a confident sample's top term is not the `(1 - p)^gamma = 0`
that float32 `1 - p` rounds it to (at p = 1 - 1e-8 the exact term is 0.16).
Ties at the M-th probability count as often as needed to make M terms.
Both hyperparameters are data (pytree leaves), so states of a grid stack.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from line_jax import _validation
from line_jax import fold
from line_jax import layout as layout_lib
from line_jax.scorers import _common
from line_jax.scorers import _select

GAMMA = 0.1
M = 100
# The tuning grid (`python -m line_jax.tune`): OpenOOD v1.5's sweep.
GRID = {"gamma": (0.01, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0), "m": (10, 50, 100, 200, 500, 1000)}


@flax.struct.dataclass
class GenState(_common.HeadState):
  """A GEN scorer: the head and its two hyperparameters.

  Attributes:
    weight: `[classes, features]` float32 head weight (class-major, as
      `HeadState`; `kernel` is its transpose).
    bias: `[classes]` float32 head bias.
    gamma: float32 scalar exponent.
    m: int32 scalar, how many of the largest probabilities are summed
      (the `M` asked for, capped at the class count).
  """

  gamma: jax.Array
  m: jax.Array


def init(kernel, bias, *, gamma=GAMMA, m=M) -> GenState:
  """Checks the head and the hyperparameters; the state.

  Args:
    kernel: `[features, classes]` head kernel (Flax layout).
    bias: `[classes]` head bias or None.
    gamma: positive exponent of the generalized entropy.
    m: positive number of top probabilities summed (capped at the classes).
  """
  _, num_classes = _common.check_head(kernel, bias)
  gamma = _validation.positive("gamma", gamma)
  m = min(_common.integer("m", m), num_classes)
  head = _common.head_state(kernel, bias)
  return GenState(head.weight, head.bias, jnp.asarray(gamma, jnp.float32),
                  jnp.asarray(m, jnp.int32))


FOLD = fold.head_fold(init)


def generalized_entropy(z: jax.Array, axis: int, gamma, m, *,
                        unroll: bool | None = None) -> jax.Array:
  """`sum over the m largest p of p^gamma (1 - p)^gamma`, `p = softmax(z)`.

  Args:
    z: float32 logits, classes along `axis` (0 or 1 of a 2-D array).
    axis: the class axis.
    gamma: exponent (scalar, may be traced).
    m: int32 scalar in [1, classes] (may be traced).
  """
  top = jnp.max(z, axis=axis, keepdims=True)
  log_total = jax.nn.logsumexp(z - top, axis=axis, keepdims=True)
  log_p = z - top - log_total
  # 1 - p of the (first) top class is the other classes' share, computed as
  # their own log-sum-exp; every other class has p <= 1/2, so log1p(-p) is exact.
  index = jnp.arange(z.shape[axis])
  first_top = jnp.expand_dims(index, 1 - axis) == _common.argmax(z, axis, keepdims=True)
  rest = jax.nn.logsumexp(jnp.where(first_top, -jnp.inf, z - top), axis=axis, keepdims=True)
  log_rest = jnp.where(first_top, rest - log_total, jnp.log1p(-jnp.exp(log_p)))
  terms = jnp.exp(gamma * (log_p + log_rest))
  # Probabilities order as logits: the m-th largest logit marks the top m.
  kth = _select.kth_largest_per_column(z if axis == 0 else z.T, m, unroll=unroll)
  kth = jnp.expand_dims(kth, axis)
  above = z > kth
  count = jnp.sum(above, axis=axis, dtype=jnp.int32)
  tied = jnp.max(jnp.where(z == kth, terms, 0.0), axis=axis)
  return jnp.sum(jnp.where(above, terms, 0.0), axis=axis) + (m - count) * tied


@_common.score_jit
def score(state: GenState, features: jax.Array,
          layout: layout_lib.Layout | None = None) -> jax.Array:
  """`[batch]` minus the generalized entropy of the top-M softmax; higher = more ID.

  Args:
    state: from `fit` (the head, gamma and M).
    features: `[batch, features]` penultimate activations.
  """
  _common.check_width(features, state.weight.shape[1])
  z, axis = _common.logits(state, features, layout)
  return -generalized_entropy(z, axis, state.gamma, state.m, unroll=_select.unrolled(layout))
