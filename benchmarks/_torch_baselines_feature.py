"""Straightforward PyTorch versions of the feature scorers VRA, Residual, NECO and pNML.

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


class VRA(_Head):
  """Energy of VRA-P's rectified features: 0 below `low`, clipped at `high`."""

  def __init__(self, kernel, bias, low, high):
    super().__init__(kernel, bias)
    self.low, self.high = float(low), float(high)

  def forward(self, h):
    rectified = torch.where(h < self.low, torch.zeros_like(h), h.clamp(max=self.high))
    return torch.logsumexp(self.fc(rectified), dim=1)


class Residual(nn.Module):
  """Minus the norm of `h - origin` in ViM's residual space."""

  def __init__(self, origin, residual):
    super().__init__()
    self.register_buffer("origin", _tensor(origin))
    self.register_buffer("residual", _tensor(residual))

  def forward(self, h):
    return -((h - self.origin) @ self.residual).norm(dim=1)


class NECO(_Head):
  """Norm in the principal subspace over the norm, of the standardised feature
  (times the max logit with `max_logit`)."""

  def __init__(self, kernel, bias, mean, inv_scale, components, max_logit):
    super().__init__(kernel, bias)
    self.register_buffer("mean", _tensor(mean))
    self.register_buffer("inv_scale", _tensor(inv_scale))
    self.register_buffer("components", _tensor(components))
    self.max_logit = bool(max_logit)

  def forward(self, h):
    z = (h - self.mean) * self.inv_scale
    ratio = (z @ self.components).norm(dim=1) / z.norm(dim=1).clamp(min=1e-12)
    return ratio * self.fc(h).amax(dim=1) if self.max_logit else ratio


class PNML(_Head):
  """Minus the pNML regret, with `factor factor^T = (X^T X)^+` (as pytorch-ood's
  `PNML`, with the factor in place of the projector)."""

  def __init__(self, kernel, bias, factor):
    super().__init__(kernel, bias)
    self.register_buffer("factor", _tensor(factor))

  def forward(self, h):
    z = nn.functional.normalize(h, dim=1)
    probs = torch.softmax(self.fc(z), dim=1).clamp(min=1e-12, max=1.0 - 1e-12)
    projected = (z @ self.factor).square().sum(dim=1)
    g = (projected / (1.0 + projected))[:, None]
    normaliser = (probs / (probs + (1.0 - probs) * probs.pow(g))).sum(dim=1)
    return -normaliser.log() / np.log(probs.shape[1])


def from_state(name: str, state) -> nn.Module:
  """The PyTorch module for a fitted line_jax state of `vra`, `residual`,
  `neco` or `pnml`, in eval mode."""
  a = np.asarray
  head = lambda: (a(state.kernel), a(state.bias))
  builders = {
      "vra": lambda: VRA(*head(), float(state.low), float(state.high)),
      "residual": lambda: Residual(a(state.origin), a(state.residual)),
      "neco": lambda: NECO(*head(), a(state.mean), a(state.inv_scale), a(state.components),
                           state.max_logit),
      "pnml": lambda: PNML(*head(), a(state.factor)),
  }
  if name not in builders:
    raise ValueError(f"no PyTorch baseline for {name!r}; have: {', '.join(builders)}")
  return builders[name]().eval()
