"""Canonical model names -> constructors, and the input each was built for."""

from __future__ import annotations

from typing import Callable

import flax.linen as nn

from line_jax.models._densenet import DenseNetBC100
from line_jax.models._resnet import ResNet18
from line_jax.models._resnet import ResNet18Cifar
from line_jax.models._resnet import ResNet34
from line_jax.models._resnet import ResNet50
from line_jax.models._resnet import ResNet101
from line_jax.models._resnet import ResNet152
from line_jax.models._resnet import ResNetSmall

# "resnet18" ... "resnet152" load torchvision's `state_dict`s as they are.
registry: dict[str, Callable[..., nn.Module]] = {
    "resnet18_cifar": ResNet18Cifar,
    "densenet100": DenseNetBC100,
    "resnet18": ResNet18,
    "resnet34": ResNet34,
    "resnet50": ResNet50,
    "resnet101": ResNet101,
    "resnet152": ResNet152,
    "resnet_small": ResNetSmall,
}

# [height, width, channels] of the data each model is meant for. Parameter
# shapes depend only on the channels, so any size works for initialisation.
input_shapes: dict[str, tuple[int, int, int]] = {
    "resnet18_cifar": (32, 32, 3),
    "densenet100": (32, 32, 3),
    "resnet18": (224, 224, 3),
    "resnet34": (224, 224, 3),
    "resnet50": (224, 224, 3),
    "resnet101": (224, 224, 3),
    "resnet152": (224, 224, 3),
    "resnet_small": (28, 28, 1),
}


def get_model(name: str, num_classes: int, **kwargs) -> nn.Module:
  """Builds a registered model.

  Args:
    name: one of `registry`'s keys.
    num_classes: outputs of the head.
    **kwargs: further attributes, e.g. `dtype=jnp.bfloat16`.

  Returns:
    The Flax module; `module.apply(variables, x)` gives `(logits, features)`.
  """
  if name not in registry:
    raise ValueError(
        f"unknown model {name!r}; choose one of {sorted(registry)}")
  return registry[name](num_classes=num_classes, **kwargs)
