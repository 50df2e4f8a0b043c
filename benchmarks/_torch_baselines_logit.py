"""Straightforward PyTorch versions of the logit scorers MCM, LTS and temperature scaling.

As `benchmarks/torch_baselines.py` (whose `_Head` and `score` these
reuse): each method written as a careful PyTorch user would, batched,
in eval mode under `no_grad`, on the parameters of the line_jax state it is
built from; higher = more ID; `[batch, features]` to `[batch]`.
`openood_temperature` is OpenOOD's temperature fit (LBFGS from 1.5), for
comparing fits.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from benchmarks import torch_baselines

_Head = torch_baselines._Head  # pylint: disable=protected-access
score = torch_baselines.score  # `score(module, features)`: NumPy `[batch]` scores


class MCM(_Head):
  """Largest softmax at temperature tau (OpenOOD's MCM; temperature scaling's score)."""

  def __init__(self, kernel, bias, tau):
    super().__init__(kernel, bias)
    self.tau = float(tau)

  def forward(self, h):
    return torch.softmax(self.fc(h) / self.tau, dim=1).amax(dim=1)


class LTS(_Head):
  """Energy of the logits times `(sum(h) / sum of the top-k h)^2` (the official `lts`)."""

  def __init__(self, kernel, bias, kept):
    super().__init__(kernel, bias)
    self.kept = int(kept)

  def forward(self, h):
    top = torch.topk(h, self.kept, dim=1).values.sum(dim=1)
    factor = (h.sum(dim=1) / top).square()
    return torch.logsumexp(self.fc(h) * factor[:, None], dim=1)


def openood_temperature(logits, labels) -> float:
  """OpenOOD's fit (`temp_scaling_postprocessor.py`): LBFGS on the NLL from T = 1.5,
  `lr=0.01, max_iter=50`, all logits in memory."""
  logits = torch.as_tensor(np.asarray(logits, np.float32))
  labels = torch.as_tensor(np.asarray(labels, np.int64))
  temperature = nn.Parameter(torch.ones(1) * 1.5)
  optimizer = torch.optim.LBFGS([temperature], lr=0.01, max_iter=50)
  nll = nn.CrossEntropyLoss()

  def closure():
    optimizer.zero_grad()
    loss = nll(logits / temperature, labels)
    loss.backward()
    return loss

  optimizer.step(closure)
  return float(temperature.detach())


def from_state(name: str, state) -> nn.Module:
  """The PyTorch module for a fitted line_jax state of `mcm`, `lts` or
  `temp_scaling`, in eval mode."""
  head = (np.asarray(state.kernel), np.asarray(state.bias))
  builders = {
      "mcm": lambda: MCM(*head, float(state.tau)),
      "lts": lambda: LTS(*head, int(state.kept)),
      "temp_scaling": lambda: MCM(*head, float(state.temperature)),
  }
  if name not in builders:
    raise ValueError(f"no PyTorch baseline for {name!r}; have: {', '.join(builders)}")
  return builders[name]().eval()
