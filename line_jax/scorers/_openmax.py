"""OpenMax: logits recalibrated by per-class Weibull models of the distance to the class mean.

Bendale, Boult, "Towards Open Set Deep Networks", CVPR 2016, as OpenOOD
v1.5 runs it (`openood/postprocessors/openmax_postprocessor.py`, commit
99927d9). Fit, on the logits `z = h @ kernel + bias` (the paper's activation
vectors, AVs):

* the mean AV `mu_c` of the training rows of class c that the head classifies
  correctly (`compute_train_score_and_mavs_and_dists`, `torch.argmax(score)
  == t`);
* the distance of each such row to its class mean (OpenOOD's `setup` and
  `postprocess` pass `'euclidean'`; `distance` offers the code's `'cosine'`
  and `'eucos'` = 0.5 euclidean + cosine, scipy's definitions);
* per class, a Weibull fitted to the `tailsize` largest distances as
  `libmr.MR().fit_high(tail, len(tail))` fits it (`fit_weibull`): libmr's
  `FitHigh` / `EvtGeneric` (MetaRecognition.cpp) translates the tail to
  `x = d + 10000 - min(tail)` and `weibull_fit` (weibull.c) solves the
  two-parameter maximum-likelihood equations on `log x` (the extreme-value
  form, `x0 = (log x - max) / range`, root of `sigma + mean(x0) -
  sum x0 e^(x0/sigma) / sum e^(x0/sigma)`); here the same root is found by
  bisection to machine precision (libmr stops at a 1e-6 tolerance). The
  w-score is libmr's `W_score`, `1 - exp(-((d + 10000 - min(tail)) /
  scale)^shape)` (0 for a non-positive translated distance).

Score (`openmax`): with `ranked` the `alpha` classes of largest logit and
`omega = (alpha + 1 - i) / alpha` for the i-th of them (0 elsewhere),
`w_c` the w-score of `d(z, mu_c)`:

    z'_c = z_c (1 - w_c omega_c),   z'_0 = sum_c z_c w_c omega_c,
    p = softmax(z'_1..z'_C, z'_0),
    score(x) = max_{c >= 1} p_c                       (output="known", the default),

the largest known-class probability: what the paper's rule thresholds
(reject where the unknown class wins or the top known probability is below
a threshold). OpenOOD takes `torch.max(conf, dim=1)[0]` over all C + 1
probabilities, the unknown one included (its `postprocess`; `output="max"`),
which scores an input far from every class, certain of the unknown class,
close to 1, as in-distribution as any: we depart from it so that higher
means more ID. `output="unknown"` is minus the unknown probability
(pytorch-ood's `OpenMax` outlier score, `predict_logits(...)[:, 0]`).

Defaults are OpenOOD's (`OpenMax.__init__`, hard-coded: `weibull_tail = 20`,
`weibull_alpha = 3`, euclidean; `configs/postprocessors/openmax.yml` sets
none of them and OpenOOD sweeps nothing). The grid adds the paper's and the
authors' OSDN code's setting (`alpha = 10`, tail 20) and pytorch-ood's tail 25.

Where this differs from the code: the softmax is taken stably (OpenOOD's
`np.exp` of raw logits overflows above 709); a class the fit cannot model
(no correctly classified training row: OpenOOD fails on the empty mean; one
row, or a tail of equal distances: libmr's fit fails and its `W_score`
returns -9999) gets w-score 1 for every input, pytorch-ood's choice for a
class without a model. Ties in the ranking go to the lower class index (as
`jax.lax.top_k`).

Streaming, two passes, memory O(classes^2 + classes x tailsize): pass 1 sums
the float64 logits of the correctly classified rows per class; pass 2 keeps
each class's `tailsize` largest float64 distances (a running top-k, merged
exactly); `finalize` fits the Weibulls in float64 on the host.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from line_jax import _matmul
from line_jax import fold
from line_jax import layout as layout_lib
from line_jax.scorers import _common

TAILSIZE = 20
ALPHA = 3
DISTANCES = ("euclidean", "cosine", "eucos")
OUTPUTS = ("max", "known", "unknown")
# libmr's default `translate_amount` (MetaRecognition.h), kept by pytorch-ood's LibNotMR.
TRANSLATE = 10000.0
_EU_WEIGHT = 0.5  # OpenOOD's eucos weight (`openmax(..., 0.5, ...)`).
_BISECTIONS = 200
# The tuning grid (`python -m line_jax.tune`): OpenOOD's tail and alpha, the
# paper's alpha 10 and pytorch-ood's tail 25.
GRID = {"tailsize": (10, 20, 25, 50), "alpha": (1, 2, 3, 5, 10)}


@flax.struct.dataclass
class OpenmaxState(_common.HeadState):
  """A fitted OpenMax scorer.

  Attributes:
    weight: `[classes, features]` float32 head weight (as `HeadState`).
    bias: `[classes]` float32 head bias.
    means: `[classes, classes]` float32 mean logit vector of each class's
      correctly classified training rows (zeros for a class without one).
    small: `[classes]` float32 smallest distance of each class's tail.
    offset: `[classes]` float32 `log(scale / 10000)` of each class's Weibull
      (scale in libmr's translated units).
    shape: `[classes]` float32 Weibull shape of each class.
    valid: `[classes]` bool, whether the class has a fitted Weibull (else its
      w-score is 1).
    alpha: static number of top classes revised.
    distance: static distance type.
    output: static score output.
  """

  means: jax.Array
  small: jax.Array
  offset: jax.Array
  shape: jax.Array
  valid: jax.Array
  alpha: int = flax.struct.field(pytree_node=False)
  distance: str = flax.struct.field(pytree_node=False)
  output: str = flax.struct.field(pytree_node=False)


@flax.struct.dataclass
class OpenmaxAcc:
  """OpenMax's accumulator.

  Attributes:
    head: the `HeadState`.
    sums: `[classes, classes]` float64 sums of the correct rows' logits (pass 1).
    counts: `[classes]` int64 correct rows per class (pass 1).
    means: `[classes, classes]` float64 class means (set between passes).
    tails: `[classes, tailsize]` float64 largest distances so far, descending,
      -inf where fewer (pass 2).
    stage: static pass index (0 or 1).
    tailsize, alpha, distance, output: static hyperparameters.
  """

  head: _common.HeadState
  sums: jax.Array
  counts: jax.Array
  means: jax.Array
  tails: jax.Array
  stage: int = flax.struct.field(pytree_node=False)
  tailsize: int = flax.struct.field(pytree_node=False)
  alpha: int = flax.struct.field(pytree_node=False)
  distance: str = flax.struct.field(pytree_node=False)
  output: str = flax.struct.field(pytree_node=False)


def _choice(name: str, value, choices: tuple[str, ...]) -> str:
  if not isinstance(value, str) or value not in choices:
    raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
  return value


def init(kernel, bias, *, tailsize=TAILSIZE, alpha=ALPHA, distance="euclidean",
         output="known") -> OpenmaxAcc:
  """Starts OpenMax's fit.

  Args:
    kernel: `[features, classes]` head kernel (Flax layout).
    bias: `[classes]` head bias or None.
    tailsize: largest distances per class the Weibull is fitted to (>= 2).
    alpha: number of top classes whose logits are revised, 1 to classes.
    distance: 'euclidean' (OpenOOD's), 'cosine' or 'eucos'.
    output: 'max' (OpenOOD's: the largest of the C + 1 probabilities),
      'known' (the largest known-class one) or 'unknown' (minus the unknown one).
  """
  _, num_classes = _common.check_head(kernel, bias)
  tailsize = _common.integer("tailsize", tailsize, low=2)
  alpha = _common.integer("alpha", alpha)
  if alpha > num_classes:
    raise ValueError(f"alpha={alpha} must be at most the class count {num_classes}")
  distance = _choice("distance", distance, DISTANCES)
  output = _choice("output", output, OUTPUTS)
  with jax.enable_x64(True):
    zeros = jnp.zeros((num_classes, num_classes), jnp.float64)
    return OpenmaxAcc(_common.head_state(kernel, bias), zeros,
                      jnp.zeros((num_classes,), jnp.int64), zeros,
                      jnp.full((num_classes, tailsize), -jnp.inf, jnp.float64),
                      0, tailsize, alpha, distance, output)


def distances(z: jax.Array, means: jax.Array, kind: str) -> jax.Array:
  """`[...]` distance of logit rows `z [..., C]` to `means [..., C]` (scipy's
  `euclidean`, `cosine`; 'eucos' is 0.5 euclidean + cosine), in their dtype."""
  euclid = jnp.sqrt(jnp.sum(jnp.square(z - means), axis=-1))
  if kind == "euclidean":
    return euclid
  norms = jnp.linalg.norm(z, axis=-1) * jnp.linalg.norm(means, axis=-1)
  tiny = jnp.finfo(z.dtype).tiny
  cosine = 1.0 - jnp.sum(z * means, axis=-1) / jnp.maximum(norms, tiny)
  return cosine if kind == "cosine" else _EU_WEIGHT * euclid + cosine


def _logits(head: _common.HeadState, features: jax.Array) -> jax.Array:
  return _matmul.dot(features.astype(jnp.float32), head.weight.T) + head.bias


@jax.jit
def _add_sums(acc: OpenmaxAcc, features: jax.Array, labels: jax.Array) -> OpenmaxAcc:
  z = _logits(acc.head, features)
  num_classes = z.shape[1]
  correct = jnp.argmax(z, axis=1) == labels
  rows = jnp.where(correct[:, None], z.astype(jnp.float64), 0.0)
  sums = jax.ops.segment_sum(rows, labels, num_segments=num_classes)
  counts = jax.ops.segment_sum(correct.astype(jnp.int64), labels, num_segments=num_classes)
  return acc.replace(sums=acc.sums + sums, counts=acc.counts + counts)


def _top(tails: jax.Array, candidates: jax.Array) -> jax.Array:
  """The `tailsize` largest of both, descending, per class."""
  return jax.lax.top_k(jnp.concatenate([tails, candidates], axis=1), tails.shape[1])[0]


@functools.partial(jax.jit, static_argnames=("kind",))
def _add_tails(acc: OpenmaxAcc, features: jax.Array, labels: jax.Array, kind: str
               ) -> OpenmaxAcc:
  z = _logits(acc.head, features)
  num_classes = z.shape[1]
  correct = jnp.argmax(z, axis=1) == labels
  d = distances(z.astype(jnp.float64), acc.means[labels], kind)
  mine = (labels[None, :] == jnp.arange(num_classes)[:, None]) & correct[None, :]
  return acc.replace(tails=_top(acc.tails, jnp.where(mine, d[None, :], -jnp.inf)))


def update(acc: OpenmaxAcc, features, labels) -> OpenmaxAcc:
  """Pass 1: class sums of the correctly classified logits; pass 2: the tails."""
  labels = jnp.asarray(labels, jnp.int32)
  with jax.enable_x64(True):
    if acc.stage == 0:
      return _add_sums(acc, features, labels)
    return _add_tails(acc, features, labels, acc.distance)


def next_pass(acc: OpenmaxAcc) -> OpenmaxAcc:
  """The class means (float64; zeros for a class without a correct row)."""
  with jax.enable_x64(True):
    means = acc.sums / jnp.maximum(acc.counts, 1).astype(jnp.float64)[:, None]
  return acc.replace(means=means, stage=1)


_top_jit = jax.jit(_top)


def merge(a: OpenmaxAcc, b: OpenmaxAcc) -> OpenmaxAcc:
  """Two disjoint parts of one pass: sums add (pass 1), tails merge (pass 2)."""
  with jax.enable_x64(True):
    if a.stage == 0:
      return a.replace(sums=jnp.asarray(a.sums) + b.sums, counts=jnp.asarray(a.counts) + b.counts)
    return a.replace(tails=_top_jit(jnp.asarray(a.tails), jnp.asarray(b.tails)))


def fit_weibulls(tails: np.ndarray) -> tuple[np.ndarray, ...]:
  """libmr's `FitHigh` of each row of `tails` (its finite entries).

  Args:
    tails: `[classes, tailsize]` float64 distances, -inf where absent.

  Returns:
    `(small, offset, shape, valid)`, `[classes]` each: the tail's smallest
    distance, `log(scale / 10000)`, the shape, and whether the fit exists
    (at least two distinct distances).
  """
  tails = np.asarray(tails, np.float64)
  present = np.isfinite(tails)
  small = np.min(np.where(present, tails, np.inf), axis=1)
  small = np.where(np.isfinite(small), small, 0.0)
  # log(d + 10000 - small) - log(10000), exact near 0.
  u = np.where(present, np.log1p((np.where(present, tails, 0.0) - small[:, None]) / TRANSLATE),
               0.0)
  top = np.max(np.where(present, u, -np.inf), axis=1, initial=-np.inf)
  span = top - 0.0  # the smallest translated value is log1p(0) = 0
  valid = (present.sum(axis=1) >= 2) & (span > 0)
  span_ = np.where(valid, span, 1.0)
  x0 = np.where(present, (u - np.where(valid, top, 0.0)[:, None]) / span_[:, None], 0.0)
  n = np.maximum(present.sum(axis=1), 1)
  mean = x0.sum(axis=1) / n

  def gap(sigma):
    # libmr's `weibull_scale_likelihood`: increasing in sigma, one root in (0, 1].
    e = np.where(present, np.exp(x0 / sigma[:, None]), 0.0)
    return sigma + mean - (x0 * e).sum(axis=1) / e.sum(axis=1)

  lower, upper = np.zeros_like(mean), np.ones_like(mean)
  with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
    for _ in range(_BISECTIONS):
      middle = 0.5 * (lower + upper)
      below = gap(np.where(middle > 0, middle, 1.0)) < 0
      lower, upper = np.where(below, middle, lower), np.where(below, upper, middle)
    sigma = np.where(valid, 0.5 * (lower + upper), 1.0)
    mu_hat = sigma * np.log(
        np.where(present, np.exp(x0 / sigma[:, None]), 0.0).sum(axis=1) / n)
  offset = np.where(valid, span_ * mu_hat + top, 0.0)
  shape = np.where(valid, 1.0 / (span_ * sigma), 1.0)
  return small, offset, shape, valid


def finalize(acc: OpenmaxAcc) -> OpenmaxState:
  """The Weibull fits (float64, host) and the state."""
  small, offset, shape, valid = fit_weibulls(np.asarray(acc.tails))
  valid = valid & (np.asarray(acc.counts) > 0)
  f32 = lambda x: jnp.asarray(np.asarray(x), jnp.float32)
  return OpenmaxState(acc.head.weight, acc.head.bias, f32(acc.means), f32(small), f32(offset),
                      f32(shape), jnp.asarray(valid), acc.alpha, acc.distance, acc.output)


FOLD = fold.Fold(init=init, update=update, finalize=finalize, merge=merge, passes=2,
                 next_pass=next_pass, needs_labels=True)


def w_score(state: OpenmaxState, d: jax.Array, classes: jax.Array) -> jax.Array:
  """libmr's `W_score` of distances `d` under the Weibulls of `classes` (same shape)."""
  u = jnp.log1p((d - state.small[classes]) / TRANSLATE)
  cdf = -jnp.expm1(-jnp.exp(state.shape[classes] * (u - state.offset[classes])))
  cdf = jnp.where(d - state.small[classes] + TRANSLATE > 0, cdf, 0.0)
  return jnp.where(state.valid[classes], cdf, 1.0)


# Up to here the top classes are found by argmax passes; beyond, by `lax.top_k`.
_ARGMAX_PASSES_UP_TO = 16


def top_classes(z: jax.Array, alpha: int) -> tuple[jax.Array, jax.Array]:
  """`(logits, classes)`, each `[batch, alpha]`: the `alpha` largest logits of
  each row of `z [batch, C]`, largest first, ties to the lower class (as
  `lax.top_k`).

  For the alphas OpenMax uses (3 to 10) by `alpha` argmax passes, each
  masking the class it found: XLA's CPU `top_k` sorts every whole row, which
  cost more than the rest of the score together at 100 and 1000 classes.
  """
  if alpha > _ARGMAX_PASSES_UP_TO:
    return jax.lax.top_k(z, alpha)
  classes = jnp.arange(z.shape[1])
  found, masked = [], z
  for _ in range(alpha):
    best = _common.argmax(masked, 1)
    found.append(best)
    masked = jnp.where(classes == best[:, None], -jnp.inf, masked)
  ranked = jnp.stack(found, axis=1)
  return jnp.take_along_axis(z, ranked, axis=1), ranked


@_common.score_jit
def score(state: OpenmaxState, features: jax.Array,
          layout: layout_lib.Layout | None = None) -> jax.Array:
  """`[batch]` OpenMax probability (`state.output`); higher = more ID.

  Args:
    state: from `fit`.
    features: `[batch, features]` penultimate activations.
  """
  del layout  # Batch-major logits on every device: the top classes are gathered per row.
  _common.check_width(features, state.weight.shape[1])
  z = _logits(state, features)
  num_classes = z.shape[1]
  top, ranked = top_classes(z, state.alpha)  # [batch, alpha]
  d = distances(z[:, None, :], state.means[ranked], state.distance)
  omega = (state.alpha - jnp.arange(state.alpha, dtype=jnp.float32)) / state.alpha
  revised = top * w_score(state, d, ranked) * omega  # the part moved to the unknown class
  classes = jnp.arange(num_classes)
  moved = sum(jnp.where(classes == ranked[:, i:i + 1], revised[:, i:i + 1], 0.0)
              for i in range(state.alpha))
  known = z - moved
  unknown = jnp.sum(revised, axis=1)
  total = jnp.logaddexp(jax.nn.logsumexp(known, axis=1), unknown)
  if state.output == "unknown":
    return -jnp.exp(unknown - total)
  best = jnp.max(known, axis=1)
  if state.output == "max":
    best = jnp.maximum(best, unknown)
  return jnp.exp(best - total)
