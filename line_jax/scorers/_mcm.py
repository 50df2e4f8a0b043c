"""MCM: maximum concept matching, the largest softmax at temperature tau.

Ming, Cai, Gu, Sun, Li, Zhu, Li, "Delving into Out-of-Distribution
Detection with Vision-Language Representations", NeurIPS 2022. With the
head's logits `z = h @ kernel + bias`,

    score(x) = max_c softmax(z / tau)_c = 1 / sum_c exp((z_c - max z) / tau),

higher = more ID. This is OpenOOD's postprocessor
(`openood/postprocessors/mcm_postprocessor.py`, line 20:
`torch.softmax(output / self.tau, dim=1)`, then the max), on the logits of
the classifier head. Default tau = 1 and the grid (0.01, 1, 10) are OpenOOD's
(`configs/postprocessors/mcm.yml`, lines 5 and 7); at tau = 1 MCM is MSP.

Paper and code differ: the paper (and the official code,
deeplearning-wisc/MCM `utils/detection_util.py`, `get_ood_scores_clip`:
`F.softmax(output / args.T, dim=1)`, `-np.max(smax, axis=1)` as an OOD
score) softmaxes the cosine similarities between a CLIP image embedding and
the text embeddings of the class names. Given L2-normalised features and a
head whose kernel columns are the L2-normalised text embeddings and whose
bias is zero, this scorer computes exactly that. tau is data (a pytree
leaf), so the states of a grid stack.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from line_jax import _validation
from line_jax import fold
from line_jax import layout as layout_lib
from line_jax.scorers import _common

TAU = 1.0
# The tuning grid (`python -m line_jax.tune`): OpenOOD v1.5's sweep.
GRID = {"tau": (0.01, 1.0, 10.0)}


@flax.struct.dataclass
class McmState(_common.HeadState):
  """An MCM scorer: the head and its temperature.

  Attributes:
    weight: `[classes, features]` float32 head weight (class-major, as
      `HeadState`; `kernel` is its transpose).
    bias: `[classes]` float32 head bias.
    tau: float32 scalar softmax temperature.
  """

  tau: jax.Array


def init(kernel, bias, *, tau=TAU) -> McmState:
  """Checks the head and the temperature; the state.

  Args:
    kernel: `[features, classes]` head kernel (Flax layout).
    bias: `[classes]` head bias or None.
    tau: positive finite softmax temperature.
  """
  _common.check_head(kernel, bias)
  tau = _validation.positive("tau", tau)
  head = _common.head_state(kernel, bias)
  return McmState(head.weight, head.bias, jnp.asarray(tau, jnp.float32))


FOLD = fold.head_fold(init)


def max_softmax(z: jax.Array, axis: int, tau) -> jax.Array:
  """`max softmax(z / tau)` over the class `axis`, as `1 / sum exp((z - max z) / tau)`.

  The largest term is exactly 1, so the sum is at least 1: no overflow, no
  division by zero, however small tau is.
  """
  shifted = (z - jnp.max(z, axis=axis, keepdims=True)) / tau
  return 1.0 / jnp.sum(jnp.exp(shifted), axis=axis)


@_common.score_jit
def score(state: McmState, features: jax.Array,
          layout: layout_lib.Layout | None = None) -> jax.Array:
  """`[batch]` largest softmax probabilities at temperature tau; higher = more ID.

  Args:
    state: from `fit` (the head and tau).
    features: `[batch, features]` penultimate activations.
  """
  _common.check_width(features, state.weight.shape[1])
  z, axis = _common.logits(state, features, layout)
  return max_softmax(z, axis, state.tau)
