"""Class-mean first-order Taylor ("Shapley") contributions of LINe.

`contrib[c, j]` is the mean, over training samples of class c, of
`h[j] * d logit_c / d h[j]`. The official code runs one forward and backward pass
per training image; here it is one batched computation per batch.

Precision follows the official code: each per-sample product is a float32 value
(`h * grad`), and the class sums and means are float64, so the masks built from
them match NumPy's to the last bit. float64 is switched on locally
(`jax.enable_x64`) and nowhere else.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
import functools

import flax.struct
import jax
import jax.numpy as jnp

from line_jax import _validation


@flax.struct.dataclass
class ContributionSums:
  """Running per-class sums of Taylor contributions (streaming state).

  Attributes:
    sums: `[classes, features]` float64 sums of `h * d logit_y / d h`.
    counts: `[classes]` int64 number of samples seen per class.
  """

  sums: jax.Array
  counts: jax.Array


def init_sums(num_classes: int, num_features: int) -> ContributionSums:
  """Empty running sums for `num_classes` classes of `num_features` features."""
  with jax.enable_x64(True):
    return ContributionSums(
        sums=jnp.zeros((num_classes, num_features), jnp.float64),
        counts=jnp.zeros((num_classes,), jnp.int64),
    )


@jax.jit
def _add_linear(acc: ContributionSums, features, labels, kernel) -> ContributionSums:
  # For a linear head d logit_y / d h = kernel[:, y]: no autodiff needed.
  taylor = features.astype(jnp.float32) * kernel.astype(jnp.float32).T[labels]
  return _add_taylor(acc, taylor, labels)


def _add_taylor(acc: ContributionSums, taylor, labels) -> ContributionSums:
  num_classes = acc.counts.shape[0]
  sums = jax.ops.segment_sum(taylor.astype(jnp.float64), labels, num_classes)
  counts = jnp.bincount(labels, length=num_classes).astype(jnp.int64)
  return ContributionSums(acc.sums + sums, acc.counts + counts)


def update_sums(acc: ContributionSums, features, labels, kernel) -> ContributionSums:
  """Adds one batch to the running sums (linear head, closed form).

  Args:
    acc: state from `init_sums` or a previous `update_sums`.
    features: `[batch, features]` pooled penultimate activations.
    labels: `[batch]` integer class labels.
    kernel: `[features, classes]` head kernel (Flax layout).

  Returns:
    The updated `ContributionSums`.
  """
  num_classes, num_features = acc.sums.shape
  _validation.head(kernel, None, num_features)
  if kernel.shape[1] != num_classes:
    raise ValueError(
        f"kernel has {kernel.shape[1]} classes but the sums were started for "
        f"{num_classes}"
    )
  _check_batch(acc, features, labels)
  return add_batch(acc, features, labels, kernel)


def _check_batch(acc: ContributionSums, features, labels) -> None:
  num_classes, num_features = acc.sums.shape
  _validation.features(features, width=num_features)
  _validation.labels(labels, features.shape[0], num_classes)


def add_batch(acc: ContributionSums, features, labels, kernel) -> ContributionSums:
  """`update_sums` for a batch and kernel the caller has already validated."""
  with jax.enable_x64(True):
    return _add_linear(acc, features, labels, kernel)


def finalize(acc: ContributionSums) -> jax.Array:
  """Class means `[classes, features]` (float64) from the running sums.

  Raises:
    ValueError: if a class has no sample (the official code divides by zero).
  """
  _validation.nonempty_classes(acc.counts)
  with jax.enable_x64(True):
    return acc.sums / acc.counts[:, None].astype(jnp.float64)


def contributions(features, labels, kernel) -> jax.Array:
  """Class-mean Taylor contributions for a linear head, in memory.

  Args:
    features: `[n, features]` pooled penultimate activations of training data.
    labels: `[n]` integer labels in `[0, classes)`.
    kernel: `[features, classes]` head kernel (PyTorch's weight transposed).

  Returns:
    `[classes, features]` float64: `mean_{i: y_i = c} features[i] * kernel[:, c]`.
  """
  features, labels, kernel, _ = _validation.train_arrays(features, labels, kernel, None)
  _validation.features(features)
  num_classes = _validation.head(kernel, None, features.shape[1])
  _validation.labels(labels, features.shape[0], num_classes)
  return class_means(features, labels, kernel)


def class_means(features, labels, kernel) -> jax.Array:
  """`contributions` for inputs that the caller has already validated."""
  acc = init_sums(kernel.shape[1], features.shape[1])
  return finalize(add_batch(acc, features, labels, kernel))


def contributions_from_batches(
    batches: Iterable[tuple[jax.Array, jax.Array]], kernel
) -> jax.Array:
  """Same as `contributions`, streamed over `(features, labels)` batches.

  Memory stays O(classes x features) whatever the number of batches, so the
  training set never has to fit on the device.
  """
  kernel = _validation.as_array("kernel", kernel)
  num_features, num_classes = _validation.kernel(kernel)
  acc = init_sums(num_classes, num_features)
  for features, labels in batches:
    features = _validation.as_array("features", features)
    labels = _validation.as_array("labels", labels)
    # The kernel was checked once above; each batch is checked on its own.
    _check_batch(acc, features, labels)
    acc = add_batch(acc, features, labels, kernel)
  return finalize(acc)


def contributions_from_head(
    head_fn: Callable[[jax.Array], jax.Array],
    features,
    labels,
    num_classes: int,
) -> jax.Array:
  """Class-mean Taylor contributions for any differentiable head.

  `h * d logit_y / d h` for every sample at once: one vector-Jacobian product
  of the batched head with the one-hot labels as cotangent, which is the
  per-sample gradient whenever the head treats samples independently (any
  head in inference mode).

  Args:
    head_fn: maps `[batch, features]` to logits `[batch, classes]`.
    features: `[n, features]` training activations.
    labels: `[n]` integer labels.
    num_classes: number of classes of `head_fn`'s output.

  Returns:
    `[classes, features]` float64 class means.
  """
  _validation.features(features)
  _validation.labels(labels, features.shape[0], num_classes)
  taylor = _taylor_from_head(head_fn, features, labels, num_classes)
  with jax.enable_x64(True):
    acc = init_sums(num_classes, features.shape[1])
    return finalize(jax.jit(_add_taylor)(acc, taylor, labels))


@functools.partial(jax.jit, static_argnums=(0, 3))
def _taylor_from_head(head_fn, features, labels, num_classes):
  features = jnp.asarray(features, jnp.float32)
  logits, vjp = jax.vjp(head_fn, features)
  if logits.shape != (features.shape[0], num_classes):
    raise ValueError(
        f"head_fn must map [batch, features] to [batch, {num_classes}], got "
        f"{logits.shape}"
    )
  (grad,) = vjp(jax.nn.one_hot(labels, num_classes, dtype=logits.dtype))
  return features * grad
