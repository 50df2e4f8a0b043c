"""Which network a run reads: a line_jax checkpoint or an imported PyTorch one.

    Network(checkpoint="ck/")                                  # models.save_checkpoint's
    Network(torch_checkpoint="r18.pth", arch="resnet18")       # torchvision's state_dict
    backbone = network.backbone()

One description, the same in every run's `Config` and record and behind
every CLI's `--checkpoint` / `--torch-checkpoint PATH --arch NAME
[--normalization KEY]` flags.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from line_jax import features
from line_jax import models


@dataclasses.dataclass(frozen=True)
class Network:
  """A line_jax checkpoint folder, or a PyTorch state_dict of a registered network.

  Attributes:
    checkpoint: a line_jax checkpoint folder (`models.save_checkpoint`,
      `features.Backbone.save`); None with `torch_checkpoint`.
    torch_checkpoint: a PyTorch state_dict file of `arch`.
    arch: the network of `torch_checkpoint` (`features.TORCH_INPUTS`).
    normalization: a `data.MEAN_STD` key for `torch_checkpoint`; None:
      what `arch`'s published checkpoints were trained with.
  """

  checkpoint: str | None = None
  torch_checkpoint: str | None = None
  arch: str | None = None
  normalization: str | None = None

  def resolved(self) -> "Network":
    """Checked (one network, `arch` with a PyTorch file only), paths absolute;
    no default: the committed checkpoint where nothing is given."""
    if self.torch_checkpoint is not None:
      if self.checkpoint is not None and os.path.abspath(self.checkpoint) != os.path.abspath(
          models.DEFAULT_CHECKPOINT):
        raise ValueError("give --checkpoint or --torch-checkpoint, not both")
      if self.arch is None:
        raise ValueError("--torch-checkpoint needs --arch NAME, the network it holds: "
                         f"{', '.join(sorted(features.TORCH_INPUTS))}")
      if self.arch not in features.TORCH_INPUTS:
        raise ValueError(f"unknown --arch {self.arch!r}; the PyTorch import supports "
                         f"{', '.join(sorted(features.TORCH_INPUTS))}")
      if not os.path.isfile(self.torch_checkpoint):
        raise FileNotFoundError(f"--torch-checkpoint {self.torch_checkpoint}: no such file")
      # The default named: a run given it explicitly is the same run.
      normalization = self.normalization or features.TORCH_INPUTS[self.arch][0]
      return Network(torch_checkpoint=os.path.abspath(self.torch_checkpoint), arch=self.arch,
                     normalization=normalization)
    if self.arch is not None or self.normalization is not None:
      raise ValueError("--arch and --normalization describe a --torch-checkpoint; a line_jax "
                       "--checkpoint records its own")
    return Network(checkpoint=os.path.abspath(self.checkpoint or models.DEFAULT_CHECKPOINT))

  def backbone(self) -> features.Backbone:
    """The network, its weights, normalisation and preprocessing."""
    net = self.resolved()
    if net.torch_checkpoint is not None:
      return features.Backbone.from_torch(net.torch_checkpoint, net.arch,
                                          normalization=net.normalization)
    return features.Backbone.from_checkpoint(net.checkpoint)

  def classes(self) -> tuple[str, ...] | None:
    """The class names a line_jax checkpoint records; None (a PyTorch file records none)."""
    net = self.resolved()
    if net.checkpoint is None:
      return None
    classes = models.read_checkpoint_config(net.checkpoint).get("classes")
    return None if classes is None else tuple(classes)

  def record(self) -> dict[str, Any]:
    """What a run's record says of its network (only the fields given)."""
    return {k: v for k, v in dataclasses.asdict(self.resolved()).items() if v is not None}

  def describe(self) -> str:
    net = self.resolved()
    if net.torch_checkpoint is not None:
      return f"{net.arch} from {net.torch_checkpoint}"
    return net.checkpoint
