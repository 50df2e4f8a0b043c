"""Straightforward PyTorch versions of the bank scorers Relation and CFOOD.

As `benchmarks/torch_baselines.py` (whose `_Head`, `_tensor` and `score`
these reuse): each method written as a careful PyTorch user would, batched,
in eval mode under `no_grad`, on the parameters of the line_jax state it is
built from; higher = more ID; `[batch, features]` to `[batch]`.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from benchmarks import torch_baselines

_Head = torch_baselines._Head  # pylint: disable=protected-access
_tensor = torch_baselines._tensor  # pylint: disable=protected-access
score = torch_baselines.score  # `score(module, features)`: NumPy `[batch]` scores


def _rows(x, size: int) -> np.ndarray:
  """The `size` real rows of a `[blocks, block_rows, ...]` bank."""
  x = np.asarray(x)
  return x.reshape(-1, *x.shape[2:])[:size]


class Relation(_Head):
  """The sum of `(max(z . z_i, 0) p . p_i) ** power` over relations above the
  threshold, as OpenOOD's `get_relation` computes it."""

  def __init__(self, kernel, bias, bank, probs, power, threshold):
    super().__init__(kernel, bias)
    self.register_buffer("bank", _tensor(bank))  # normalised rows
    self.register_buffer("probs", _tensor(probs))  # their softmax outputs
    self.power, self.threshold = float(power), float(threshold)

  def forward(self, h):
    z = h / ((h ** 2).sum(dim=1, keepdim=True) + 1e-10).sqrt()
    p = torch.softmax(self.fc(h), dim=1)
    rel = (z @ self.bank.T).clamp(min=0.0) * (p @ self.probs.T)
    kept = rel * (rel.abs() > self.threshold)
    return (kept.sign() * kept.abs() ** self.power).sum(dim=1)


class CFOOD(nn.Module):
  """Minus the smallest k-fraction kappa at which at least the share `k` of the
  reference rows hold the test row within their kappa-NN radius."""

  def __init__(self, bank, radii, kappas, count):
    super().__init__()
    self.register_buffer("bank", _tensor(bank))  # normalised reference rows
    self.register_buffer("radii", _tensor(radii))  # [rows, kappas] squared k-NN distances
    self.register_buffer("kappas", _tensor(kappas))  # the k-fractions, then 1.0
    self.count = int(count)  # reference rows needed

  def forward(self, h):
    z = h / (h.norm(dim=1, keepdim=True) + 1e-10)
    dst = torch.cdist(z, self.bank).square()  # [batch, rows]
    inside = (self.radii[None, :, :] >= dst[:, :, None]).sum(dim=1)  # [batch, kappas]
    first = (inside < self.count).sum(dim=1)  # counts grow with kappa
    return -self.kappas[first]


def from_state(name: str, state) -> nn.Module:
  """The PyTorch module for a fitted line_jax state of `relation` or `cfood`,
  in eval mode."""
  a = np.asarray
  builders = {
      "relation": lambda: Relation(a(state.kernel), a(state.bias), _rows(state.bank, state.size),
                                   _rows(state.probs, state.size), float(state.power),
                                   float(state.threshold)),
      "cfood": lambda: CFOOD(_rows(state.bank, state.size), _rows(state.radii, state.size),
                             a(state.kappas), int(state.count)),
  }
  if name not in builders:
    raise ValueError(f"no PyTorch baseline for {name!r}; have: {', '.join(builders)}")
  return builders[name]().eval()
