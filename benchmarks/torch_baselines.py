"""Straightforward PyTorch versions of line_jax's feature-space scorers.

The reference point for `benchmarks/scorer_throughput.py`: each method written
as a careful PyTorch user would, batched, in eval mode under `no_grad`, on
the same fitted statistics as the line_jax state it is built from (so both
score identical inputs with identical parameters). Higher = more ID, as in
line_jax. Each module maps `[batch, features]` to `[batch]`.

`from_state(name, state)` builds the module for a registered scorer's state.
"""

from __future__ import annotations

import functools

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


class GEN(_Head):
  """Minus the generalized entropy of the top-M softmax, in log space (so
  `1 - p` of the top class is the other classes' share, not a rounded zero)."""

  def __init__(self, kernel, bias, gamma, m):
    super().__init__(kernel, bias)
    self.gamma, self.m = float(gamma), int(m)

  def forward(self, h):
    z = self.fc(h)
    log_p = torch.log_softmax(z, dim=1)
    top = z.argmax(dim=1, keepdim=True)
    first = torch.zeros_like(z, dtype=torch.bool).scatter_(1, top, True)
    rest = torch.logsumexp(z.masked_fill(first, float("-inf")), dim=1, keepdim=True)
    log_rest = torch.where(first, rest - torch.logsumexp(z, dim=1, keepdim=True),
                           torch.log1p(-log_p.exp()))
    terms = torch.exp(self.gamma * (log_p + log_rest))
    index = torch.topk(z, self.m, dim=1).indices
    return -terms.gather(1, index).sum(dim=1)


class Entropy(_Head):
  def forward(self, h):
    log_p = torch.log_softmax(self.fc(h), dim=1)
    return (log_p.exp() * log_p).sum(dim=1)


class KLMatching(_Head):
  """`-min_k KL(p || d_k)` with the templates' logs (and -inf offsets for
  classes without one), all templates in one product."""

  def __init__(self, kernel, bias, log_templates, offsets):
    super().__init__(kernel, bias)
    self.register_buffer("log_templates", _tensor(log_templates))
    self.register_buffer("offsets", _tensor(offsets))

  def forward(self, h):
    log_p = torch.log_softmax(self.fc(h), dim=1)
    p = log_p.exp()
    cross = p @ self.log_templates.T + self.offsets
    return cross.amax(dim=1) - (p * log_p).sum(dim=1)


class RMDS(Mahalanobis):
  def __init__(self, means, precision, background_mean, background_precision):
    super().__init__(means, precision)
    self.register_buffer("background_mean", _tensor(background_mean))
    self.register_buffer("background_precision", _tensor(background_precision))

  def forward(self, h):
    x = h - self.background_mean
    return super().forward(h) + ((x @ self.background_precision) * x).sum(dim=1)


class SHE(_Head):
  def __init__(self, kernel, bias, patterns):
    super().__init__(kernel, bias)
    self.register_buffer("patterns", _tensor(patterns))

  def forward(self, h):
    return (h * self.patterns[self.fc(h).argmax(dim=1)]).sum(dim=1)


class NNGuide(_Head):
  """Energy times the mean of the k largest similarities to the guidance bank."""

  def __init__(self, kernel, bias, bank, k):
    super().__init__(kernel, bias)
    self.register_buffer("bank", _tensor(bank))  # normalised rows times their energy
    self.k = int(k)

  def forward(self, h):
    z = torch.nn.functional.normalize(h, dim=1)
    guidance = torch.topk(z @ self.bank.T, self.k, dim=1).values.mean(dim=1)
    return torch.logsumexp(self.fc(h), dim=1) * guidance


class FDBD(_Head):
  def __init__(self, kernel, bias, inverse_gaps, center):
    super().__init__(kernel, bias)
    self.register_buffer("inverse_gaps", _tensor(inverse_gaps))
    self.register_buffer("center", _tensor(center))

  def forward(self, h):
    z = self.fc(h)
    top, pred = z.max(dim=1, keepdim=True)
    distance = ((top - z) * self.inverse_gaps[pred[:, 0]]).sum(dim=1)
    return distance / (h - self.center).norm(dim=1)


class NCI(_Head):
  def __init__(self, kernel, bias, mean, alpha):
    super().__init__(kernel, bias)
    self.register_buffer("mean", _tensor(mean))
    self.alpha = float(alpha)

  def forward(self, h):
    centred = h - self.mean
    w = self.fc.weight[self.fc(h).argmax(dim=1)]
    proximity = (w * centred).sum(dim=1) / centred.norm(dim=1)
    return proximity + self.alpha * h.abs().sum(dim=1)


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
      "gen": lambda: GEN(*head(), float(state.gamma), int(state.m)),
      "entropy": lambda: Entropy(*head()),
      "klm": lambda: KLMatching(*head(), a(state.log_templates), a(state.offsets)),
      "rmds": lambda: RMDS(a(state.means) + a(state.center), a(state.precision),
                           a(state.background_mean), a(state.background_precision)),
      "she": lambda: SHE(*head(), a(state.patterns)),
      "nnguide": lambda: NNGuide(*head(), a(state.bank).reshape(-1, state.bank.shape[2])[
          : state.size], int(state.k)),
      "fdbd": lambda: FDBD(*head(), a(state.inverse_gaps), a(state.center)),
      "nci": lambda: NCI(*head(), a(state.mean), float(state.alpha)),
      # The sparsified head under ReAct's clip.
      "react_dice": lambda: ReAct(*head(), float(state.threshold)),
  }
  # Issue 24's methods: their baselines live next to each group's tests.
  from benchmarks import _torch_baselines_bank  # pylint: disable=g-import-not-at-top
  from benchmarks import _torch_baselines_density  # pylint: disable=g-import-not-at-top
  from benchmarks import _torch_baselines_feature  # pylint: disable=g-import-not-at-top
  from benchmarks import _torch_baselines_logit  # pylint: disable=g-import-not-at-top
  from benchmarks import _torch_baselines_shaping  # pylint: disable=g-import-not-at-top
  for group, names in ((_torch_baselines_logit, ("mcm", "lts", "temp_scaling")),
                       (_torch_baselines_feature, ("vra", "residual", "neco", "pnml")),
                       (_torch_baselines_shaping, ("caref", "cadref", "optfs")),
                       (_torch_baselines_bank, ("relation", "cfood")),
                       (_torch_baselines_density, ("openmax", "weiper"))):
    builders.update({n: functools.partial(group.from_state, n, state) for n in names})
  if name not in builders:
    raise ValueError(f"no PyTorch baseline for {name!r}; have: {', '.join(builders)}")
  return builders[name]().eval()


@torch.no_grad()
def score(module: nn.Module, features) -> np.ndarray:
  """Scores `[batch, features]` (NumPy or tensor) with a baseline module."""
  if not isinstance(features, torch.Tensor):
    features = torch.from_numpy(np.asarray(features, np.float32))
  return module(features).numpy()
