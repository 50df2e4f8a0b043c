"""WeiPer+KLD: densities of the features and of randomly perturbed class projections.

Granz, Heurich, Landgraf, "WeiPer: OOD Detection using Weight Perturbations
of Class Projections", NeurIPS 2024; the authors' OpenOOD integration
(`openood/postprocessors/weiper_kldiv/utils.py` and
`weiper_kldiv_postprocessor.py`, github.com/mgranz/weiper, as imported in
omah03/weiper commit f3cdf25), defaults from its
`configs/postprocessors/weiper_kldiv.yml` (the results they submitted to
OpenOOD, issue #270).

The perturbed head (`calculate_weiper_space`, `noise_proportional` and
`constant_length` on): `n_repeats` copies of the head, each class row moved
by a random direction of length `perturbation_distance` times its own norm,

    W~_rc = W_c + delta ||W_c|| u_rc / ||u_rc||,   u_rc ~ N(0, I),

with the head's bias; its `n_repeats x classes` logits are the WeiPer space.
A row's *density* over a set of its values (`batch_histogram` via
`calculate_density`, `probability=True`) is the fraction of them in each of
`n_bins` equal bins between the training minimum and maximum (`linspace(min,
max + 1e-8, n_bins + 1)` in float32; values outside the bins count in the
total only). The fit (`setup`, `exact_minmax: true`) takes the global min and
max of the training features and of their WeiPer logits, then the mean
density `p` of the training rows, of each set. The score
(`calculate_WeiPerKLDiv_score`) of a row with feature density `q_f`,
WeiPer density `q_p` and `msp` the mean over repeats of the perturbed heads'
maximum softmax probability:

    KL(p, q; s, eps) = sum (p' - q') (log p' - log q'),
        p' = (p + eps) / sum(p + eps),  q' = (S_s q + eps) / sum(S_s q + eps),
    score(x) = -(KL(p_f, q_f; s1, eps1) + lambda_1 KL(p_p, q_p; s2, eps2) - lambda_2 msp),

the symmetric KL divergence (`kldiv`, `symmetric=True`) after smoothing the
row's density by `UniformKernel`: a moving mean of `s` bins, PyTorch's
`padding='same'` with `'replicate'` padding ((s - 1) // 2 bins before, the
rest after). Higher = more ID. Defaults: the yml's `n_repeats: 100`,
`perturbation_distance: 1.8`, `n_bins: 100`, `smoothing: 4`,
`smoothing_perturbed: 15`, `lambda_1: 2.5`, `lambda_2: 0.1`; the function's
`epsilon=0.01`, `epsilon_noise=0.025`. The paper's definition, and the code's.

Where this differs from the code: the perturbation is drawn once, seeded
(`seed`; NumPy's PCG64 standard normals, one `[classes, features]` draw per
repeat), and kept in the state; the code's postprocessor passes it as
`W_tilde=`, which `calculate_WeiPerKLDiv_score` does not take (its parameter
is `perturbed_fc`), so each of its calls draws a new one. The training mean
density is the mean over all rows (the code averages per-batch means, the
same for equal batches). The grid sweeps the yml's `lambda_1_list` and
`lambda_2_list`; its full sweep (also n_bins, perturbation_distance and both
smoothings, 3,600 points) refits each point, ours keeps the rest at the
defaults.

Streaming, two passes, memory independent of the sample count: pass 1 the
four scalar extremes, pass 2 the `n_bins` float64 sums of each density (merged
by addition). Scores walk the repeats a few at a time, about
`COLUMNS_PER_STEP` logits of each row a step (the code materialises
`[n, n_repeats x classes]`), accumulating bin counts by scatter-add. The
state holds the perturbed head, `n_repeats x classes x features` float32
(20 MB for CIFAR-100's ResNet-18 head, 820 MB for ResNet-50 on ImageNet at
the default 100 repeats).
"""

from __future__ import annotations

import numbers

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from line_jax import _matmul
from line_jax import fold
from line_jax import layout as layout_lib
from line_jax.scorers import _common

