"""ResNets (He et al., 2016) that also return their pooled pre-logit features.

One generic `ResNet`; the variants line_jax uses are one-liners at the bottom.
Layouts follow the PyTorch models whose checkpoints line_jax imports
(torchvision's ResNet-18/34/50/101/152 and the common CIFAR ResNet-18), so padding is written
out as PyTorch's: Flax's "SAME" pads a stride-2 convolution on the bottom/right
only, PyTorch pads both sides, and the two disagree on every even-sized input.
Module names mirror the PyTorch attribute names (`layer2_0/downsample_1` is
`layer2.0.downsample.1`) so that checkpoint import is a renaming.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

# PyTorch's BatchNorm2d defaults: eps 1e-5, and its momentum 0.1 is Flax's 0.9.
BatchNorm = functools.partial(nn.BatchNorm, momentum=0.9, epsilon=1e-5)


def conv(features: int, kernel: int, stride: int = 1, **kwargs) -> nn.Conv:
  """A bias-free convolution padded like PyTorch's `padding=kernel // 2`."""
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), (stride, stride),
                 padding=((pad, pad), (pad, pad)), use_bias=False, **kwargs)


class BasicBlock(nn.Module):
  """Two 3x3 convolutions with a residual connection (ResNet-18/34).

  Attributes:
    filters: output channels.
    strides: stride of the first convolution and of the projection.
  """

  filters: int
  strides: int = 1
  dtype: Any = jnp.float32
  expansion = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    norm = functools.partial(BatchNorm, use_running_average=not train,
                             dtype=self.dtype)
    y = conv(self.filters, 3, self.strides, dtype=self.dtype, name="conv1")(x)
    y = nn.relu(norm(name="bn1")(y))
    y = conv(self.filters, 3, dtype=self.dtype, name="conv2")(y)
    y = norm(name="bn2")(y)
    shortcut = _shortcut(x, y.shape, self.strides, self.dtype, norm)
    return nn.relu(y + shortcut)


class BottleneckBlock(nn.Module):
  """1x1 -> 3x3 -> 1x1 with 4x expansion; stride on the 3x3 (ResNet v1.5).

  Attributes:
    filters: width of the 3x3 convolution; the block outputs `4 * filters`.
    strides: stride of the 3x3 convolution and of the projection.
  """

  filters: int
  strides: int = 1
  dtype: Any = jnp.float32
  expansion = 4

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    norm = functools.partial(BatchNorm, use_running_average=not train,
                             dtype=self.dtype)
    y = conv(self.filters, 1, dtype=self.dtype, name="conv1")(x)
    y = nn.relu(norm(name="bn1")(y))
    y = conv(self.filters, 3, self.strides, dtype=self.dtype, name="conv2")(y)
    y = nn.relu(norm(name="bn2")(y))
    y = conv(4 * self.filters, 1, dtype=self.dtype, name="conv3")(y)
    y = norm(name="bn3")(y)
    shortcut = _shortcut(x, y.shape, self.strides, self.dtype, norm)
    return nn.relu(y + shortcut)


def _shortcut(x: jax.Array, shape, strides: int, dtype, norm) -> jax.Array:
  """Identity, or a strided 1x1 projection + BN where the shape changes.

  Called inside a block's compact `__call__`, so the modules belong to it.
  """
  if x.shape == shape:
    return x
  x = conv(shape[-1], 1, strides, dtype=dtype, name="downsample_0")(x)
  return norm(name="downsample_1")(x)


class ResNet(nn.Module):
  """A ResNet returning `(logits, features)`.

  Inputs are NHWC and already normalised; BatchNorm uses its running
  statistics unless `train=True` (then pass `mutable=["batch_stats"]`).

  Attributes:
    stage_sizes: blocks per stage; stage i has width `num_filters * 2**i` and
      stride 2 except the first stage.
    block_cls: `BasicBlock` or `BottleneckBlock`.
    num_classes: outputs of the final Dense layer `fc`.
    num_filters: width of the stem and of the first stage.
    stem_kernel: 7 (ImageNet: 7x7 stride-2 convolution, then a 3x3 stride-2
      max pool) or 3 (CIFAR: one 3x3 stride-1 convolution, no pooling).
    dtype: compute dtype (e.g. `jnp.bfloat16`); parameters stay float32, and
      the pooled features and the head are computed in float32.
  """

  stage_sizes: Sequence[int]
  block_cls: type[nn.Module]
  num_classes: int
  num_filters: int = 64
  stem_kernel: int = 7
  dtype: Any = jnp.float32

  @property
  def num_features(self) -> int:
    """Width of the pooled features: the last stage's output channels."""
    last = self.num_filters * 2 ** (len(self.stage_sizes) - 1)
    return last * self.block_cls.expansion

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False):
    """Runs the network.

    Args:
      x: `[batch, height, width, channels]` images.
      train: use batch statistics (and update the running ones).

    Returns:
      `(logits, features)`: `[batch, num_classes]` and the non-negative
      pooled pre-logits `[batch, num_features]`, both float32.
    """
    x = jnp.asarray(x, self.dtype)
    imagenet_stem = self.stem_kernel == 7
    x = conv(self.num_filters, self.stem_kernel, 2 if imagenet_stem else 1,
             dtype=self.dtype, name="conv1")(x)
    x = BatchNorm(use_running_average=not train, dtype=self.dtype,
                  name="bn1")(x)
    x = nn.relu(x)
    if imagenet_stem:
      x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    for i, num_blocks in enumerate(self.stage_sizes):
      for j in range(num_blocks):
        strides = 2 if i > 0 and j == 0 else 1
        x = self.block_cls(self.num_filters * 2**i, strides, dtype=self.dtype,
                           name=f"layer{i + 1}_{j}")(x, train)
    # float32 from here: OOD scorers take percentiles and logsumexps of these.
    features = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    logits = nn.Dense(self.num_classes, name="fc")(features)
    return logits, features


ResNet18Cifar = functools.partial(
    ResNet, stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock, stem_kernel=3)
# torchvision's ImageNet ResNets (`torchvision.models.resnet18` ... `resnet152`).
ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock)
ResNet34 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BasicBlock)
ResNet50 = functools.partial(
    ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BottleneckBlock)
ResNet101 = functools.partial(ResNet, stage_sizes=(3, 4, 23, 3), block_cls=BottleneckBlock)
ResNet152 = functools.partial(ResNet, stage_sizes=(3, 8, 36, 3), block_cls=BottleneckBlock)
# 28x28 grayscale (Fashion-MNIST): widths 32/64/128, 28 -> 14 -> 7; 0.7M params.
ResNetSmall = functools.partial(
    ResNet, stage_sizes=(2, 2, 2), block_cls=BasicBlock, num_filters=32,
    stem_kernel=3)
