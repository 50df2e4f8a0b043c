"""LINe scores: clip, predict, mask, energy, in one jitted computation.

The masks depend on the predicted class, so each sample sees its own masked
head. Two exact ways to apply them without a `[batch, classes, features]` or
`[classes, classes, features]` array:

* "grouped": sort the batch by predicted class and walk it in tiles; each class
  present builds its masked head once (`[features, classes]`) and its samples
  go through one matrix product. Work: one head per class present plus one
  batch-sized matmul, so the heavy part runs in BLAS. On CPU, XLA does not fuse
  the dense reduction and would write the whole product to memory (2 GiB at
  the ImageNet head, batch 256), so grouped is the CPU default.
* "dense": one fused masked reduction over features for all samples at once.
  No data-dependent loop; on GPU XLA fuses it into one reduction kernel
  (7.8 MiB temporary at the ImageNet head) and it ran faster than grouped on
  an H200 at every head shape (benchmarks/results/nvidia-h200), so it is the
  default off the CPU.

`line_jax.layout` decides "auto": grouped for the CPU, dense for accelerators.

Both compute the same function; tests check that they agree.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from line_jax import _buckets
from line_jax import _matmul
from line_jax import _scoring
from line_jax import _validation
from line_jax import layout as layout_lib
from line_jax.line._fit import LineState

STRATEGIES = ("auto", "grouped", "dense")


def _tile_rows(batch: int, num_classes: int) -> int:
  # About one tile per class present: fewer rebuilds of a head than tiles,
  # and little padding waste when classes hold only a few samples each.
  rows = 2 ** math.ceil(math.log2(max(1.0, batch / num_classes)))
  return int(min(batch, max(8, rows)))


def _choose(strategy: str, layout: layout_lib.Layout | None) -> str:
  if strategy != "auto":
    return strategy
  return "grouped" if layout_lib.resolve(layout).cpu else "dense"


def _masked_head(kernel: jax.Array, weight_floor: jax.Array, cls: jax.Array) -> jax.Array:
  """`[features, classes]` head of predicted class `cls`, dropped weights zeroed."""
  return jnp.where(kernel > weight_floor[cls][:, None], kernel, 0.0)


def _walk(kernel, weight_floor, cls, batch: int, tile: int, step, acc):
  """Walks a class-sorted batch tile by tile, one masked head per class run.

  `cls` is `[batch + tile]` (padded with -1); `step(start, c, mine, head, acc)`
  handles the rows `[start, start + tile)`, of which `mine` (`[tile]` bool)
  are of class `c` whose masked head is `head`; the walk then moves past them.
  """

  def body(carry):
    start, head_cls, head, acc = carry
    c = cls[start]
    head = jax.lax.cond(c == head_cls, lambda: head,
                        lambda: _masked_head(kernel, weight_floor, c))
    mine = jax.lax.dynamic_slice_in_dim(cls, start, tile) == c
    return start + jnp.sum(mine), c, head, step(start, c, mine, head, acc)

  first = cls[0]
  init = (jnp.int32(0), first, _masked_head(kernel, weight_floor, first), acc)
  return jax.lax.while_loop(lambda carry: carry[0] < batch, body, init)[3]


def _sorted(pred: jax.Array, tile: int, *rows: jax.Array):
  """The batch order by class, the padded sorted classes and `rows` in that order."""
  order = jnp.argsort(pred, stable=True)
  cls = jnp.pad(pred[order], (0, tile), constant_values=-1)
  return order, cls, [jnp.pad(r[order], ((0, tile), (0, 0))) for r in rows]


def _grouped_forward(kernel, weight_floor, kept, pred) -> jax.Array:
  batch, num_classes = kept.shape[0], kernel.shape[1]
  tile = _tile_rows(batch, num_classes)
  order, cls, (rows,) = _sorted(pred, tile, kept)

  def step(start, c, mine, head, out):
    del c, mine  # Rows of later classes in this tile get overwritten in their turn.
    block = jax.lax.dynamic_slice_in_dim(rows, start, tile)
    return jax.lax.dynamic_update_slice_in_dim(out, _matmul.dot(block, head), start, 0)

  out = _walk(kernel, weight_floor, cls, batch, tile, step,
              jnp.zeros((batch + tile, num_classes), kept.dtype))
  return jnp.zeros((batch, num_classes), kept.dtype).at[order].set(out[:batch])


# The walk is a `while_loop`, which reverse mode cannot differentiate; its
# gradient is another walk over the same groups (exact: within a group the
# logits are one matrix product), so LINe's score has a gradient on the CPU
# as it has on accelerators (dense), without a `[batch, features, classes]`.
# A custom VJP has no forward mode: `jax.jvp` / `jacfwd` take strategy="dense".
@jax.custom_vjp
def _grouped_logits(kernel, weight_floor, kept, pred) -> jax.Array:
  """`[batch, classes]` logits `kept[b] @ masked_head(pred[b])`, grouped by class."""
  return _grouped_forward(kernel, weight_floor, kept, pred)


def _grouped_fwd(kernel, weight_floor, kept, pred):
  return _grouped_forward(kernel, weight_floor, kept, pred), (kernel, weight_floor, kept, pred)


def _grouped_bwd(residuals, grad):
  kernel, weight_floor, kept, pred = residuals
  batch, num_classes = kept.shape[0], kernel.shape[1]
  tile = _tile_rows(batch, num_classes)
  order, cls, (rows, grads) = _sorted(pred, tile, kept, grad)

  def step(start, c, mine, head, acc):
    d_rows, d_kernel = acc
    g = jax.lax.dynamic_slice_in_dim(grads, start, tile)
    x = jnp.where(mine[:, None], jax.lax.dynamic_slice_in_dim(rows, start, tile), 0.0)
    d_rows = jax.lax.dynamic_update_slice_in_dim(d_rows, _matmul.dot(g, head.T), start, 0)
    keep = kernel > weight_floor[c][:, None]
    return d_rows, d_kernel + jnp.where(keep, _matmul.dot(x.T, g), 0.0)

  init = (jnp.zeros_like(rows), jnp.zeros_like(kernel))
  d_rows, d_kernel = _walk(kernel, weight_floor, cls, batch, tile, step, init)
  d_kept = jnp.zeros_like(kept).at[order].set(d_rows[:batch])
  # The floors are thresholds: zero gradient almost everywhere; classes are integers.
  return (d_kernel, jnp.zeros_like(weight_floor), d_kept,
          np.zeros(pred.shape, jax.dtypes.float0))


_grouped_logits.defvjp(_grouped_fwd, _grouped_bwd)


def _dense_logits(state: LineState, kept: jax.Array, pred: jax.Array) -> jax.Array:
  kernel = state.kernel[None]  # [1, features, classes]
  floor = state.weight_floor[pred][:, :, None]  # [batch, features, 1]
  terms = jnp.where(kernel > floor, kernel * kept[:, :, None], 0.0)
  return jnp.sum(terms, axis=1)


def _method(state: LineState, features: jax.Array, layout: layout_lib.Layout | None = None, *,
            strategy: str = "auto") -> jax.Array:
  """LINe scores; higher = more in-distribution.

  Args:
    state: from `fit`.
    features: `[batch, features]` pooled penultimate activations.
    layout: `line_jax.layout.CPU` or `ACCELERATOR` (None: the default
      backend's); "auto" is grouped on the CPU, dense elsewhere.
    strategy: "auto", "grouped" or "dense"; all give the same scores.

  Returns:
    `[batch]` float32 energies `logsumexp(masked logits)`.
  """
  # Shapes are static: this check runs once per compilation, on the host.
  _validation.feature_shape(features.shape, state.num_features)
  if strategy not in STRATEGIES:
    raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
  clipped = jnp.minimum(features.astype(jnp.float32), state.clip)
  pred = jnp.argmax(_matmul.dot(clipped, state.kernel) + state.bias, axis=-1)
  kept = jnp.where(state.neuron_mask[pred], clipped, 0.0)
  if _choose(strategy, layout) == "grouped":
    logits = _grouped_logits(state.kernel, state.weight_floor, kept, pred)
  else:
    logits = _dense_logits(state, kept, pred)
  return jax.nn.logsumexp(logits + state.bias, axis=-1)


_score = _scoring.jit(_method, static_argnames=("strategy", "layout"))
# Padded to a bucket of rows (`line_jax._buckets`): O(log batch) compilations
# for a stream of batch sizes; `score.__wrapped__` is the jitted function.
score = _buckets.bucketed(_score)
