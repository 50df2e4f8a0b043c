"""DenseNet-BC (Huang et al., 2017) as in the DICE / LINe CIFAR checkpoints.

The layout is DICE's `models/densenet.py` `DenseNet3` (pre-activation layers,
3 dense blocks, 3x3 stem of `2 * growth_rate` channels, no input
normalisation inside the network), and module names mirror its attributes
(`block1/layer_0/conv1` is `block1.layer.0.conv1`) so that checkpoint import is
a renaming. DenseNet-BC-100 with growth 12 has 342 pooled features.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from line_jax.models._resnet import BatchNorm
from line_jax.models._resnet import conv


class DenseLayer(nn.Module):
  """BN-ReLU-conv(1x1, 4k)-BN-ReLU-conv(3x3, k), concatenated to its input.

  Without the bottleneck: BN-ReLU-conv(3x3, k).

  Attributes:
    growth_rate: channels the layer adds (k).
    bottleneck: use the 1x1 bottleneck (DenseNet-BC).
  """

  growth_rate: int
  bottleneck: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    norm = functools.partial(BatchNorm, use_running_average=not train,
                             dtype=self.dtype)
    y = nn.relu(norm(name="bn1")(x))
    if self.bottleneck:
      y = conv(4 * self.growth_rate, 1, dtype=self.dtype, name="conv1")(y)
      y = nn.relu(norm(name="bn2")(y))
      y = conv(self.growth_rate, 3, dtype=self.dtype, name="conv2")(y)
    else:
      y = conv(self.growth_rate, 3, dtype=self.dtype, name="conv1")(y)
    # New channels go after the old ones, as in torch.cat([x, out], 1).
    return jnp.concatenate([x, y], axis=-1)


class DenseBlock(nn.Module):
  """`num_layers` dense layers; named `layer_i` like DICE's `layer.i`."""

  num_layers: int
  growth_rate: int
  bottleneck: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    for i in range(self.num_layers):
      x = DenseLayer(self.growth_rate, self.bottleneck, self.dtype,
                     name=f"layer_{i}")(x, train)
    return x


class Transition(nn.Module):
  """BN-ReLU-conv(1x1)-avgpool(2x2, stride 2)."""

  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = BatchNorm(use_running_average=not train, dtype=self.dtype,
                  name="bn1")(x)
    x = conv(self.features, 1, dtype=self.dtype, name="conv1")(nn.relu(x))
    return nn.avg_pool(x, (2, 2), (2, 2))


class DenseNet(nn.Module):
  """A three-block CIFAR DenseNet returning `(logits, features)`.

  Inputs are NHWC and already normalised (DICE normalises outside the weights);
  BatchNorm uses its running statistics unless `train=True` (then pass
  `mutable=["batch_stats"]`).

  Attributes:
    num_classes: outputs of the final Dense layer `fc`.
    depth: total depth; each block has `(depth - 4) // 3` layers, halved with
      the bottleneck (100 -> 16 bottleneck layers per block).
    growth_rate: channels each layer adds (k).
    reduction: channel compression of the transitions.
    bottleneck: DenseNet-BC layers.
    dtype: compute dtype; parameters stay float32, and the pooled features
      and the head are computed in float32.
  """

  num_classes: int
  depth: int = 100
  growth_rate: int = 12
  reduction: float = 0.5
  bottleneck: bool = True
  dtype: Any = jnp.float32

  @property
  def num_features(self) -> int:
    """Width of the pooled features (342 for DenseNet-BC-100, k = 12)."""
    channels = 2 * self.growth_rate
    for stage in range(3):
      channels += self._layers_per_block * self.growth_rate
      if stage < 2:
        channels = int(channels * self.reduction)
    return channels

  @property
  def _layers_per_block(self) -> int:
    n = (self.depth - 4) // 3
    return n // 2 if self.bottleneck else n

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False):
    """Runs the network.

    Args:
      x: `[batch, height, width, channels]` images (32x32 for CIFAR).
      train: use batch statistics (and update the running ones).

    Returns:
      `(logits, features)`: `[batch, num_classes]` and the non-negative
      pooled pre-logits `[batch, num_features]`, both float32.
    """
    x = jnp.asarray(x, self.dtype)
    x = conv(2 * self.growth_rate, 3, dtype=self.dtype, name="conv1")(x)
    for stage in range(3):
      x = DenseBlock(self._layers_per_block, self.growth_rate,
                     self.bottleneck, self.dtype,
                     name=f"block{stage + 1}")(x, train)
      if stage < 2:
        # floor, as DICE's int(math.floor(in_planes * reduction)).
        x = Transition(int(x.shape[-1] * self.reduction), self.dtype,
                       name=f"trans{stage + 1}")(x, train)
    x = BatchNorm(use_running_average=not train, dtype=self.dtype,
                  name="bn1")(x)
    x = nn.relu(x)
    # DICE pools 8x8 on 32x32 inputs: the global mean, which also holds for
    # other input sizes. float32: scorers take percentiles of these.
    features = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    logits = nn.Dense(self.num_classes, name="fc")(features)
    return logits, features


DenseNetBC100 = functools.partial(DenseNet, depth=100, growth_rate=12)
