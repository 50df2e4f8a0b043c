"""Fitting LINe: per-class neuron masks and weight masks in O(classes x features).

The official code keeps `W * weight_mask_c` for every class c, a
`[classes, classes, features]` tensor (7.6 GiB for ImageNet). Its weight mask is
`|contrib[c, j]| * W[k, j] > t_c`; for fixed c and j that product is monotone in
`W[k, j]`, so the mask is exactly `W[k, j] > floor[c, j]` with one float32
`floor` per class and feature: the largest weight of column j that the mask
drops (-inf if it drops none). The state is `[classes, features]`, and the
masks it encodes are bit-identical to the official ones.
"""

from __future__ import annotations

import functools
import warnings

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from line_jax import _validation
from line_jax.line import _contributions
from line_jax.line import _percentile


@flax.struct.dataclass
class LineState:
  """A fitted LINe detector (a pytree; save it with orbax).

  Attributes:
    kernel: `[features, classes]` float32 head kernel.
    bias: `[classes]` float32 head bias.
    clip: float32 scalar; features are clipped at it (inf: no clipping).
    weight_floor: `[classes, features]` float32. For predicted class c the head
      keeps `kernel[j, k]` iff `kernel[j, k] > weight_floor[c, j]`.
    neuron_mask: `[classes, features]` bool; for predicted class c feature j is
      kept iff `neuron_mask[c, j]`.
    p_w, p_a: the percentiles the masks were built with (None: switched off).
  """

  kernel: jax.Array
  bias: jax.Array
  clip: jax.Array
  weight_floor: jax.Array
  neuron_mask: jax.Array
  p_w: float | None = flax.struct.field(pytree_node=False, default=None)
  p_a: float | None = flax.struct.field(pytree_node=False, default=None)

  @property
  def num_features(self) -> int:
    return self.kernel.shape[0]

  @property
  def num_classes(self) -> int:
    return self.kernel.shape[1]


def fit(features, labels, kernel, bias, *, p_w, p_a, clip) -> LineState:
  """Fits LINe on training features, as the official code does.

  Args:
    features: `[n, features]` pooled penultimate activations of training data
      (unclipped, as the official precompute uses them). This and the other
      arrays may be NumPy, JAX, (nested) lists or PyTorch tensors.
    labels: `[n]` integer labels in `[0, classes)`; every class needs a sample.
    kernel: `[features, classes]` head kernel (PyTorch's weight transposed).
    bias: `[classes]` head bias.
    p_w: weight percentile in [0, 100]: per class, keep weights whose
      importance `|contrib[c, j]| * W[k, j]` is above it (None: keep all).
    p_a: neuron percentile in [0, 100]: per class, keep features whose
      contribution is above it (None: keep all).
    clip: positive clipping threshold for features (None: no clipping).

  Returns:
    A `LineState` for `score`.

  References:
    Ahn, Park, Kim, "LINe: Out-of-Distribution Detection by Leveraging
    Important Neurons", CVPR 2023 (arXiv 2303.13995).
  """
  features, labels, kernel, bias = _validation.train_arrays(features, labels, kernel, bias)
  _validation.features(features)
  num_classes = _validation.head(kernel, bias, features.shape[1])
  _validation.labels(labels, features.shape[0], num_classes)
  hparams = _hparams(p_w, p_a, clip)
  contrib = _contributions.class_means(features, labels, kernel)
  return _fit_checked(contrib, kernel, bias, *hparams)


def fit_from_contributions(contrib, kernel, bias, *, p_w, p_a, clip) -> LineState:
  """Fits LINe from precomputed class-mean contributions `[classes, features]`.

  Use it with `contributions_from_batches` when the training features do not
  fit in memory. Arguments as in `fit`.
  """
  contrib, _, kernel, bias = _validation.train_arrays(contrib, None, kernel, bias,
                                                      features_name="contributions")
  num_features, num_classes = _validation.kernel(kernel)
  if bias is not None:
    _validation.bias(bias, num_classes)
  if tuple(getattr(contrib, "shape", ())) != (num_classes, num_features):
    raise ValueError(
        f"contributions must have shape ({num_classes}, {num_features}) to match "
        f"kernel, got {getattr(contrib, 'shape', None)}"
    )
  _validation.features(contrib, name="contributions")
  return _fit_checked(contrib, kernel, bias, *_hparams(p_w, p_a, clip))


