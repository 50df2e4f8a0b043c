"""PyTorch checkpoints -> Flax: eval-mode parity with plain torch.nn references.

The reference networks (`benchmarks/torch_models.py`) are plain torch.nn, in
the layouts of the checkpoints line_jax imports: torchvision's ResNet-50, the
common CIFAR ResNet-18 (`shortcut` / `linear` names), and DICE's
DenseNet-BC-100 (a file holding {"state_dict": ...}). Weights are random; BN
statistics are set from a calibration batch and the affine parameters
randomised, so eval-mode BN is neither the identity nor input-independent.
"""

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
