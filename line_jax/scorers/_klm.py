"""KL matching: distance of the softmax to the closest class template.

Hendrycks, Basart, Mazeika, Zou, Kwon, Mostajabi, Steinhardt, Song,
"Scaling Out-of-Distribution Detection for Real-World Settings", ICML 2022,
its KL matching detector. For each class k the template `d_k` is the mean
softmax of the fitting samples the model predicts as k (labels are not used),
and

    score(x) = -min_k KL(p(x) || d_k),    KL(p || d) = sum_c p_c log(p_c / d_c),

higher = more ID. The paper forms the templates on held-out validation data;
the reference implementation (ViM's `benchmark.py`, haoqiwang/vim, which
OpenOOD's `kl_matching_postprocessor` copies) on the training features, with
`pairwise_distances_argmin_min(p, templates, metric=kl)`, i.e. the minimum
over every class. Here they come from whatever `fit` is given (the
training features, by the library's convention). A class no fitting sample
is predicted as has no template (the reference code's mean of nothing is
NaN) and is left out of the minimum. Paper and code agree on the score.

Numerics: `KL(p || d_k) = sum p log p - p . log d_k`, one `[batch, classes]
x [classes, classes]` product for all templates; `log p` is the log-softmax
(finite, so a class whose probability underflows adds 0, as the code's
`where(p != 0, ...)`). Templates are float64 means of float64 softmaxes; an
entry that is exactly 0 even so (a softmax underflowing in float64) is floored
at the smallest normal float64 before its log.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from line_jax import _matmul
from line_jax import fold
from line_jax import layout as layout_lib
from line_jax.scorers import _common


@flax.struct.dataclass
class KlmState(_common.HeadState):
  """A fitted KL-matching scorer.

  Attributes:
    weight: `[classes, features]` float32 head weight (class-major, as
      `HeadState`; `kernel` is its transpose).
    bias: `[classes]` float32 head bias.
    log_templates: `[classes, classes]` float32; row k is `log d_k` (zeros
      for a class without a template).
    offsets: `[classes]` float32, 0 for a class with a template, -inf for
      one without (it never wins the minimum).
  """

  log_templates: jax.Array
  offsets: jax.Array


@flax.struct.dataclass
class KlmAcc:
  """KL matching's accumulator.

  Attributes:
    head: the `HeadState`.
    sums: `[classes, classes]` float64; row k sums the softmax of the samples
      predicted as k.
    counts: `[classes]` int64 samples predicted as each class.
  """

  head: _common.HeadState
  sums: jax.Array
  counts: jax.Array


def init(kernel, bias) -> KlmAcc:
  """Starts the templates of the head's classes (head validated)."""
  _, num_classes = _common.check_head(kernel, bias)
  with jax.enable_x64(True):
    return KlmAcc(_common.head_state(kernel, bias),
                  jnp.zeros((num_classes, num_classes), jnp.float64),
                  jnp.zeros((num_classes,), jnp.int64))


@jax.jit
def _add(acc: KlmAcc, features: jax.Array) -> KlmAcc:
  head = acc.head
  z = _matmul.dot(features.astype(jnp.float32), head.weight.T) + head.bias
  num_classes = head.bias.shape[0]
  pred = jnp.argmax(z, axis=1)
  probs = jax.nn.softmax(z.astype(jnp.float64), axis=1)
  return acc.replace(
      sums=acc.sums + jax.ops.segment_sum(probs, pred, num_classes),
      counts=acc.counts + jnp.bincount(pred, length=num_classes).astype(jnp.int64))


def update(acc: KlmAcc, features, labels) -> KlmAcc:
  """Adds a `[batch, features]` batch's softmaxes to their predicted class."""
  del labels
  with jax.enable_x64(True):
    return _add(acc, features)


def finalize(acc: KlmAcc) -> KlmState:
  """The templates' logs (float64 on the host, stored float32)."""
  counts = np.asarray(acc.counts)
  has = counts > 0
  templates = np.asarray(acc.sums) / np.maximum(counts, 1)[:, None]
  log_templates = np.where(has[:, None], np.log(np.maximum(templates, np.finfo(np.float64).tiny)),
                           0.0)
  offsets = np.where(has, 0.0, -np.inf)
  return KlmState(acc.head.weight, acc.head.bias, jnp.asarray(log_templates, jnp.float32),
                  jnp.asarray(offsets, jnp.float32))


FOLD = fold.Fold(init=init, update=update, finalize=finalize,
                 merge=fold.add_fields("sums", "counts"))


@_common.score_jit
def score(state: KlmState, features: jax.Array,
          layout: layout_lib.Layout | None = None) -> jax.Array:
  """`[batch]` minus the smallest KL divergence to a class template; higher = more ID.

  Args:
    state: from `fit`.
    features: `[batch, features]` penultimate activations.
  """
  _common.check_width(features, state.weight.shape[1])
  z, axis = _common.logits(state, features, layout)
  log_p = jax.nn.log_softmax(z, axis=axis)
  p = jnp.exp(log_p)
  neg_entropy = jnp.sum(p * log_p, axis=axis)
  if axis == 0:  # [classes, batch]: templates x probabilities
    cross = _matmul.dot(state.log_templates, p) + state.offsets[:, None]
  else:
    cross = _matmul.dot(p, state.log_templates.T) + state.offsets
  # -min_k (sum p log p - p . log d_k) = max_k p . log d_k - sum p log p
  return jnp.max(cross, axis=axis) - neg_entropy
