"""Straightforward PyTorch versions of line_jax's feature-space scorers.

The reference point for `benchmarks/scorer_throughput.py`: each method written
as a careful PyTorch user would, batched, in eval mode under `no_grad`, on
the same fitted statistics as the line_jax state it is built from (so both
score identical inputs with identical parameters). Higher = more ID, as in
line_jax. Each module maps `[batch, features]` to `[batch]`.

`from_state(name, state)` builds the module for a registered scorer's state.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from benchmarks import torch_reference


def _tensor(x) -> torch.Tensor:
  return torch.from_numpy(np.array(x, dtype=np.float32))


class _Head(nn.Module):
  """A linear head from a Flax kernel `[features, classes]` and bias."""

  def __init__(self, kernel, bias):
    super().__init__()
    kernel = np.asarray(kernel, np.float32)
    self.fc = nn.Linear(kernel.shape[0], kernel.shape[1])
    with torch.no_grad():
      self.fc.weight.copy_(_tensor(kernel.T))  # PyTorch stores [classes, features]
      self.fc.bias.copy_(_tensor(bias))


class MSP(_Head):
  def forward(self, h):
    return torch.softmax(self.fc(h), dim=1).amax(dim=1)


class MaxLogit(_Head):
  def forward(self, h):
    return self.fc(h).amax(dim=1)


class Energy(_Head):
  def forward(self, h):
    return torch.logsumexp(self.fc(h), dim=1)


class GradNorm(_Head):
  """Closed form `||h||_1 ||softmax - 1/C||_1` (a backward pass per sample,
  as the official code does, is orders of magnitude slower)."""

  def forward(self, h):
    probs = torch.softmax(self.fc(h), dim=1)
    return h.abs().sum(dim=1) * (probs - 1.0 / probs.shape[1]).abs().sum(dim=1)


class ReAct(_Head):
  def __init__(self, kernel, bias, threshold):
    super().__init__(kernel, bias)
    self.threshold = float(threshold)

  def forward(self, h):
    return torch.logsumexp(self.fc(h.clamp(max=self.threshold)), dim=1)


class DICE(_Head):
  """`kernel` is the already sparsified one (DICE's mask applied)."""

  def forward(self, h):
    return torch.logsumexp(self.fc(h), dim=1)


def _kept(num_features: int, percentile: float) -> int:
  return num_features - int(np.round(num_features * percentile / 100.0))


class ASH(_Head):
  """ASH-P/B/S on pooled features with `torch.topk`, as the ASH code does."""

  def __init__(self, kernel, bias, percentile, variant):
    super().__init__(kernel, bias)
    self.percentile, self.variant = float(percentile), variant

  def forward(self, h):
    k = _kept(h.shape[1], self.percentile)
    values, index = torch.topk(h, k, dim=1)
    before = h.sum(dim=1, keepdim=True)
    if self.variant == "b":
      values = (before / k).expand_as(values)
    shaped = torch.zeros_like(h).scatter_(1, index, values)
    if self.variant == "s":
      shaped = shaped * torch.exp(before / values.sum(dim=1, keepdim=True))
    return torch.logsumexp(self.fc(shaped), dim=1)


class SCALE(_Head):
  def __init__(self, kernel, bias, percentile):
    super().__init__(kernel, bias)
    self.percentile = float(percentile)

  def forward(self, h):
    k = _kept(h.shape[1], self.percentile)
    kept = torch.topk(h, k, dim=1).values.sum(dim=1, keepdim=True)
    return torch.logsumexp(self.fc(h * torch.exp(h.sum(dim=1, keepdim=True) / kept)), dim=1)


class Mahalanobis(nn.Module):
  """Minus the smallest squared distance, all classes in two matrix products."""

  def __init__(self, means, precision):
    super().__init__()
    self.register_buffer("means", _tensor(means))
    self.register_buffer("precision", _tensor(precision))
    self.register_buffer("mean_norms", ((self.means @ self.precision) * self.means).sum(dim=1))

  def forward(self, h):
    hp = h @ self.precision
    distances = (hp * h).sum(dim=1, keepdim=True) - 2.0 * hp @ self.means.T + self.mean_norms
    return -distances.amin(dim=1)


class KNN(nn.Module):
  def __init__(self, bank, k):
    super().__init__()
    self.register_buffer("bank", _tensor(bank))  # normalised rows
    self.k = int(k)

  def forward(self, h):
    z = h / (h.norm(dim=1, keepdim=True) + 1e-10)
    kth = torch.topk(z @ self.bank.T, self.k, dim=1).values[:, -1]
    return -(2.0 - 2.0 * kth).clamp(min=0.0).sqrt()


class ViM(_Head):
  def __init__(self, kernel, bias, origin, residual, alpha):
    super().__init__(kernel, bias)
    self.register_buffer("origin", _tensor(origin))
    self.register_buffer("residual", _tensor(residual))
    self.alpha = float(alpha)

  def forward(self, h):
    virtual = ((h - self.origin) @ self.residual).norm(dim=1) * self.alpha
    return torch.logsumexp(self.fc(h), dim=1) - virtual


class LINe(_Head):
  """LINe from a fitted state: clip, predict, then one masked head per
  predicted class present in the batch (a `[batch, classes, features]`
  gather, as the official code builds, is out of memory at ImageNet size)."""

  def __init__(self, kernel, bias, clip, weight_floor, neuron_mask):
    super().__init__(kernel, bias)
    self.clip = float(clip)
    self.register_buffer("floor", _tensor(weight_floor))  # [classes, features]
    self.register_buffer("neuron_mask", torch.from_numpy(np.array(neuron_mask, bool)))

  def forward(self, h):
    h = h.clamp(max=self.clip)
    pred = self.fc(h).argmax(dim=1)
    kept = h * self.neuron_mask[pred]
    weight = self.fc.weight  # [classes, features]
    out = torch_reference.grouped_masked_logits(
        kept, pred, weight.shape[0], lambda c: torch.where(weight > self.floor[c], weight, 0.0))
    return torch.logsumexp(out + self.fc.bias, dim=1)


def from_state(name: str, state) -> nn.Module:
  """The PyTorch module for a fitted line_jax scorer state, in eval mode."""
  a = lambda x: np.asarray(x)
  head = lambda: (a(state.kernel), a(state.bias))
  builders = {
      "msp": lambda: MSP(*head()),
      "maxlogit": lambda: MaxLogit(*head()),
      "energy": lambda: Energy(*head()),
      "gradnorm": lambda: GradNorm(*head()),
      "react": lambda: ReAct(*head(), float(state.threshold)),
      "dice": lambda: DICE(*head()),
      "ash_p": lambda: ASH(*head(), state.percentile, "p"),
      "ash_b": lambda: ASH(*head(), state.percentile, "b"),
      "ash_s": lambda: ASH(*head(), state.percentile, "s"),
      "scale": lambda: SCALE(*head(), state.percentile),
      # Uncentred means: the centring is line_jax's own numerical choice.
      "mahalanobis": lambda: Mahalanobis(a(state.means) + a(state.center), a(state.precision)),
      "knn": lambda: KNN(a(state.bank).reshape(-1, state.bank.shape[2])[: state.size], state.k),
      "vim": lambda: ViM(*head(), a(state.origin), a(state.residual), float(state.alpha)),
      "line": lambda: LINe(*head(), float(state.clip), a(state.weight_floor), a(state.neuron_mask)),
  }
  if name not in builders:
    raise ValueError(f"no PyTorch baseline for {name!r}; have: {', '.join(builders)}")
  return builders[name]().eval()


@torch.no_grad()
def score(module: nn.Module, features) -> np.ndarray:
  """Scores `[batch, features]` (NumPy or tensor) with a baseline module."""
  if not isinstance(features, torch.Tensor):
    features = torch.from_numpy(np.asarray(features, np.float32))
  return module(features).numpy()
