"""Plain torch.nn networks in the layouts of the checkpoints line_jax imports.

torchvision's ResNet-50, the common CIFAR ResNet-18 (`shortcut` / `linear`
names) and DICE's DenseNet-BC-100 (layout and key names). Their `forward`
returns `(logits, features)` like line_jax's models, so the parity tests
(`tests/test_torch_import.py`) and the end-to-end and precompute benchmarks
compare the same network in both frameworks: `state_dict()` goes through
`line_jax.models.variables_from_state_dict`.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class TorchBasicBlock(nn.Module):
  expansion = 1

  def __init__(self, cin, planes, stride, shortcut_name):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.shortcut_name = shortcut_name
    if stride != 1 or cin != planes:
      setattr(self, shortcut_name, _projection(cin, planes, stride))

  def forward(self, x):
    out = torch.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return torch.relu(out + getattr(self, self.shortcut_name, nn.Identity())(x))


class TorchBottleneck(nn.Module):
  expansion = 4

  def __init__(self, cin, planes, stride, shortcut_name):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, 4 * planes, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(4 * planes)
    self.shortcut_name = shortcut_name
    if stride != 1 or cin != 4 * planes:
      setattr(self, shortcut_name, _projection(cin, 4 * planes, stride))

  def forward(self, x):
    out = torch.relu(self.bn1(self.conv1(x)))
    out = torch.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    return torch.relu(out + getattr(self, self.shortcut_name, nn.Identity())(x))


def _projection(cin, cout, stride):
  return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                       nn.BatchNorm2d(cout))


class TorchResNet(nn.Module):
  """torchvision layout (`imagenet=True`) or the common CIFAR one."""

  def __init__(self, block, layers, num_classes, imagenet):
    super().__init__()
    shortcut_name, self.head_name = (
        ("downsample", "fc") if imagenet else ("shortcut", "linear"))
    if imagenet:
      self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
      self.maxpool = nn.MaxPool2d(3, 2, 1)
    else:
      self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
      self.maxpool = nn.Identity()
    self.bn1 = nn.BatchNorm2d(64)
    cin = 64
    for i, num_blocks in enumerate(layers):
      blocks = []
      for j in range(num_blocks):
        stride = 2 if i > 0 and j == 0 else 1
        blocks.append(block(cin, 64 * 2**i, stride, shortcut_name))
        cin = 64 * 2**i * block.expansion
      setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
    setattr(self, self.head_name, nn.Linear(cin, num_classes))

  def forward(self, x):
    x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
    for i in range(1, 5):
      x = getattr(self, f"layer{i}")(x)
    features = x.mean(dim=(2, 3))
    return getattr(self, self.head_name)(features), features


class TorchDenseLayer(nn.Module):

  def __init__(self, cin, growth):
    super().__init__()
    self.bn1 = nn.BatchNorm2d(cin)
    self.conv1 = nn.Conv2d(cin, 4 * growth, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(4 * growth)
    self.conv2 = nn.Conv2d(4 * growth, growth, 3, 1, 1, bias=False)

  def forward(self, x):
    out = self.conv1(torch.relu(self.bn1(x)))
    out = self.conv2(torch.relu(self.bn2(out)))
    return torch.cat([x, out], 1)


class TorchDenseBlock(nn.Module):

  def __init__(self, num_layers, cin, growth):
    super().__init__()
    self.layer = nn.Sequential(*[TorchDenseLayer(cin + i * growth, growth)
                                 for i in range(num_layers)])

  def forward(self, x):
    return self.layer(x)


class TorchTransition(nn.Module):

  def __init__(self, cin, cout):
    super().__init__()
    self.bn1 = nn.BatchNorm2d(cin)
    self.conv1 = nn.Conv2d(cin, cout, 1, bias=False)

  def forward(self, x):
    return nn.functional.avg_pool2d(self.conv1(torch.relu(self.bn1(x))), 2)


class TorchDenseNetBC(nn.Module):
  """DICE's DenseNet3(depth=100, growth_rate=12) layout and key names."""

  def __init__(self, num_classes, depth=100, growth=12):
    super().__init__()
    n = (depth - 4) // 6
    channels = 2 * growth
    self.conv1 = nn.Conv2d(3, channels, 3, 1, 1, bias=False)
    for stage in (1, 2, 3):
      setattr(self, f"block{stage}", TorchDenseBlock(n, channels, growth))
      channels += n * growth
      if stage < 3:
        setattr(self, f"trans{stage}", TorchTransition(channels, channels // 2))
        channels //= 2
    self.bn1 = nn.BatchNorm2d(channels)
    self.fc = nn.Linear(channels, num_classes)

  def forward(self, x):
    x = self.trans1(self.block1(self.conv1(x)))
    x = self.trans2(self.block2(x))
    x = torch.relu(self.bn1(self.block3(x)))
    features = nn.functional.avg_pool2d(x, x.shape[-1]).flatten(1)
    return self.fc(features), features


def randomise(net, size, seed):
  """Random weights; BN statistics from one calibration batch, then eval."""
  torch.manual_seed(seed)
  for m in net.modules():
    if isinstance(m, (nn.Conv2d, nn.Linear)):
      fan_in = m.weight[0].numel()
      nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_in))
      if m.bias is not None:
        nn.init.normal_(m.bias, 0.0, 0.1)
    elif isinstance(m, nn.BatchNorm2d):
      nn.init.uniform_(m.weight, 0.5, 1.5)
      nn.init.normal_(m.bias, 0.0, 0.2)
      m.momentum = 1.0  # running statistics := the calibration batch's
  net.train()
  with torch.no_grad():
    net(torch.randn(4, 3, size, size))
  for m in net.modules():
    if isinstance(m, nn.BatchNorm2d):
      m.momentum = 0.1
  return net.eval()


def resnet18_cifar(num_classes: int) -> TorchResNet:
  """The common CIFAR ResNet-18 (3x3 stem, no max pool), 512 features."""
  return TorchResNet(TorchBasicBlock, [2, 2, 2, 2], num_classes, imagenet=False)


def resnet50(num_classes: int) -> TorchResNet:
  """torchvision's ResNet-50 layout (v1.5: stride on the 3x3), 2048 features."""
  return TorchResNet(TorchBottleneck, [3, 4, 6, 3], num_classes, imagenet=True)
