"""Straightforward PyTorch versions of CARef, CADRef and OptFS.

As `benchmarks/torch_baselines.py` (whose head, tensor conversion and
`score` these share): each method as its official code writes it, batched,
in eval mode under `no_grad`, on the statistics of the line_jax state it is
built from. Higher = more ID. Each module maps `[batch, features]` to `[batch]`.

`from_state(name, state)` builds the module for a fitted state of one of
these scorers.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from benchmarks import torch_baselines
from benchmarks.torch_baselines import _Head
from benchmarks.torch_baselines import _tensor

# Scores `[batch, features]` with any of these modules, as with the others.
score = torch_baselines.score


class CARef(_Head):
  """Minus `||h - mu_p||_1 / ||h||_1`, mu_p the predicted class's mean (the
  norm at least 1e-12, as line_jax and pytorch-ood floor it)."""

  def __init__(self, kernel, bias, means):
    super().__init__(kernel, bias)
    self.register_buffer("means", _tensor(means))

  def forward(self, h):
    mu = self.means[self.fc(h).argmax(dim=1)]
    return -(h - mu).norm(p=1, dim=1) / h.norm(p=1, dim=1).clamp(min=1e-12)


def _gen(logits, gamma=0.1):
  top = min(max(logits.shape[1] // 10, 10), logits.shape[1])
  probs = torch.sort(torch.softmax(logits, dim=1), dim=1).values[:, -top:]
  return 1.0 / (probs ** gamma * (1.0 - probs) ** gamma).sum(dim=1)


_CONFIDENCE = {
    "energy": lambda z: torch.logsumexp(z, dim=1),
    "maxlogit": lambda z: z.amax(dim=1),
    "msp": lambda z: torch.softmax(z, dim=1).amax(dim=1),
    "gen": _gen,
}


class CADRef(CARef):
  """The error split by the sign of the predicted class's weights, each part
  over a logit score (the sample's, and the training mean)."""

  def __init__(self, kernel, bias, means, mean_confidence, logit):
    super().__init__(kernel, bias, means)
    self.mean_confidence = float(mean_confidence)
    self.confidence = _CONFIDENCE[logit]

  def forward(self, h):
    z = self.fc(h)
    pred = z.argmax(dim=1)
    aligned = (h - self.means[pred]) * self.fc.weight[pred].sign()
    norm = h.norm(p=1, dim=1).clamp(min=1e-12)
    raising = aligned.clamp(min=0).sum(dim=1) / norm
    lowering = (-aligned).clamp(min=0).sum(dim=1) / norm
    return -(raising / self.confidence(z) + lowering / self.mean_confidence)


class OptFS(_Head):
  """Piecewise-constant shaping, one mask per interval as the official code."""

  def __init__(self, kernel, bias, lower, upper, theta, variant):
    super().__init__(kernel, bias)
    self.register_buffer("lower", _tensor(lower))
    self.register_buffer("upper", _tensor(upper))
    self.register_buffer("theta", _tensor(theta))
    self.variant = variant

  def forward(self, h):
    shaped = torch.zeros_like(h)
    for lower, upper, theta in zip(self.lower, self.upper, self.theta):
      shaped += ((h >= lower) & (h < upper)) * h * theta
    if self.variant == "energy":
      return torch.logsumexp(self.fc(shaped), dim=1)
    return (self.fc.weight[self.fc(h).argmax(dim=1)] * shaped).sum(dim=1)


def from_state(name: str, state) -> nn.Module:
  """The PyTorch module for a fitted CARef, CADRef or OptFS state, in eval mode."""
  a = lambda x: np.asarray(x)
  head = lambda: (a(state.kernel), a(state.bias))
  builders = {
      "caref": lambda: CARef(*head(), a(state.means)),
      "cadref": lambda: CADRef(*head(), a(state.means), float(state.mean_confidence),
                               state.logit),
      "optfs": lambda: OptFS(*head(), a(state.lower), a(state.upper), a(state.theta),
                             state.variant),
  }
  if name not in builders:
    raise ValueError(f"no PyTorch baseline for {name!r} here; have: {', '.join(builders)}")
  return builders[name]().eval()