N_REPEATS = 100
PERTURBATION_DISTANCE = 1.8
N_BINS = 100
SMOOTHING = 4
SMOOTHING_PERTURBED = 15
LAMBDA_1 = 2.5
LAMBDA_2 = 0.1
EPSILON = 0.01
EPSILON_NOISE = 0.025
# Logit columns per step of the walk over the repeats: several repeats of a
# small head in one product (100 single-repeat steps of a 10-class head were
# each too small to keep the CPU busy), one repeat at a time of a wide head.
COLUMNS_PER_STEP = 1024
_UPPER_EPS = np.float32(1e-8)  # `batch_histogram`'s `max + eps`, in float32
# The tuning grid (`python -m line_jax.tune`): the yml's lambda lists.
GRID = {"lambda_1": (0.1, 1.0, 2.5, 4.0), "lambda_2": (0.1, 0.25, 1.0, 2.5, 5.0)}


@flax.struct.dataclass
class WeiperState:
  """A fitted WeiPer+KLD scorer.

  Attributes:
    perturbed: `[repeats, classes, features]` float32 perturbed head weights.
    bias: `[classes]` float32 head bias (every repeat's).
    edges_features: `[n_bins + 1]` float32 bin edges of the features.
    edges_perturbed: `[n_bins + 1]` float32 bin edges of the perturbed logits.
    reference_features: `[n_bins]` float32 normalised `p_f + eps1`.
    reference_perturbed: `[n_bins]` float32 normalised `p_p + eps2`.
    epsilon, epsilon_noise, lambda_1, lambda_2: float32 scalars.
    smoothing: static bins of the feature density's moving mean.
    smoothing_perturbed: static bins of the perturbed-logit density's.
  """

  perturbed: jax.Array
  bias: jax.Array
  edges_features: jax.Array
  edges_perturbed: jax.Array
  reference_features: jax.Array
  reference_perturbed: jax.Array
  epsilon: jax.Array
  epsilon_noise: jax.Array
  lambda_1: jax.Array
  lambda_2: jax.Array
  smoothing: int = flax.struct.field(pytree_node=False)
  smoothing_perturbed: int = flax.struct.field(pytree_node=False)


@flax.struct.dataclass
class WeiperAcc:
  """WeiPer's accumulator.

  Attributes:
    perturbed: `[repeats, classes, features]` float32 perturbed head weights.
    bias: `[classes]` float32 head bias.
    low: `[2]` float32 minimum of the features and of the perturbed logits (pass 1).
    high: `[2]` float32 maximum of each (pass 1).
    edges_features, edges_perturbed: `[n_bins + 1]` float32 (set between passes).
    sums_features, sums_perturbed: `[n_bins]` float64 sums of the rows' densities (pass 2).
    count: int64 scalar, rows of pass 2.
    stage: static pass index (0 or 1).
    settings: static `(smoothing, smoothing_perturbed, epsilon, epsilon_noise,
      lambda_1, lambda_2)`.
  """

  perturbed: jax.Array
  bias: jax.Array
  low: jax.Array
  high: jax.Array
  edges_features: jax.Array
  edges_perturbed: jax.Array
  sums_features: jax.Array
  sums_perturbed: jax.Array
  count: jax.Array
  stage: int = flax.struct.field(pytree_node=False)
  settings: tuple = flax.struct.field(pytree_node=False)


def perturbed_weights(kernel, n_repeats: int, perturbation_distance: float, seed: int
                      ) -> np.ndarray:
  """`[repeats, classes, features]` float32 `W_c + delta ||W_c|| u / ||u||`.

  `u` is drawn per repeat as `[classes, features]` NumPy PCG64 standard
  normals of `seed` (the code's `torch.randn_like(fc.weight)` per repeat),
  normalised as `F.normalize` (norm floored at 1e-12); float64, then float32.
  """
  weight = np.asarray(kernel, np.float64).T
  norms = np.linalg.norm(weight, axis=1, keepdims=True)
  rng = np.random.default_rng(seed)
  out = np.empty((n_repeats, *weight.shape), np.float32)
  for r in range(n_repeats):
    u = rng.standard_normal(weight.shape)
    u /= np.maximum(np.linalg.norm(u, axis=1, keepdims=True), 1e-12)
    out[r] = weight + perturbation_distance * norms * u
  return out


def _real(name: str, value, *, positive: bool = False) -> float:
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
  value = float(value)
  if not np.isfinite(value) or value < 0 or (positive and value == 0):
    raise ValueError(f"{name} must be {'positive' if positive else 'non-negative'} and finite, "
                     f"got {value}")
  return value


