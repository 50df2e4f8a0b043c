"""Straightforward PyTorch versions of the density scorers OpenMax and WeiPer.

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


class OpenMax(_Head):
  """OpenMax's recalibrated probabilities (libmr's w-scores of the distance to
  the class means of the `alpha` top classes)."""

  def __init__(self, kernel, bias, means, small, offset, shape, valid, alpha, distance,
               output):
    super().__init__(kernel, bias)
    for name, value in (("means", means), ("small", small), ("offset", offset),
                        ("shape", shape)):
      self.register_buffer(name, _tensor(value))
    self.register_buffer("valid", torch.from_numpy(np.array(valid, bool)))
    self.alpha, self.distance, self.output = int(alpha), distance, output

  def _distance(self, z, mu):
    euclid = (z - mu).norm(dim=-1)
    if self.distance == "euclidean":
      return euclid
    cosine = 1 - (z * mu).sum(-1) / (z.norm(dim=-1) * mu.norm(dim=-1)).clamp(
        min=torch.finfo(z.dtype).tiny)
    return cosine if self.distance == "cosine" else 0.5 * euclid + cosine

  def forward(self, h):
    z = self.fc(h)
    top, ranked = z.topk(self.alpha, dim=1)
    d = self._distance(z[:, None, :], self.means[ranked])
    t = d - self.small[ranked]
    cdf = -torch.expm1(-torch.exp(self.shape[ranked] * (torch.log1p(t / 1e4)
                                                         - self.offset[ranked])))
    w = torch.where(self.valid[ranked], torch.where(t + 1e4 > 0, cdf, 0.0), 1.0)
    omega = (self.alpha - torch.arange(self.alpha, dtype=z.dtype)) / self.alpha
    moved = top * w * omega
    known = z.scatter_add(1, ranked, -moved)
    unknown = moved.sum(dim=1, keepdim=True)
    p = torch.softmax(torch.cat([known, unknown], dim=1), dim=1)
    if self.output == "unknown":
      return -p[:, -1]
    return p.amax(dim=1) if self.output == "max" else p[:, :-1].amax(dim=1)


class WeiPer(nn.Module):
  """WeiPer+KLD: symmetric KL divergences of the row's feature and perturbed-logit
  densities from the training ones, and the perturbed heads' mean MSP."""

  def __init__(self, perturbed, bias, edges_features, edges_perturbed, reference_features,
               reference_perturbed, smoothing, smoothing_perturbed, epsilon, epsilon_noise,
               lambda_1, lambda_2):
    super().__init__()
    repeats, classes, features = np.shape(perturbed)
    self.fc = nn.Linear(features, repeats * classes)
    with torch.no_grad():
      self.fc.weight.copy_(_tensor(np.reshape(perturbed, (repeats * classes, features))))
      self.fc.bias.copy_(_tensor(np.tile(bias, repeats)))
    for name, value in (("edges_features", edges_features), ("edges_perturbed", edges_perturbed),
                        ("reference_features", reference_features),
                        ("reference_perturbed", reference_perturbed)):
      self.register_buffer(name, _tensor(value))
    self.repeats, self.smoothing, self.smoothing_perturbed = repeats, smoothing, smoothing_perturbed
    self.epsilon, self.epsilon_noise = float(epsilon), float(epsilon_noise)
    self.lambda_1, self.lambda_2 = float(lambda_1), float(lambda_2)

  @staticmethod
  def _density(values, edges):
    index = torch.bucketize(values, edges, right=True)  # edges[i - 1] <= v < edges[i]
    counts = torch.zeros(values.shape[0], edges.shape[0] + 1).scatter_add_(
        1, index, torch.ones_like(values))
    return counts[:, 1:-1] / values.shape[1]

  @staticmethod
  def _kldiv(p, q, size, eps):
    before = (size - 1) // 2
    padded = nn.functional.pad(q[:, None], (before, size - 1 - before), mode="replicate")
    q = nn.functional.avg_pool1d(padded, size, stride=1)[:, 0] + eps
    q = q / q.sum(dim=1, keepdim=True)
    return ((p - q) * (p.log() - q.log())).sum(dim=1)

  def forward(self, h):
    z = self.fc(h)
    msp = torch.softmax(z.reshape(h.shape[0], self.repeats, -1), dim=2).amax(dim=2).mean(dim=1)
    kl_f = self._kldiv(self.reference_features, self._density(h, self.edges_features),
                       self.smoothing, self.epsilon)
    kl_p = self._kldiv(self.reference_perturbed, self._density(z, self.edges_perturbed),
                       self.smoothing_perturbed, self.epsilon_noise)
    return -(kl_f + self.lambda_1 * kl_p - self.lambda_2 * msp)


def from_state(name: str, state) -> nn.Module:
  """The PyTorch module for a fitted line_jax state of `openmax` or `weiper`,
  in eval mode."""
  a = np.asarray
  head = lambda: (a(state.kernel), a(state.bias))
  builders = {
      "openmax": lambda: OpenMax(*head(), a(state.means), a(state.small), a(state.offset),
                                 a(state.shape), a(state.valid), state.alpha, state.distance,
                                 state.output),
      "weiper": lambda: WeiPer(
          a(state.perturbed), a(state.bias), a(state.edges_features), a(state.edges_perturbed),
          a(state.reference_features), a(state.reference_perturbed),
          state.smoothing, state.smoothing_perturbed,
          state.epsilon, state.epsilon_noise, state.lambda_1, state.lambda_2),
  }
  if name not in builders:
    raise ValueError(f"no PyTorch baseline for {name!r}; have: {', '.join(builders)}")
  return builders[name]().eval()
