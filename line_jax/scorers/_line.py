"""LINe as a registered scorer: `line_jax.line` under the common interface.

Ahn, Park, Kim, "LINe: Out-of-Distribution Detection by Leveraging Important
Neurons", CVPR 2023. Defaults are the paper's ImageNet ResNet-50 settings,
p_w = 10, p_a = 10, clip = 0.8 (CIFAR-10: 90, 90, 1.0; CIFAR-100: 90, 10,
1.0). Setting p_w, p_a or clip to None switches that part off; all three off
is Energy.
"""

from __future__ import annotations

import numpy as np

from line_jax import _validation
from line_jax import line
from line_jax.line import _contributions
from line_jax.scorers import _common

P_W = 10.0
P_A = 10.0
CLIP = 0.8


def fit(features, labels, kernel, bias, *, p_w=P_W, p_a=P_A, clip=CLIP) -> line.LineState:
  """`line_jax.line.fit`; see there. Labels are required."""
  if labels is None:
    raise ValueError("labels are required: LINe fits per-class contributions")
  return line.fit(features, labels, kernel, bias, p_w=p_w, p_a=p_a, clip=clip)


def fit_from_batches(batches, kernel, bias, *, p_w=P_W, p_a=P_A, clip=CLIP) -> line.LineState:
  """`fit` over `(features, labels)` batches: contributions stream in one pass."""
  num_features, num_classes = _common.check_head(kernel, bias)
  # Fail before the pass over the data, not after it.
  _validation.percentile("p_w", p_w, allow_none=True)
  _validation.percentile("p_a", p_a, allow_none=True)
  _validation.positive("clip", clip, allow_none=True)
  acc = line.init_sums(num_classes, num_features)
  for features, labels in _common.batches_of(batches):
    _common.check_batch(features, labels, num_features, num_classes, needs_labels=True)
    acc = _contributions.add_batch(acc, features, labels, kernel)  # checked just above
  if not np.asarray(acc.counts).any():
    raise _common.no_batches()
  contrib = line.finalize_sums(acc)
  return line.fit_from_contributions(contrib, kernel, bias, p_w=p_w, p_a=p_a, clip=clip)


# Already jitted; `[batch]` LINe energies, higher = more ID.
score = line.score
