"""A torchvision ResNet-18 `state_dict` in JAX: imported, checked, scored.

    python examples/torchvision_checkpoint.py                      # random weights
    python examples/torchvision_checkpoint.py --checkpoint r18.pth --num-classes 1000

With a path, the file is any `torch.save(model.state_dict(), path)` of
`torchvision.models.resnet18` (trained weights included). Without one, a
ResNet-18 in torchvision's layout is built with random weights (torchvision
itself if installed, else the same modules written out below) and saved to a
temporary file first. `line_jax.models.load_torch_checkpoint("resnet18", ...)`
reads it with `weights_only=True` (no pickle code runs) into line_jax's
ResNet, which returns `(logits, features)`; the head's weight may stay a
PyTorch tensor when fitting. Needs torch (the `[torch]` extra). ~20 s on CPU.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import numpy as np
import torch

from line_jax import data
from line_jax import features
from line_jax import metrics
from line_jax import models
from line_jax import scorers

SIDE = 64  # small images keep the example fast; ImageNet's 224 works the same way


def torchvision_resnet18(num_classes: int) -> torch.nn.Module:
  """torchvision's ResNet-18: the library's if installed, else its modules written out."""
  try:
    import torchvision  # pylint: disable=g-import-not-at-top
    return torchvision.models.resnet18(num_classes=num_classes)
  except ImportError:
    pass
  nn = torch.nn

  class BasicBlock(nn.Module):

    def __init__(self, inplanes, planes, stride=1):
      super().__init__()
      self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(planes)
      self.relu = nn.ReLU(inplace=True)
      self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(planes)
      self.downsample = None
      if stride != 1 or inplanes != planes:
        self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False),
                                        nn.BatchNorm2d(planes))

    def forward(self, x):
      identity = x if self.downsample is None else self.downsample(x)
      out = self.relu(self.bn1(self.conv1(x)))
      return self.relu(self.bn2(self.conv2(out)) + identity)

  class ResNet18(nn.Module):

    def __init__(self):
      super().__init__()
      self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
      self.bn1 = nn.BatchNorm2d(64)
      self.relu = nn.ReLU(inplace=True)
      self.maxpool = nn.MaxPool2d(3, 2, 1)
      widths = [(64, 64, 1), (64, 128, 2), (128, 256, 2), (256, 512, 2)]
      for i, (cin, cout, stride) in enumerate(widths):
        setattr(self, f"layer{i + 1}",
                nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout)))
      self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
      self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
      x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
      x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
      return self.fc(torch.flatten(self.avgpool(x), 1))

  return ResNet18()


def random_checkpoint(path: str, num_classes: int, seed: int = 0) -> torch.nn.Module:
  """Saves a random ResNet-18 `state_dict` (BN statistics from a random batch)."""
  torch.manual_seed(seed)
  net = torchvision_resnet18(num_classes)
  for m in net.modules():
    if isinstance(m, torch.nn.BatchNorm2d):
      m.momentum = None  # running statistics = those of the batch below
  with torch.no_grad():
    net.train()(torch.randn(16, 3, SIDE, SIDE))
  torch.save(net.eval().state_dict(), path)
  return net


def main(argv=None) -> dict[str, float]:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--checkpoint", help="a torchvision resnet18 state_dict; none: random")
  p.add_argument("--num-classes", type=int, default=10)
  p.add_argument("--size", type=int, default=256, help="images per set")
  args = p.parse_args(argv)
  start = time.perf_counter()

  with tempfile.TemporaryDirectory() as tmp:
    path, net = args.checkpoint, None
    if path is None:
      path = os.path.join(tmp, "resnet18.pth")
      net = random_checkpoint(path, args.num_classes)
    model, variables = models.load_torch_checkpoint("resnet18", path, args.num_classes)
  print(f"imported {path if args.checkpoint else 'a random torchvision ResNet-18'}: "
        f"{sum(x.size for x in jax.tree.leaves(variables['params'])):,} parameters")

  mean, std = data.MEAN_STD["imagenet2012"]
  ood_set = lambda name, seed: data.ood_set(name, args.size, seed, side=SIDE, channels=3)
  sets = {"id": ood_set("photos", 0), "textures": ood_set("textures", 1),
          "gaussian": ood_set("gaussian", 2)}  # stand-ins: use your own ID images
  extract = lambda images: features.extract(model, variables, images, mean=mean, std=std,
                                            batch_size=128, progress=False)
  out = {name: extract(images) for name, images in sets.items()}

  if net is not None:  # The same network in PyTorch gives the same features.
    x = (sets["id"][:8].astype(np.float32) / 255 - mean) / std
    with torch.no_grad():
      body = torch.nn.Sequential(*list(net.children())[:-1])
      want = body(torch.from_numpy(x.transpose(0, 3, 1, 2).astype(np.float32))).flatten(1)
    difference = np.abs(out["id"][1][:8] - want.numpy()).max()
    print(f"JAX vs PyTorch features: max difference {difference:.1e} "
          f"(scale {np.abs(want.numpy()).max():.1f})")

  # The head as PyTorch gives it: `fc.weight` is [classes, features], the kernel its .T;
  # fit and score take torch tensors as they are.
  if net is not None:
    kernel, bias = net.fc.weight.T, net.fc.bias
  else:
    kernel, bias = models.head_params(variables, head="fc")
  _, train_features = out["id"]
  results = {}
  # Scorers that need no labels (these stand-in images have none); with your
  # training set's labels, "line", "knn", "mahalanobis", ... fit the same way.
  for name in ("energy", "react"):
    scorer = scorers.get(name)
    state = scorer.fit(torch.from_numpy(train_features), None, kernel, bias)
    score_id = np.asarray(scorer.score(state, out["id"][1]))
    for ood in ("textures", "gaussian"):
      score_ood = np.asarray(scorer.score(state, out[ood][1]))
      results[f"{name}/{ood}"] = metrics.auroc(score_id, score_ood)
  print("AUROC " + "  ".join(f"{k} {v:.3f}" for k, v in results.items()))
  print(f"done in {time.perf_counter() - start:.1f} s")
  return results


if __name__ == "__main__":
  main()
