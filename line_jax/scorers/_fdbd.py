"""fDBD: feature distance to the decision boundaries, regularised.

Liu, Qin, "Fast Decision Boundary based Out-of-Distribution Detector", ICML
2024. For a linear head, the distance of a feature h predicted as p
(`p = argmax z`, `z = h @ kernel + bias`) to the boundary between p and c is
the closed form `|z_p - z_c| / ||w_p - w_c||` (`w` = the class-major
weight rows), and

    score(h) = sum_{c != p} |z_p - z_c| / ||w_p - w_c||  /  ||h - mu||,

`mu` the mean training feature; higher = more ID. This is the official
code's (litianliu/fDBD-OOD, `run_imagenet.py`; OpenOOD's
`fdbd_postprocessor`): where the paper averages the distances over the
C - 1 other classes, the code sums them, the same ranking; we follow the
code. `centred=False` divides by `||h||` instead of `||h - mu||`, OpenOOD's
`distance_as_normalizer: False` option; the default follows the paper and
the official code. Only the mean is fitted (a float64 running sum); the
`[classes, classes]` inverse boundary normals `1 / ||w_p - w_c||` are
computed once, in float64, from the head (a pair with identical weights has
no boundary: its term is 0).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from line_jax import layout as layout_lib
from line_jax.scorers import _common

# The tuning grid (`python -m line_jax.tune`): OpenOOD v1.5's sweep.
GRID = {"centred": (True, False)}


@flax.struct.dataclass
class FdbdState(_common.HeadState):
  """A fitted fDBD scorer.

  Attributes:
    weight: `[classes, features]` float32 head weight (class-major, as
      `HeadState`; `kernel` is its transpose).
    bias: `[classes]` float32 head bias.
    inverse_gaps: `[classes, classes]` float32, `1 / ||w_p - w_c||` (row p,
      column c; 0 on the diagonal and for identical rows).
    center: `[features]` float32: the training mean (`centred`), or zeros.
  """

  inverse_gaps: jax.Array
  center: jax.Array


def init(kernel, bias, *, centred=True) -> _common.MeanAcc:
  """Starts fDBD's fit.

  Args:
    kernel: `[features, classes]` head kernel (Flax layout).
    bias: `[classes]` head bias or None.
    centred: regularise by `||h - mean||` (True, the paper's) or `||h||`.
  """
  _common.check_head(kernel, bias)
  if not isinstance(centred, (bool, np.bool_)):
    raise TypeError(f"centred must be True or False, got {type(centred).__name__}")
  return _common.mean_acc(kernel, bias, float(centred))


def inverse_gaps(weight) -> np.ndarray:
  """`[classes, classes]` float64 `1 / ||w_p - w_c||`, 0 where the rows agree.

  Through the float64 Gram matrix (the exact differences would be a
  `[C, C, features]` temporary, 16 GB at 1000 x 2048); rows that are equal
  (the diagonal among them) are found exactly, not by a rounded zero.

  Args:
    weight: `[classes, features]` class-major head weight.
  """
  w = np.asarray(weight, np.float64)
  sq = np.sum(w * w, axis=1)
  gaps = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2.0 * (w @ w.T), 0.0))
  _, group = np.unique(w, axis=0, return_inverse=True)
  group = np.ravel(group)
  apart = (group[:, None] != group[None, :]) & (gaps > 0)
  return np.divide(1.0, gaps, out=np.zeros_like(gaps), where=apart)


def finalize(acc: _common.MeanAcc) -> FdbdState:
  """The state: the mean (if centred) and the inverse boundary normals."""
  center = acc.mean * float(acc.setting)
  return FdbdState(acc.head.weight, acc.head.bias,
                   jnp.asarray(inverse_gaps(acc.head.weight), jnp.float32),
                   jnp.asarray(center, jnp.float32))


FOLD = _common.mean_fold(init, finalize)


@_common.score_jit
def score(state: FdbdState, features: jax.Array,
          layout: layout_lib.Layout | None = None) -> jax.Array:
  """`[batch]` summed distances to the decision boundaries over `||h - mu||`;
  higher = more ID.

  Args:
    state: from `fit`.
    features: `[batch, features]` penultimate activations.
  """
  _common.check_width(features, state.weight.shape[1])
  h = features.astype(jnp.float32)
  z, axis = _common.logits(state, h, layout)
  top = jnp.max(z, axis=axis, keepdims=True)
  rows = state.inverse_gaps[_common.argmax(z, axis)]  # [batch, classes]
  if axis == 0:
    rows = rows.T
  distance = jnp.sum((top - z) * rows, axis=axis)
  return distance / jnp.linalg.norm(h - state.center, axis=1)