def init(kernel, bias, *, n_repeats=N_REPEATS, perturbation_distance=PERTURBATION_DISTANCE,
         n_bins=N_BINS, smoothing=SMOOTHING, smoothing_perturbed=SMOOTHING_PERTURBED,
         lambda_1=LAMBDA_1, lambda_2=LAMBDA_2, epsilon=EPSILON, epsilon_noise=EPSILON_NOISE,
         seed=0) -> WeiperAcc:
  """Starts WeiPer's fit: draws the perturbed head.

  Args:
    kernel: `[features, classes]` head kernel (Flax layout).
    bias: `[classes]` head bias or None.
    n_repeats: perturbed copies of the head (r).
    perturbation_distance: delta, the perturbation's length relative to each
      class row's norm (>= 0).
    n_bins: bins of each density.
    smoothing: bins of the moving mean of the feature density (s1).
    smoothing_perturbed: bins of that of the perturbed-logit density (s2).
    lambda_1: weight of the perturbed-logit KL divergence (>= 0).
    lambda_2: weight of the perturbed heads' mean MSP (>= 0).
    epsilon: added to both feature densities (> 0).
    epsilon_noise: added to both perturbed-logit densities (> 0).
    seed: seed of the perturbation.
  """
  _common.check_head(kernel, bias)
  n_repeats = _common.integer("n_repeats", n_repeats)
  perturbation_distance = _real("perturbation_distance", perturbation_distance)
  n_bins = _common.integer("n_bins", n_bins)
  smoothing = _common.integer("smoothing", smoothing)
  smoothing_perturbed = _common.integer("smoothing_perturbed", smoothing_perturbed)
  settings = (smoothing, smoothing_perturbed, _real("epsilon", epsilon, positive=True),
              _real("epsilon_noise", epsilon_noise, positive=True), _real("lambda_1", lambda_1),
              _real("lambda_2", lambda_2))
  seed = _common.integer("seed", seed, low=0)
  head = _common.head_state(kernel, bias)
  edges = jnp.zeros((n_bins + 1,), jnp.float32)
  with jax.enable_x64(True):
    sums = jnp.zeros((n_bins,), jnp.float64)
    return WeiperAcc(
        jnp.asarray(perturbed_weights(kernel, n_repeats, perturbation_distance, seed)),
        head.bias, jnp.full((2,), jnp.inf, jnp.float32), jnp.full((2,), -jnp.inf, jnp.float32),
        edges, edges, sums, sums, jnp.zeros((), jnp.int64), 0, settings)


