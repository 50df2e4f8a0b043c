"""PyTorch checkpoints -> Flax: eval-mode parity with plain torch.nn references.

The reference networks are written here in plain torch.nn, in the layouts of
the checkpoints line_jax imports: torchvision's ResNet-50, the common CIFAR
ResNet-18 (`shortcut` / `linear` names), and DICE's DenseNet-BC-100 (a file
holding {"state_dict": ...}). Weights are random; BN statistics are set from a
calibration batch and the affine parameters randomised, so eval-mode BN is
neither the identity nor input-independent.
"""

import math

import jax
import numpy as np
import pytest

from line_jax import models

torch = pytest.importorskip("torch")
nn = torch.nn


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


def _randomise(net, size, seed):
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


def _assert_parity(model, variables, net, size, seed=1):
  x = torch.randn(2, 3, size, size,
                  generator=torch.Generator().manual_seed(seed))
  with torch.no_grad():
    ref_logits, ref_features = (t.numpy() for t in net(x))
  nhwc = x.numpy().transpose(0, 2, 3, 1)
  logits, features = jax.jit(model.apply)(variables, nhwc)
  for got, want in ((features, ref_features), (logits, ref_logits)):
    np.testing.assert_allclose(got, want, rtol=1e-4,
                               atol=1e-4 * np.abs(want).max())
  # Non-trivial: the two images get different outputs.
  spread = np.abs(ref_logits[0] - ref_logits[1]).max()
  assert spread > 1e-2 * np.abs(ref_logits).max()


@pytest.fixture(scope="module")
def resnet18_ckpt(tmp_path_factory):
  net = TorchResNet(TorchBasicBlock, [2, 2, 2, 2], 10, imagenet=False)
  net = _randomise(net, 32, seed=0)
  path = tmp_path_factory.mktemp("ckpt") / "resnet18_cifar.pth"
  torch.save(net.state_dict(), path)
  return net, path


def test_resnet18_cifar_matches_torch(resnet18_ckpt):
  net, path = resnet18_ckpt
  model, variables = models.load_torch_checkpoint("resnet18_cifar", path, 10)
  _assert_parity(model, variables, net, 32)


def test_densenet100_matches_torch(tmp_path):
  net = _randomise(TorchDenseNetBC(num_classes=10), 32, seed=2)
  path = tmp_path / "densenet100.pth.tar"
  # DICE / LINe checkpoints hold the state_dict next to training metadata.
  torch.save({"epoch": 100, "best_prec1": 95.0, "state_dict": net.state_dict()},
             path)
  model, variables = models.load_torch_checkpoint("densenet100", path, 10)
  assert variables["params"]["fc"]["kernel"].shape == (342, 10)
  _assert_parity(model, variables, net, 32)


def test_resnet50_matches_torch(tmp_path):
  net = TorchResNet(TorchBottleneck, [3, 4, 6, 3], 20, imagenet=True)
  net = _randomise(net, 64, seed=3)
  path = tmp_path / "resnet50.pth"
  torch.save(net.state_dict(), path)
  model, variables = models.load_torch_checkpoint("resnet50", path, 20)
  _assert_parity(model, variables, net, 64)


def test_dataparallel_prefix_is_stripped(resnet18_ckpt):
  net, _ = resnet18_ckpt
  model = models.get_model("resnet18_cifar", 10)
  plain = models.variables_from_state_dict(model, net.state_dict(), (32, 32, 3))
  prefixed = models.variables_from_state_dict(
      model, {f"module.{k}": v for k, v in net.state_dict().items()},
      (32, 32, 3))
  jax.tree.map(np.testing.assert_array_equal, plain, prefixed)


def test_wrong_number_of_classes(resnet18_ckpt):
  _, path = resnet18_ckpt
  with pytest.raises(ValueError, match=r"linear\.weight has shape \(10, 512\), "
                     r"the model needs \(100, 512\)"):
    models.load_torch_checkpoint("resnet18_cifar", path, 100)


def test_other_architecture(resnet18_ckpt):
  _, path = resnet18_ckpt
  with pytest.raises(ValueError) as info:
    models.load_torch_checkpoint("resnet50", path, 10)
  message = str(info.value)
  assert "missing keys [layer1.0.bn3.bias, " in message
  assert ("conv1.weight has shape (64, 3, 3, 3), the model needs "
          "(64, 3, 7, 7)") in message


def test_missing_and_unexpected_keys(resnet18_ckpt, tmp_path):
  net, _ = resnet18_ckpt
  state_dict = net.state_dict()
  del state_dict["layer3.1.bn2.running_var"]
  state_dict["layer5.0.conv1.weight"] = torch.zeros(1)
  path = tmp_path / "edited.pth"
  torch.save(state_dict, path)
  with pytest.raises(ValueError) as info:
    models.load_torch_checkpoint("resnet18_cifar", path, 10)
  message = str(info.value)
  assert str(path) in message
  assert "missing keys [layer3.1.bn2.running_var]" in message
  assert "unexpected keys [layer5.0.conv1.weight]" in message


def test_truncated_file(resnet18_ckpt, tmp_path):
  _, path = resnet18_ckpt
  truncated = tmp_path / "truncated.pth"
  truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
  with pytest.raises(ValueError, match="truncated.pth"):
    models.load_torch_checkpoint("resnet18_cifar", truncated, 10)


def test_not_a_state_dict(tmp_path):
  path = tmp_path / "list.pth"
  torch.save([torch.zeros(3)], path)
  with pytest.raises(ValueError, match="not a state_dict"):
    models.read_torch_state_dict(path)


def test_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError):
    models.read_torch_state_dict(tmp_path / "absent.pth")
