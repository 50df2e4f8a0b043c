"""LINe as a registered scorer: `line_jax.line` under the common interface.

Ahn, Park, Kim, "LINe: Out-of-Distribution Detection by Leveraging Important
Neurons", CVPR 2023. Defaults are the paper's ImageNet ResNet-50 settings,
p_w = 10, p_a = 10, clip = 0.8 (CIFAR-10: 90, 90, 1.0; CIFAR-100: 90, 10,
1.0). Setting p_w, p_a or clip to None switches that part off; all three off
is Energy.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from line_jax import _validation
from line_jax import line
from line_jax.line import _contributions
from line_jax.scorers import _common
from line_jax.scorers import _protocol

P_W = 10.0
P_A = 10.0
CLIP = 0.8
# The tuning grid (`python -m line_jax.tune`); clip values are percentiles of
# the training activations (None: no clipping), resolved when tuning.
GRID = {"p_w": (10.0, 50.0, 70.0, 90.0), "p_a": (10.0, 50.0, 70.0, 90.0),
        "clip": (80.0, 90.0, 95.0, 99.0, None)}



@flax.struct.dataclass
class LineAcc:
  """LINe's accumulator: the head, the contribution sums, the settings.

  Attributes:
    sums: running per-class contribution sums (`line.ContributionSums`).
    kernel: `[features, classes]` float32 head kernel.
    bias: `[classes]` float32 head bias, or None.
    p_w, p_a, clip: static; the hyperparameters (None: that part off).
  """

  sums: line.ContributionSums
  kernel: jax.Array
  bias: jax.Array | None
  p_w: float | None = flax.struct.field(pytree_node=False)
  p_a: float | None = flax.struct.field(pytree_node=False)
  clip: float | None = flax.struct.field(pytree_node=False)


def init(kernel, bias, *, p_w=P_W, p_a=P_A, clip=CLIP) -> LineAcc:
  """Starts LINe's fit (the checks of `line_jax.line.fit`, before any data).

  Args:
    kernel: `[features, classes]` head kernel (Flax layout).
    bias: `[classes]` head bias or None.
    p_w: weight-pruning percentile in [0, 100], or None (off).
    p_a: neuron-pruning percentile in [0, 100], or None (off).
    clip: activation clip > 0, or None (off).
  """
  num_features, num_classes = _common.check_head(kernel, bias)
  p_w = _validation.percentile("p_w", p_w, allow_none=True)
  p_a = _validation.percentile("p_a", p_a, allow_none=True)
  clip = _validation.positive("clip", clip, allow_none=True)
  return LineAcc(line.init_sums(num_classes, num_features), jnp.asarray(kernel, jnp.float32),
                 None if bias is None else jnp.asarray(bias, jnp.float32), p_w, p_a, clip)


def update(acc: LineAcc, features, labels) -> LineAcc:
  """Adds a validated `[batch, features]` batch and its `[batch]` labels."""
  return acc.replace(sums=_contributions.add_batch(acc.sums, features, labels, acc.kernel))


def finalize(acc: LineAcc) -> line.LineState:
  """Class-mean contributions, then the exact masks (`fit_from_contributions`)."""
  contrib = line.finalize_sums(acc.sums)
  return line.fit_from_contributions(contrib, acc.kernel, acc.bias, p_w=acc.p_w,
                                     p_a=acc.p_a, clip=acc.clip)


FOLD = _protocol.Fold(init=init, update=update, finalize=finalize,
                      merge=_protocol.add_fields("sums"), needs_labels=True)


# Already jitted; `[batch]` LINe energies, higher = more ID.
score = line.score
