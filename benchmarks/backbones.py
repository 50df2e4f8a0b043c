"""The same random-weight network in PyTorch and in Flax, for the image benchmarks.

The PyTorch network (`benchmarks/torch_models.py`) is built and randomised
first (BN statistics from a calibration batch, so eval-mode BN does real
work); its `state_dict` then becomes the Flax variables through
`line_jax.models.variables_from_state_dict`, so both frameworks run
identical weights on identical images. The LINe state is fitted on the
network's own head with the official hyperparameters of that head shape.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

# name -> (torch builder name, classes, image size, p_w, p_a, clip): the
# CIFAR-10 head (official CIFAR-10 settings) and the ImageNet head.
SPECS = {
    "resnet18_cifar": ("resnet18_cifar", 10, 32, 90, 90, 1.0),
    "resnet50": ("resnet50", 1000, 224, 10, 10, 0.8),
}


@dataclasses.dataclass
class Backbone:
  """One network in both frameworks, and a LINe state for its head.

  Attributes:
    name: key of `SPECS`.
    num_classes, image_size: the head's classes and the input's side.
    net: the PyTorch module (eval mode, float32, on the CPU).
    model: the Flax module (compute dtype as asked).
    variables: the Flax variables, converted from `net`.
    state: a `line_jax.line.LineState` for the head.
    contrib: `[classes, features]` float64 contributions the state was fitted on.
    hparams: `(p_w, p_a, clip)`.
  """

  name: str
  num_classes: int
  image_size: int
  net: Any
  model: Any
  variables: Any
  state: Any
  contrib: np.ndarray
  hparams: tuple

  @property
  def kernel(self) -> np.ndarray:
    return np.asarray(self.variables["params"]["fc"]["kernel"])

  @property
  def bias(self) -> np.ndarray:
    return np.asarray(self.variables["params"]["fc"]["bias"])

  def images(self, count: int, seed: int = 1) -> np.ndarray:
    """`[count, size, size, 3]` float32 standard-normal images (NHWC)."""
    rng = np.random.default_rng(seed)
    size = self.image_size
    return rng.normal(size=(count, size, size, 3)).astype(np.float32)


def build(name: str, *, bf16: bool = False, seed: int = 0) -> Backbone:
  """Builds `name` of `SPECS` in both frameworks with the same random weights."""
  from benchmarks import torch_models
  from line_jax import line
  from line_jax import models

  builder, num_classes, size, p_w, p_a, clip = SPECS[name]
  # Calibrate BN on a small image: its statistics do not depend on the size
  # enough to matter for timing, and a 224 x 224 batch is slow on a CPU.
  net = torch_models.randomise(getattr(torch_models, builder)(num_classes), min(size, 64), seed)
  model = models.get_model(name, num_classes, dtype=jnp.bfloat16 if bf16 else jnp.float32)
  state_dict = {k: v.numpy() for k, v in net.state_dict().items()}
  variables = models.variables_from_state_dict(model, state_dict, (size, size, 3))
  kernel = np.asarray(variables["params"]["fc"]["kernel"])
  bias = np.asarray(variables["params"]["fc"]["bias"])
  # Contributions shaped like real ones (mean h * W[y]), random signs and sizes.
  rng = np.random.default_rng(seed)
  contrib = np.abs(rng.normal(size=kernel.shape[::-1])) * kernel.T
  state = line.fit_from_contributions(contrib, kernel, bias, p_w=p_w, p_a=p_a, clip=clip)
  return Backbone(name, num_classes, size, net, model, variables, state, contrib,
                  (p_w, p_a, clip))