def _hparams(p_w, p_a, clip):
  return (*pruning_percentiles(p_w, p_a), _validation.positive("clip", clip, allow_none=True))


def pruning_percentiles(p_w, p_a) -> tuple[float | None, float | None]:
  """Checks `p_w`, `p_a` in [0, 100] (or None); warns where 100 prunes everything.

  At 100 the official code keeps no weight (or neuron): every sample then
  gets the same score, `logsumexp(bias)`. That is kept (it is the
  algorithm), but it cannot detect anything, so it warns.
  """
  out = (_validation.percentile("p_w", p_w, allow_none=True),
         _validation.percentile("p_a", p_a, allow_none=True))
  for name, value in zip(("p_w", "p_a"), out):
    if value == 100.0:
      warnings.warn(f"LINe's {name}=100 prunes every {'weight' if name == 'p_w' else 'neuron'}: "
                    "every sample gets the same score; use a percentile below 100",
                    UserWarning, stacklevel=3)
  return out


def _fit_checked(contrib, kernel, bias, p_w, p_a, clip) -> LineState:
  kernel = jnp.asarray(kernel, jnp.float32)
  num_features, num_classes = kernel.shape
  with jax.enable_x64(True):
    contrib = jnp.asarray(contrib, jnp.float64)
    if p_w is None:
      floor = jnp.full((num_classes, num_features), -jnp.inf, jnp.float32)
    else:
      floor = _weight_floor(contrib, kernel, p_w)
    if p_a is None:
      neuron_mask = jnp.ones((num_classes, num_features), bool)
    else:
      neuron_mask = _neuron_mask(contrib, p_a)
  return LineState(
      kernel=kernel,
      bias=(jnp.zeros((num_classes,), jnp.float32) if bias is None
            else jnp.asarray(bias, jnp.float32)),
      clip=jnp.asarray(jnp.inf if clip is None else clip, jnp.float32),
      weight_floor=floor,
      neuron_mask=neuron_mask,
      p_w=p_w,
      p_a=p_a,
  )


def _neuron_mask(contrib: jax.Array, p_a: float) -> jax.Array:
  """`contrib[c] > np.percentile(contrib[c], p_a)` per class, `[C, m]` bool."""
  previous, following, gamma = _percentile.numpy_position(contrib.shape[1], p_a)
  ordered = np.asarray(jnp.sort(contrib, axis=1))
  threshold = _percentile.numpy_lerp(ordered[:, previous], ordered[:, following], gamma)
  return contrib > jnp.asarray(threshold)[:, None]


@jax.jit
def _weight_order_statistics(scale, sorted_cols, rank):
  return jax.vmap(_percentile.order_statistics, (0, None, None))(scale, sorted_cols, rank)


@jax.jit
def _floor_from_threshold(scale, sorted_cols, threshold):
  counts = jax.vmap(_percentile.count_at_most, (0, None, 0))(scale, sorted_cols, threshold)
  largest_dropped = jnp.take_along_axis(sorted_cols, jnp.maximum(counts - 1, 0), axis=0)
  return jnp.where(counts > 0, largest_dropped, -jnp.inf).astype(jnp.float32)


def _weight_floor(contrib: jax.Array, kernel: jax.Array, p_w: float) -> jax.Array:
  """Per-class, per-feature floors encoding the official weight masks."""
  num_classes, num_features = contrib.shape
  scale = jnp.abs(contrib)
  sorted_cols = jnp.sort(kernel.T, axis=0)  # [C, m]: column j = weights of feature j
  previous, following, gamma = _percentile.numpy_position(num_classes * num_features, p_w)
  low, high = _weight_order_statistics(scale, sorted_cols, previous)
  low, high = np.asarray(low), np.asarray(high)
  if following == previous:
    high = low
  threshold = _percentile.numpy_lerp(low, high, gamma)
  return _floor_from_threshold(scale, sorted_cols, jnp.asarray(threshold))