def repeats_per_step(repeats: int, classes: int) -> int:
  """Repeats whose logits one step of the walk computes: the largest divisor
  of `repeats` with at most `COLUMNS_PER_STEP` logit columns (at least 1)."""
  want = max(1, COLUMNS_PER_STEP // classes)
  return max(d for d in range(1, min(want, repeats) + 1) if repeats % d == 0)


def _perturbed_logits(perturbed, bias, h, step):
  """Folds `step(carry, logits [batch, r, classes])` over the repeats, r at a
  time (`repeats_per_step`): one product of `r x classes` columns a step."""
  repeats, classes, num_features = perturbed.shape
  r = repeats_per_step(repeats, classes)
  blocks = perturbed.reshape(repeats // r, r * classes, num_features)

  def body(carry, weight):
    logits = _matmul.dot(h, weight.T).reshape(h.shape[0], r, classes) + bias
    return step(carry, logits), None
  return lambda carry: jax.lax.scan(body, carry, blocks)[0]


@jax.jit
def _extremes(acc: WeiperAcc, features: jax.Array) -> WeiperAcc:
  h = features.astype(jnp.float32)
  fold_over = _perturbed_logits(acc.perturbed, acc.bias, h,
                                lambda c, z: (jnp.minimum(c[0], jnp.min(z)),
                                              jnp.maximum(c[1], jnp.max(z))))
  low, high = fold_over((acc.low[1], acc.high[1]))
  return acc.replace(low=jnp.stack([jnp.minimum(acc.low[0], jnp.min(h)), low]),
                     high=jnp.stack([jnp.maximum(acc.high[0], jnp.max(h)), high]))


def bin_index(values: jax.Array, edges: jax.Array) -> jax.Array:
  """`searchsorted(edges, values, side="right")` (int32, the count of edges
  `<= v`) for finite `values` and increasing, evenly spaced `edges` (`edges()`).

  The spacing gives each value's bin by one multiplication, within one of
  the right one under rounding, and a comparison with the edges on either
  side corrects it. Where it cannot (edges closer than the rounding,
  as when the whole range is a few float32 steps) the binary search runs.
  """
  n = edges.shape[0] - 1
  guess = jnp.floor((values - edges[0]) * (n / (edges[-1] - edges[0])))
  index = jnp.clip(jnp.nan_to_num(guess, nan=-1.0), -1, n).astype(jnp.int32) + 1
  # bounds[i] is edges[i - 1], with -inf and inf beyond: bin i is [bounds[i], bounds[i + 1]).
  bounds = jnp.concatenate([jnp.full((1,), -jnp.inf, edges.dtype), edges,
                            jnp.full((1,), jnp.inf, edges.dtype)])
  index = jnp.where(values < bounds[index], index - 1, index)
  index = jnp.where(values >= bounds[index + 1], index + 1, index)
  exact = jnp.all((bounds[index] <= values) & (values < bounds[index + 1]))
  return jax.lax.cond(exact, lambda: index,
                      lambda: jnp.searchsorted(edges, values, side="right").astype(jnp.int32))


def counts(values: jax.Array, edges: jax.Array) -> jax.Array:
  """`[batch, n_bins + 2]` float32 counts of each row of `values` (`[batch, ...]`)
  per bin: below the first edge, `edges[k] <= v < edges[k + 1]`, at or above
  the last (`edges()`'s evenly spaced edges)."""
  values = values.reshape(values.shape[0], -1)
  index = bin_index(values, edges)
  rows = jax.lax.broadcasted_iota(jnp.int32, index.shape, 0)
  return jnp.zeros((values.shape[0], edges.shape[0] + 1), jnp.float32).at[rows, index].add(1.0)


def densities(perturbed, bias, edges_features, edges_perturbed, features
              ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`([batch, n_bins], [batch, n_bins], [batch])`: each row's density of its
  features, of its perturbed logits, and the perturbed heads' mean MSP."""
  h = features.astype(jnp.float32)
  repeats, classes, _ = perturbed.shape
  def step(carry, z):
    hist, msp = carry
    msp_z = jnp.sum(jnp.max(jax.nn.softmax(z, axis=2), axis=2), axis=1)
    return hist + counts(z, edges_perturbed), msp + msp_z
  start = (jnp.zeros((h.shape[0], edges_perturbed.shape[0] + 1), jnp.float32),
           jnp.zeros((h.shape[0],), jnp.float32))
  hist, msp = _perturbed_logits(perturbed, bias, h, step)(start)
  feature_density = counts(h, edges_features)[:, 1:-1] / h.shape[1]
  return feature_density, hist[:, 1:-1] / (repeats * classes), msp / repeats


@jax.jit
def _add_densities(acc: WeiperAcc, features: jax.Array) -> WeiperAcc:
  dens_f, dens_p, _ = densities(acc.perturbed, acc.bias, acc.edges_features,
                                acc.edges_perturbed, features)
  return acc.replace(sums_features=acc.sums_features + jnp.sum(dens_f.astype(jnp.float64), 0),
                     sums_perturbed=acc.sums_perturbed + jnp.sum(dens_p.astype(jnp.float64), 0),
                     count=acc.count + features.shape[0])


def update(acc: WeiperAcc, features, labels) -> WeiperAcc:
  """Pass 1: the extremes; pass 2: the sums of the rows' densities."""
  del labels
  with jax.enable_x64(True):
    if acc.stage == 0:
      return _extremes(acc, features)
    return _add_densities(acc, features)


def edges(low, high, n_bins: int) -> np.ndarray:
  """`[n_bins + 1]` float32 edges as the code's `linspace(min, max + 1e-8,
  n_bins + 1)`: `min + (arange / n_bins) * (max + 1e-8 - min)`, in float32."""
  low, high = np.float32(low), np.float32(high) + _UPPER_EPS
  steps = np.arange(n_bins + 1, dtype=np.float32) / np.float32(n_bins)
  return (low + steps * (high - low)).astype(np.float32)


def next_pass(acc: WeiperAcc) -> WeiperAcc:
  """The bin edges of both densities."""
  n_bins = acc.sums_features.shape[0]
  low, high = np.asarray(acc.low), np.asarray(acc.high)
  return acc.replace(edges_features=jnp.asarray(edges(low[0], high[0], n_bins)),
                     edges_perturbed=jnp.asarray(edges(low[1], high[1], n_bins)), stage=1)


def merge(a: WeiperAcc, b: WeiperAcc) -> WeiperAcc:
  """Two disjoint parts of one pass: extremes (pass 1), density sums (pass 2)."""
  if a.stage == 0:
    return a.replace(low=jnp.minimum(jnp.asarray(a.low), b.low),
                     high=jnp.maximum(jnp.asarray(a.high), b.high))
  with jax.enable_x64(True):
    return a.replace(sums_features=jnp.asarray(a.sums_features) + b.sums_features,
                     sums_perturbed=jnp.asarray(a.sums_perturbed) + b.sums_perturbed,
                     count=jnp.asarray(a.count) + b.count)


def smoother(n_bins: int, size: int) -> np.ndarray:
  """`[n_bins, n_bins]` `S` with `q @ S` the moving mean of `size` bins under
  PyTorch's `padding='same'`, `padding_mode='replicate'` (`UniformKernel`)."""
  before = (size - 1) // 2
  out = np.zeros((n_bins, n_bins))
  for i in range(n_bins):
    for j in range(i - before, i - before + size):
      out[min(max(j, 0), n_bins - 1), i] += 1.0 / size
  return out


def _reference(sums: np.ndarray, count: int, eps: float) -> np.ndarray:
  p = np.asarray(sums, np.float64) / count + eps
  return p / p.sum()


def finalize(acc: WeiperAcc) -> WeiperState:
  """The normalised training densities and the state."""
  count = int(acc.count)
  if acc.stage < 1 or count == 0:
    raise ValueError("WeiPer reads the training batches twice: its second pass saw no sample")
  smoothing, smoothing_perturbed, eps, eps_noise, lambda_1, lambda_2 = acc.settings
  f32 = lambda x: jnp.asarray(np.asarray(x, np.float64), jnp.float32)
  return WeiperState(
      acc.perturbed, acc.bias, acc.edges_features, acc.edges_perturbed,
      f32(_reference(acc.sums_features, count, eps)),
      f32(_reference(acc.sums_perturbed, count, eps_noise)),
      f32(eps), f32(eps_noise), f32(lambda_1), f32(lambda_2), smoothing, smoothing_perturbed)


FOLD = fold.Fold(init=init, update=update, finalize=finalize, merge=merge, passes=2,
                 next_pass=next_pass)


def kl_divergence(reference: jax.Array, density: jax.Array, smoothing: int, eps) -> jax.Array:
  """`[batch]` symmetric KL divergence of the normalised `reference` and each
  row's density smoothed over `smoothing` bins, floored and normalised."""
  smooth = jnp.asarray(smoother(density.shape[1], smoothing), jnp.float32)  # a constant
  q = _matmul.dot(density, smooth) + eps
  q = q / jnp.sum(q, axis=1, keepdims=True)
  return jnp.sum((reference - q) * (jnp.log(reference) - jnp.log(q)), axis=1)


@_common.score_jit
def score(state: WeiperState, features: jax.Array,
          layout: layout_lib.Layout | None = None) -> jax.Array:
  """`[batch]` `-(KL_f + lambda_1 KL_p - lambda_2 msp)`; higher = more ID.

  Args:
    state: from `fit`.
    features: `[batch, features]` penultimate activations.
  """
  del layout  # One block of repeats after another, the same on every device.
  _common.check_width(features, state.perturbed.shape[2])
  dens_f, dens_p, msp = densities(state.perturbed, state.bias, state.edges_features,
                                  state.edges_perturbed, features)
  kl_f = kl_divergence(state.reference_features, dens_f, state.smoothing, state.epsilon)
  kl_p = kl_divergence(state.reference_perturbed, dens_p, state.smoothing_perturbed,
                       state.epsilon_noise)
  return -(kl_f + state.lambda_1 * kl_p - state.lambda_2 * msp)
