"""NCI: neural-collapse-inspired proximity to the predicted class's weight.

Liu, Qin, "Detecting Out-of-Distribution through the Lens of Neural
Collapse", CVPR 2025 (arXiv:2311.01479). Under neural collapse, ID features
centred on the training mean `mu` align with the head weight of their class.
With `p = argmax(h @ kernel + bias)` and `w_p` its class-major weight row,

    score(h) = w_p . (h - mu) / ||h - mu||  +  alpha ||h||_1,

the proximity plus an L1-norm filter; higher = more ID. This is the official
implementation (the NCI repository, litianliu/NCI-OOD, points to OpenOOD's
`nci_postprocessor`, its code): the paper's proximity is the cosine of the
angle between `w_p` and `h - mu`, and the code leaves out the division by
`||w_p||` (equal weight norms under neural collapse); we follow the code.
Default alpha = 1e-4, the official configuration's (OpenOOD `nci.yml`);
alpha is a pytree leaf, so states of a grid stack. Only the mean is fitted,
a float64 running sum.
"""

from __future__ import annotations

import math
import numbers

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from line_jax import layout as layout_lib
from line_jax.scorers import _common

ALPHA = 1e-4
# The tuning grid (`python -m line_jax.tune`): the official sweep.
GRID = {"alpha": (1e-4, 1e-3, 1e-2, 1e-1)}


@flax.struct.dataclass
class NciState(_common.HeadState):
  """A fitted NCI scorer.

  Attributes:
    weight: `[classes, features]` float32 head weight (class-major, as
      `HeadState`; `kernel` is its transpose).
    bias: `[classes]` float32 head bias.
    mean: `[features]` float32 training mean.
    alpha: float32 scalar weight of the L1 norm.
  """

  mean: jax.Array
  alpha: jax.Array


def _alpha(value) -> float:
  if isinstance(value, bool) or not isinstance(value, (numbers.Real, np.ndarray, jax.Array)):
    raise TypeError(f"alpha must be a real number, got {type(value).__name__}")
  if getattr(value, "shape", ()) != ():
    raise TypeError(f"alpha must be a scalar, got shape {value.shape}")
  value = float(value)
  if not (math.isfinite(value) and value >= 0.0):
    raise ValueError(f"alpha must be a non-negative finite number, got {value}")
  return value


def init(kernel, bias, *, alpha=ALPHA) -> _common.MeanAcc:
  """Starts NCI's fit.

  Args:
    kernel: `[features, classes]` head kernel (Flax layout).
    bias: `[classes]` head bias or None.
    alpha: non-negative weight of the L1-norm term (0: proximity alone).
  """
  _common.check_head(kernel, bias)
  return _common.mean_acc(kernel, bias, _alpha(alpha))


def finalize(acc: _common.MeanAcc) -> NciState:
  """The state: the training mean (float64 on the host, stored float32)."""
  return NciState(acc.head.weight, acc.head.bias, jnp.asarray(acc.mean, jnp.float32),
                  jnp.asarray(acc.setting, jnp.float32))


FOLD = _common.mean_fold(init, finalize)


@_common.score_jit
def score(state: NciState, features: jax.Array,
          layout: layout_lib.Layout | None = None) -> jax.Array:
  """`[batch]` proximity to the predicted class's weight plus `alpha ||h||_1`;
  higher = more ID.

  Args:
    state: from `fit`.
    features: `[batch, features]` penultimate activations.
  """
  _common.check_width(features, state.weight.shape[1])
  h = features.astype(jnp.float32)
  z, axis = _common.logits(state, h, layout)
  centred = h - state.mean
  proximity = jnp.sum(centred * state.weight[_common.argmax(z, axis)], axis=1)
  proximity = proximity / jnp.linalg.norm(centred, axis=1)
  return proximity + state.alpha * jnp.sum(jnp.abs(h), axis=1)
