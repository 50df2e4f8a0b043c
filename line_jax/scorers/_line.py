"""LINe as a registered scorer: `line_jax.line` under the common interface.

Ahn, Park, Kim, "LINe: Out-of-Distribution Detection by Leveraging Important
Neurons", CVPR 2023. Defaults are the paper's ImageNet ResNet-50 settings
p_w = 10, p_a = 10 (CIFAR-10: 90, 90; CIFAR-100: 90, 10). The paper's clip
(1.0 on CIFAR's DenseNet-BC, 0.8 on ImageNet's ResNet-50) is in those
networks' feature units, so the default clip is a percentile of the training
activations, `TrainPercentile(90)`, resolved exactly while fitting (two passes
over the data) and stored in the state; ReAct, whose threshold LINe's clip
follows, uses the same percentile. A float clips at that value (one pass).
Setting p_w, p_a or clip to None switches that part off; all three off is
Energy.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from line_jax import _validation
from line_jax import fold
from line_jax import line
from line_jax.line import _contributions
from line_jax.line import _fit as line_fit
from line_jax.scorers import _common
from line_jax.scorers import _quantile

P_W = 10.0
P_A = 10.0
CLIP = _quantile.TrainPercentile(90.0)
# The tuning grid (`python -m line_jax.tune`); clips are percentiles of the
# training activations (None: no clipping), resolved when tuning.
GRID = {"p_w": (10.0, 50.0, 70.0, 90.0), "p_a": (10.0, 50.0, 70.0, 90.0),
        "clip": (*map(_quantile.TrainPercentile, (80.0, 90.0, 95.0, 99.0)), None)}



@flax.struct.dataclass
class LineAcc:
  """LINe's accumulator: the head, the contribution sums, the settings.

  Attributes:
    sums: running per-class contribution sums (`line.ContributionSums`).
    kernel: `[features, classes]` float32 head kernel.
    bias: `[classes]` float32 head bias, or None.
    histograms: the activations' histograms when `clip` is a
      `TrainPercentile` (else None).
    p_w, p_a, clip: static; the hyperparameters (None: that part off).
    second: static; whether the second pass (the clip's) has begun.
  """

  sums: line.ContributionSums
  kernel: jax.Array
  bias: jax.Array | None
  histograms: _quantile.Histograms | None
  p_w: float | None = flax.struct.field(pytree_node=False)
  p_a: float | None = flax.struct.field(pytree_node=False)
  clip: float | _quantile.TrainPercentile | None = flax.struct.field(pytree_node=False)
  second: bool = flax.struct.field(pytree_node=False, default=False)


def init(kernel, bias, *, p_w=P_W, p_a=P_A, clip=CLIP) -> LineAcc:
  """Starts LINe's fit (the checks of `line_jax.line.fit`, before any data).

  Args:
    kernel: `[features, classes]` head kernel (Flax layout).
    bias: `[classes]` head bias or None.
    p_w: weight-pruning percentile in [0, 100], or None (off).
    p_a: neuron-pruning percentile in [0, 100], or None (off).
    clip: activation clip: a value > 0 in feature units, a
      `TrainPercentile(p)` of all training activations, or None (off).
  """
  num_features, num_classes = _common.check_head(kernel, bias)
  p_w, p_a = line_fit.pruning_percentiles(p_w, p_a)
  histograms = None
  if isinstance(clip, _quantile.TrainPercentile):
    histograms = _quantile.init(clip.percentile)
  else:
    clip = _validation.positive("clip", clip, allow_none=True)
  return LineAcc(line.init_sums(num_classes, num_features), jnp.asarray(kernel, jnp.float32),
                 None if bias is None else jnp.asarray(bias, jnp.float32), histograms,
                 p_w, p_a, clip)


def update(acc: LineAcc, features, labels) -> LineAcc:
  """Pass 1: adds a validated batch and its labels to the contribution sums
  (and counts its activations); pass 2: the clip's histograms only."""
  if acc.histograms is not None:
    acc = acc.replace(histograms=_quantile.update(acc.histograms, features))
  if acc.second:
    return acc
  return acc.replace(sums=_contributions.add_batch(acc.sums, features, labels, acc.kernel))


def next_pass(acc: LineAcc) -> LineAcc:
  return acc.replace(histograms=_quantile.next_pass(acc.histograms), second=True)


def merge(a: LineAcc, b: LineAcc) -> LineAcc:
  """Two disjoint parts of a pass: the sums add (pass 1), the histograms merge."""
  histograms = (None if a.histograms is None
                else _quantile.merge(a.histograms, b.histograms))
  if a.second:
    return a.replace(histograms=histograms)
  return a.replace(sums=jax.tree.map(jnp.add, a.sums, b.sums), histograms=histograms)


def finalize(acc: LineAcc) -> line.LineState:
  """Class-mean contributions, then the exact masks (`fit_from_contributions`)."""
  contrib = line.finalize_sums(acc.sums)
  clip = acc.clip
  if isinstance(clip, _quantile.TrainPercentile):
    clip = _quantile.value(acc.histograms)
  return line.fit_from_contributions(contrib, acc.kernel, acc.bias, p_w=acc.p_w,
                                     p_a=acc.p_a, clip=clip)


FOLD = fold.Fold(init=init, update=update, finalize=finalize, merge=merge,
                 passes=lambda acc: 1 if acc.histograms is None else 2,
                 next_pass=next_pass, needs_labels=True)


# Already jitted; `[batch]` LINe energies, higher = more ID.
score = line.score
