"""ODIN: temperature scaling plus a small input perturbation.

Liang, Li, Srikant, "Enhancing The Reliability of Out-of-distribution Image
Detection in Neural Networks", ICLR 2018. With `S(x; T) = softmax(f(x) / T)`
and the predicted class `y = argmax f(x)`:

    x' = x - epsilon * sign(-grad_x log S_y(x; T))
    score = max S(x'; T)                       # higher = more ID

Defaults T = 1000 and epsilon = 0.0014, the paper's (and its code's)
settings for DenseNet on CIFAR-10. The official code counts a zero gradient
as positive (`sign` via `>= 0`); so does this one.

ODIN is the one scorer in line_jax that needs the network, not only
features: the input gradient goes through `logits_fn`. The official code
perturbs normalised images by `epsilon / std` per channel; putting the
normalisation inside `logits_fn` and passing raw images gives exactly that,
with `epsilon` in pixel units as in the paper.
"""

from __future__ import annotations

from collections.abc import Callable
import functools
import numbers

import jax
import jax.numpy as jnp

from line_jax import _validation
from line_jax import layout

TEMPERATURE = 1000.0
EPSILON = 0.0014


def score(
    logits_fn: Callable[[jax.Array], jax.Array],
    images,
    *,
    temperature=TEMPERATURE,
    epsilon=EPSILON,
) -> jax.Array:
  """ODIN scores of a batch of inputs.

  Args:
    logits_fn: any JAX-traceable function from `[batch, ...]` inputs to
      `[batch, classes]` logits that treats samples independently (a model in
      inference mode). Hashable (a function, or a `functools.partial`):
      compilations are cached per function.
    images: `[batch, ...]` floating inputs (e.g. `[batch, height, width,
      channels]`).
    temperature: positive softmax temperature T.
    epsilon: perturbation size, >= 0 (0: temperature scaling alone).

  Returns:
    `[batch]` float32 maximum softmax probabilities at temperature T of the
    perturbed inputs.
  """
  _check_images(images)
  temperature = _validation.positive("temperature", temperature)
  # Zero is allowed (temperature scaling alone); anything else must be > 0.
  zero = isinstance(epsilon, numbers.Real) and not isinstance(epsilon, bool) and epsilon == 0
  epsilon = 0.0 if zero else _validation.positive("epsilon", epsilon)
  return _score(logits_fn, images, jnp.float32(temperature), jnp.float32(epsilon))


def _check_images(images) -> None:
  if not hasattr(images, "shape") or not hasattr(images, "dtype"):
    raise TypeError(f"images must be an array, got {type(images).__name__}")
  if len(images.shape) < 1 or images.shape[0] == 0 or 0 in images.shape:
    raise ValueError(f"images must be a non-empty [batch, ...] array, got shape {images.shape}")
  _validation.finite_float_array("images", images)


@functools.partial(layout.network_jit, static_argnums=0)
def _score(logits_fn, images, temperature, epsilon):
  images = jnp.asarray(images, jnp.float32)

  def neg_log_max_softmax(x):
    logits = logits_fn(x)
    if logits.ndim != 2 or logits.shape[0] != x.shape[0]:
      raise ValueError(
          f"logits_fn must map [batch, ...] to [batch, classes], got {logits.shape}"
      )
    log_probs = jax.nn.log_softmax(logits / temperature, axis=-1)
    predicted = jax.lax.stop_gradient(jnp.argmax(logits, axis=-1))
    # Summed over the batch: samples are independent, so the gradient of the
    # sum holds each sample's own input gradient.
    return -jnp.sum(jnp.take_along_axis(log_probs, predicted[:, None], axis=-1))

  grad = jax.grad(neg_log_max_softmax)(images)
  # x' = x - eps * sign(-grad log S) = x - eps * sign(grad of the loss above).
  perturbed = images - epsilon * jnp.where(grad >= 0, 1.0, -1.0)
  probs = jax.nn.softmax(logits_fn(perturbed) / temperature, axis=-1)
  return jnp.max(probs, axis=-1)
