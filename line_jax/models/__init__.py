"""Flax image classifiers that return `(logits, features)`, and any other's head.

`features` are the pooled pre-logits `[batch, num_features]` (the input of the
final Dense layer `fc`, non-negative after ReLU): what line_jax's scorers take,
with the head `head_params(variables, head="fc")`. Any other Flax Linen or NNX
network gives the same through its final Dense layer's name
(`feature_apply`, `head_params`); `load_torch_checkpoint` imports PyTorch
`state_dict`s (torchvision's ResNets among them) into these models;
`save_checkpoint` / `load_checkpoint` keep a model with its config (orbax, no
pickle), the form every CLI's `--checkpoint` takes.
"""

from line_jax.models._checkpoint import DEFAULT_CHECKPOINT
from line_jax.models._checkpoint import load_checkpoint
from line_jax.models._checkpoint import read_checkpoint_config
from line_jax.models._checkpoint import save_checkpoint
from line_jax.models._densenet import DenseNet
from line_jax.models._densenet import DenseNetBC100
from line_jax.models._head import dense_layers
from line_jax.models._head import feature_apply
from line_jax.models._head import head_params
from line_jax.models._registry import get_model
from line_jax.models._registry import input_shapes
from line_jax.models._registry import registry
from line_jax.models._resnet import BasicBlock
from line_jax.models._resnet import BottleneckBlock
from line_jax.models._resnet import ResNet
from line_jax.models._resnet import ResNet18
from line_jax.models._resnet import ResNet18Cifar
from line_jax.models._resnet import ResNet34
from line_jax.models._resnet import ResNet50
from line_jax.models._resnet import ResNet101
from line_jax.models._resnet import ResNet152
from line_jax.models._resnet import ResNetSmall
from line_jax.models._torch_import import load_torch_checkpoint
from line_jax.models._torch_import import read_torch_state_dict
from line_jax.models._torch_import import torch_num_classes
from line_jax.models._torch_import import variables_from_state_dict

__all__ = (
    "DEFAULT_CHECKPOINT",
    "BasicBlock",
    "BottleneckBlock",
    "DenseNet",
    "DenseNetBC100",
    "dense_layers",
    "feature_apply",
    "head_params",
    "ResNet",
    "ResNet18",
    "ResNet18Cifar",
    "ResNet34",
    "ResNet50",
    "ResNet101",
    "ResNet152",
    "ResNetSmall",
    "get_model",
    "input_shapes",
    "load_checkpoint",
    "load_torch_checkpoint",
    "read_checkpoint_config",
    "read_torch_state_dict",
    "registry",
    "save_checkpoint",
    "torch_num_classes",
    "variables_from_state_dict",
)
