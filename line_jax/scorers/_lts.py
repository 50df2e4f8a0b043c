"""LTS: logit scaling by a per-sample factor from the activations, then energy.

Djurisic, Liu, Nikolic, "Logit Scaling for Out-of-Distribution Detection",
arXiv:2409.01175, 2024 (Machine Vision and Applications, 2025). With `h` the
penultimate activations of a sample (n of them) and
`k = max(1, n - round(n p / 100))`,

    S(h) = (sum_i h_i / sum of the k largest h_i)^2,
    score(x) = logsumexp(S(h) * (h @ kernel + bias)),

higher = more ID. The official code (andrijazz/lts at cdac6fa, `lts.py`,
lines 63-73, `lts(x, percentile)`) computes `S`; the networks multiply the
logits by it (`models/vit.py`, `x = self.heads(x); x = x * s`) and
`ood_eval.py` scores them by energy (`get_energy_score`:
`torch.logsumexp(logits, dim=1)`). Nothing is fitted, and unlike ASH and
SCALE the features reach the head unchanged. Default p = 95: every LTS
configuration of the official code (`config/*_config.yml`: `lts@95`, for
ResNet-50, MobileNetV2, DenseNet, ViT, Swin, MLP-Mixer, CIFAR-100) and
pytorch-ood's `LTS(p=0.05)`. The official code has no sweep; the grid is
OpenOOD's sweep of the two shaping methods the official `lts.py` sits next
to (ASH and SCALE, `percentile_list: [65, ..., 95]`).

Paper and code: the stored official `lts` applies no ReLU (pytorch-ood's
later `LTS` adds one, saying the official code does); post-ReLU features,
the CNNs the paper studies, are unaffected either way. This follows
`lts.py` as stored: features are used as given. Where the kept sum is 0
(a row of all zeros) the factor is 1, plain energy, where the official
code would divide by zero. Likewise `k` is at least 1, as in pytorch-ood's
`LTS`: where `n p / 100` rounds to n (10 features or fewer at p = 95, or
p = 100) the official code would sum no activation; here the largest is kept.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from line_jax import _validation
from line_jax import fold
from line_jax import layout as layout_lib
from line_jax.scorers import _common
from line_jax.scorers import _select
from line_jax.scorers import _shaping

PERCENTILE = 95.0
# The tuning grid (`python -m line_jax.tune`).
GRID = {"percentile": (65.0, 70.0, 75.0, 80.0, 85.0, 90.0, 95.0)}


@flax.struct.dataclass
class LtsState(_shaping.ShapingState):
  """LTS's fitted state: the head, the percentile and the kept count
  `kept_count(features, percentile)` (the fields of `ShapingState`, leaves
  that stack over a grid)."""


def kept_count(num_features: int, percentile: float) -> int:
  """`max(1, n - round(n p / 100))`: the official code's k, at least 1."""
  return max(1, _shaping.kept_count(num_features, percentile))


def init(kernel, bias, *, percentile=PERCENTILE) -> LtsState:
  """Checks the head and the percentile; the state.

  Args:
    kernel: `[features, classes]` head kernel (Flax layout).
    bias: `[classes]` head bias or None.
    percentile: in [0, 100]; the `k = max(1, n - round(n p / 100))` largest
      activations make the denominator (0: all of them, so LTS is Energy).
  """
  num_features, _ = _common.check_head(kernel, bias)
  p = _validation.percentile("percentile", percentile)
  head = _common.head_state(kernel, bias)
  return LtsState(head.weight, head.bias, jnp.asarray(p, jnp.float32),
                  jnp.asarray(kept_count(num_features, p), jnp.int32))


FOLD = fold.head_fold(init)


def scale_factor(h: jax.Array, kept, *, unroll: bool | None = None) -> jax.Array:
  """`[batch]` `(sum(h) / sum of the kept largest h)^2` of float32 `[batch, n]` `h`;
  1 where the kept sum is 0."""
  top = _shaping.top_k_sum(h, kept, unroll=unroll)
  ratio = jnp.sum(h, axis=1) / jnp.where(top == 0, 1.0, top)
  return jnp.square(jnp.where(top == 0, 1.0, ratio))


@_common.score_jit
def score(state: LtsState, features: jax.Array,
          layout: layout_lib.Layout | None = None) -> jax.Array:
  """`[batch]` energies of the logits scaled by `S(h)`; higher = more ID.

  Args:
    state: from `fit` (the head and the percentile).
    features: `[batch, features]` penultimate activations.
  """
  _common.check_width(features, state.weight.shape[1])
  h = features.astype(jnp.float32)
  factor = scale_factor(h, state.kept, unroll=_select.unrolled(layout))
  z, axis = _common.logits(state, h, layout)
  return _common.energy(z * jnp.expand_dims(factor, axis), axis)
