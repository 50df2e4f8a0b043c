"""ASH: activation shaping, three variants (ASH-P, ASH-B, ASH-S), then energy.

Djurisic, Bozanic, Ashok, Liu, "Extremely Simple Activation Shaping for
Out-of-Distribution Detection", ICLR 2023. Per sample, keep the
`k = n - round(n p / 100)` largest activations and zero the rest, then

* ASH-P: score the pruned features;
* ASH-B: set every kept one to `sum_before / k` (binarised, same sum);
* ASH-S: scale the kept ones by `exp(sum_before / sum_after)`;

and score by energy. Defaults are the paper's ImageNet ResNet-50 settings
(its Table 1): ASH-P p = 60, ASH-B p = 65, ASH-S p = 90. The paper's code
shapes the last convolutional feature map before global average pooling; a
feature-space scorer sees the pooled vector, so the activations shaped here
are the pooled features.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from line_jax.scorers import _common
from line_jax.scorers import _shaping

PERCENTILE_P = 60.0
PERCENTILE_B = 65.0
PERCENTILE_S = 90.0


def _fit(features, labels, kernel, bias, percentile) -> _shaping.ShapingState:
  _common.check_train(features, labels, kernel, bias)
  return _shaping.shaping_state(kernel, bias, percentile, features.shape[1])


def _fit_from_batches(batches, kernel, bias, percentile) -> _shaping.ShapingState:
  del batches  # ASH estimates nothing from data.
  num_features, _ = _common.check_head(kernel, bias)
  return _shaping.shaping_state(kernel, bias, percentile, num_features)


def fit_p(features, labels, kernel, bias, *, percentile=PERCENTILE_P) -> _shaping.ShapingState:
  """ASH-P: checks the inputs, keeps the head and the percentile.

  Args:
    features: `[n, features]` training activations (only validated).
    labels: `[n]` integer labels or None (only validated).
    kernel: `[features, classes]` head kernel (Flax layout).
    bias: `[classes]` head bias or None.
    percentile: in [0, 100]; share of each sample's activations to prune.
  """
  return _fit(features, labels, kernel, bias, percentile)


def fit_b(features, labels, kernel, bias, *, percentile=PERCENTILE_B) -> _shaping.ShapingState:
  """ASH-B; arguments as in `fit_p`."""
  return _fit(features, labels, kernel, bias, percentile)


def fit_s(features, labels, kernel, bias, *, percentile=PERCENTILE_S) -> _shaping.ShapingState:
  """ASH-S; arguments as in `fit_p`."""
  return _fit(features, labels, kernel, bias, percentile)


def fit_p_from_batches(batches, kernel, bias, *, percentile=PERCENTILE_P) -> _shaping.ShapingState:
  """`fit_p` without data (ASH fits nothing); the batches are not read."""
  return _fit_from_batches(batches, kernel, bias, percentile)


def fit_b_from_batches(batches, kernel, bias, *, percentile=PERCENTILE_B) -> _shaping.ShapingState:
  """`fit_b` without data; the batches are not read."""
  return _fit_from_batches(batches, kernel, bias, percentile)


def fit_s_from_batches(batches, kernel, bias, *, percentile=PERCENTILE_S) -> _shaping.ShapingState:
  """`fit_s` without data; the batches are not read."""
  return _fit_from_batches(batches, kernel, bias, percentile)


def shape(features: jax.Array, percentile: float, variant: str) -> jax.Array:
  """ASH-`variant` applied to `[batch, features]` float32 activations."""
  k = _shaping.kept_count(features.shape[1], percentile)
  mask = _shaping.top_k_mask(features, k)
  before = jnp.sum(features, axis=1, keepdims=True)
  if variant == "b":
    return jnp.where(mask, before / k, 0.0)
  pruned = jnp.where(mask, features, 0.0)
  if variant == "p":
    return pruned
  after = jnp.sum(pruned, axis=1, keepdims=True)
  # An all-zero row has before = after = 0; any factor leaves it zero, and 1
  # (ratio 0) keeps 0 / 0 from turning the score into NaN.
  ratio = jnp.where(after == 0, 0.0, before / jnp.where(after == 0, 1.0, after))
  return pruned * jnp.exp(ratio)


def _score(state: _shaping.ShapingState, features: jax.Array, *, variant: str) -> jax.Array:
  """`[batch]` energies of the shaped features; higher = more ID."""
  _common.check_width(features, state.weight.shape[1])
  shaped = shape(features.astype(jnp.float32), state.percentile, variant)
  return _common.head_energy(state, shaped)


score_p = jax.jit(functools.partial(_score, variant="p"))
score_b = jax.jit(functools.partial(_score, variant="b"))
score_s = jax.jit(functools.partial(_score, variant="s"))
