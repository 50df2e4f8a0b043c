"""PyTorch checkpoints -> Flax: eval-mode parity with plain torch.nn references.

The reference networks (`benchmarks/torch_models.py`) are plain torch.nn, in
the layouts of the checkpoints line_jax imports: torchvision's ResNet-50, the
common CIFAR ResNet-18 (`shortcut` / `linear` names), and DICE's
DenseNet-BC-100 (a file holding {"state_dict": ...}). Weights are random; BN
statistics are set from a calibration batch and the affine parameters
randomised, so eval-mode BN is neither the identity nor input-independent.
torchvision's ResNet-18/34/50/101/152 are written out below as torchvision
defines them (torchvision itself is not a dependency).
"""

import copy

import jax
import numpy as np
import pytest

from line_jax import models

torch = pytest.importorskip("torch")

# pylint: disable=wrong-import-position
from benchmarks.torch_models import TorchBasicBlock  # noqa: E402
from benchmarks.torch_models import TorchBottleneck  # noqa: E402
from benchmarks.torch_models import TorchDenseNetBC  # noqa: E402
from benchmarks.torch_models import TorchResNet  # noqa: E402
from benchmarks.torch_models import randomise as _randomise  # noqa: E402


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


# --- torchvision's ResNets, written out as torchvision.models.resnet defines them ---------------


class _TVBasicBlock(torch.nn.Module):
  expansion = 1

  def __init__(self, inplanes, planes, stride=1, downsample=None):
    super().__init__()
    nn = torch.nn
    self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.relu = nn.ReLU(inplace=True)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = downsample

  def forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    return self.relu(self.bn2(self.conv2(out)) + identity)


class _TVBottleneck(torch.nn.Module):
  expansion = 4  # stride on the 3x3 convolution (ResNet v1.5), as torchvision

  def __init__(self, inplanes, planes, stride=1, downsample=None):
    super().__init__()
    nn = torch.nn
    self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(planes * 4)
    self.relu = nn.ReLU(inplace=True)
    self.downsample = downsample

  def forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    return self.relu(self.bn3(self.conv3(out)) + identity)


class _TVResNet(torch.nn.Module):
  """torchvision.models.resnet.ResNet: same modules, names and forward."""

  def __init__(self, block, layers, num_classes=1000):
    super().__init__()
    nn = torch.nn
    self.inplanes = 64
    self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(64)
    self.relu = nn.ReLU(inplace=True)
    self.maxpool = nn.MaxPool2d(3, 2, 1)
    self.layer1 = self._make_layer(block, 64, layers[0])
    self.layer2 = self._make_layer(block, 128, layers[1], 2)
    self.layer3 = self._make_layer(block, 256, layers[2], 2)
    self.layer4 = self._make_layer(block, 512, layers[3], 2)
    self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    self.fc = nn.Linear(512 * block.expansion, num_classes)

  def _make_layer(self, block, planes, blocks, stride=1):
    nn = torch.nn
    downsample = None
    if stride != 1 or self.inplanes != planes * block.expansion:
      downsample = nn.Sequential(
          nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
          nn.BatchNorm2d(planes * block.expansion))
    layers = [block(self.inplanes, planes, stride, downsample)]
    self.inplanes = planes * block.expansion
    layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)

  def features(self, x):
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    return torch.flatten(self.avgpool(x), 1)

  def forward(self, x):
    return self.fc(self.features(x))


_TORCHVISION = {  # name: (block, layers, len(state_dict()), parameters at 1000 classes)
    "resnet18": (_TVBasicBlock, [2, 2, 2, 2], 122, 11_689_512),
    "resnet34": (_TVBasicBlock, [3, 4, 6, 3], 218, 21_797_672),
    "resnet50": (_TVBottleneck, [3, 4, 6, 3], 320, 25_557_032),
    "resnet101": (_TVBottleneck, [3, 4, 23, 3], 626, 44_549_160),
    "resnet152": (_TVBottleneck, [3, 8, 36, 3], 932, 60_192_808),
}


def _calibrated(net, size, seed):
  """Random weights; BN statistics of a calibration batch, random BN affine."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.momentum = None  # cumulative: running stats = the batch's
        m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=gen))
        m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
    net.fc.bias.copy_(0.1 * torch.randn(net.fc.bias.shape, generator=gen))
    net.train()
    net(torch.randn(8, 3, size, size, generator=gen))
  return net.eval()


@pytest.mark.parametrize("name", sorted(_TORCHVISION))
def test_torchvision_resnet_state_dict_matches_torch(name, tmp_path):
  block, layers, num_keys, num_params = _TORCHVISION[name]
  torch.manual_seed(7)
  net = _calibrated(_TVResNet(block, layers, num_classes=5), 64, seed=8)
  state_dict = net.state_dict()
  assert len(state_dict) == num_keys  # torchvision's own key count
  assert num_params == sum(p.numel() for p in _TVResNet(block, layers).parameters())
  path = tmp_path / f"{name}.pth"
  torch.save(state_dict, path)
  model, variables = models.load_torch_checkpoint(name, path, num_classes=5)
  x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(9))
  with torch.no_grad():
    torch32 = net.features(x).numpy(), net(x).numpy()
    net64 = copy.deepcopy(net).double()
    exact = net64.features(x.double()).numpy(), net64(x.double()).numpy()
  got = jax.jit(model.apply)(variables, x.numpy().transpose(0, 2, 3, 1))[::-1]
  # Against float64: through 50 random blocks float32 rounding grows to ~1e-3
  # of the scale in PyTorch itself; JAX's float32 must be as close as that.
  for g, t32, want in zip(got, torch32, exact):
    scale = np.abs(want).max()
    tolerance = max(3 * np.abs(t32 - want).max(), 1e-5 * scale)
    np.testing.assert_allclose(g, want, rtol=0, atol=tolerance)
  logits = exact[1]
  assert np.abs(logits[0] - logits[1]).max() > 1e-2 * np.abs(logits).max()
  kernel, bias = models.head_params(variables, head="fc")
  np.testing.assert_array_equal(kernel, state_dict["fc.weight"].numpy().T)
  np.testing.assert_array_equal(bias, state_dict["fc.bias"].numpy())
