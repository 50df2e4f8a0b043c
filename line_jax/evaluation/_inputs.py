"""What an evaluation reads: the network, its normalisation and image sources.

Every image set is a random-access source of `(image or path, label)` records
(`line_jax.data` sources), streamed through the input pipeline later; none is
decoded here. Small sets (the offline OOD sets, SVHN's 10,000, a user's
`.npy`) are `ArraySource`s in memory; the training and test sets of a paper
benchmark stay on disk (an ImageFolder-layout folder or TFDS).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
import os
from typing import Any

import numpy as np

from line_jax import _protocols

DEFAULT_CHECKPOINT = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    "checkpoints", "fashion_mnist_resnet_small")


@dataclasses.dataclass
class Inputs:
  """Everything a benchmark feeds the evaluation.

  Attributes:
    model, variables: a `line_jax.models` network and its variables.
    mean, std: `[C]` normalisation in [0, 1] pixel units.
    train, test: ID sources of labelled records.
    ood: OOD set name -> source, in column order.
    image_shape: `(H, W, C)` the network takes.
    resize_size: shorter side before the center crop (None: `H`).
    head: path of the network's final Dense layer ("fc", "head/fc"), for a
      network that does not return `(logits, features)` itself: its input
      is the features (`line_jax.features.extract(head=...)`). None: the
      network returns `(logits, features)` and its head is "fc".
  """

  model: Any
  variables: Any
  mean: Sequence[float]
  std: Sequence[float]
  train: Sequence
  test: Sequence
  ood: dict[str, Sequence]
  image_shape: tuple[int, int, int]
  resize_size: int | None = None
  head: str | None = None

  def head_params(self):
    """`(kernel [features, classes], bias [classes] or None)` of the network."""
    from line_jax import models

    return models.head_params(self.variables, head=self.head or "fc")

  @classmethod
  def from_arrays(cls, model, variables, mean, std, train_images, train_labels,
                  test_images, test_labels, ood: Mapping[str, np.ndarray], *,
                  head: str | None = None) -> "Inputs":
    """Inputs from uint8 `[n, H, W, C]` arrays (tests, custom data)."""
    from line_jax import data

    return cls(model, variables, mean, std,
               data.ArraySource(train_images, train_labels, name="train images"),
               data.ArraySource(test_images, test_labels, name="test images"),
               {k: data.ArraySource(v, name=k) for k, v in ood.items()},
               tuple(np.shape(test_images)[1:]), head=head)


def evenly_spaced(source: Sequence, count: int | None) -> Sequence:
  """`count` records spread evenly over `source` (all when None or larger).

  Not the first `count`: an ImageFolder source is sorted by class, and a
  subset must hold every class for the per-class fits (LINe, Mahalanobis).
  """
  if count is None or count >= len(source):
    return source
  if count < 1:
    raise ValueError(f"a subset needs at least one image, got {count}")
  from line_jax import data

  return data.Subset(source, np.linspace(0, len(source) - 1, count).round().astype(np.int64))


def fashion_mnist_inputs(checkpoint: str = DEFAULT_CHECKPOINT, *,
                         max_train: int | None = None, max_test: int | None = None,
                         ood_size: int = 2000) -> Inputs:
  """The default benchmark: Fashion-MNIST (Debian's files), the embedded OOD sets."""
  from line_jax import _checkpoint
  from line_jax import data
  from line_jax.evaluation import _ood

  model, variables, config = _checkpoint.load_model(checkpoint)
  protocol = _protocols.get("fashion_mnist")
  mean, std = data.MEAN_STD["fashion_mnist"]
  return Inputs(
      model, variables, config.get("mean", mean), config.get("std", std),
      evenly_spaced(data.fashion_mnist_source("train"), max_train),
      evenly_spaced(data.fashion_mnist_source("test"), max_test),
      _ood.offline_sets(protocol, ood_size), (28, 28, 1))


def paper_inputs(protocol: _protocols.Protocol, data_dir: str | None,
                 torch_checkpoint: str | None, *, id_folder: str | None = None,
                 max_train: int | None = None, max_test: int | None = None,
                 ood_size: int = 2000) -> Inputs:
  """A paper benchmark (CIFAR-10/100, ImageNet) from local files.

  Args:
    protocol: the benchmark.
    data_dir: TFDS datasets and the paper's OOD sets (may be None with
      `id_folder` and a protocol with offline OOD sets).
    torch_checkpoint: the PyTorch state_dict of `protocol.model`.
    id_folder: ID images in torchvision's ImageFolder layout,
      `<id_folder>/{train,test}/<class>/<image>`; None reads TFDS.
    max_train, max_test: evenly spaced subsets of this size (quick runs).
    ood_size: images per offline OOD set.

  Raises:
    FileNotFoundError: listing every missing input before anything loads.
  """
  missing = _protocols.missing_inputs(protocol, data_dir, torch_checkpoint, id_folder)
  if missing:
    raise FileNotFoundError(
        f"benchmark {protocol.name!r} cannot run; missing:\n  - " + "\n  - ".join(missing))
  from line_jax import data
  from line_jax import models
  from line_jax.evaluation import _ood

  model, variables = models.load_torch_checkpoint(
      protocol.model, torch_checkpoint, protocol.num_classes)
  if id_folder:
    train = data.ImageFolderSource(os.path.join(id_folder, "train"), flat=False)
    test = data.ImageFolderSource(os.path.join(id_folder, "test"), flat=False)
    if len(train.classes) != protocol.num_classes or train.classes != test.classes:
      raise ValueError(
          f"--id-folder {id_folder}: train/ has {len(train.classes)} classes and test/ "
          f"{len(test.classes)}; {protocol.name} needs the same {protocol.num_classes} in both")
  else:
    from line_jax.data import _tfds_loader

    test_split = _tfds_loader.STOCK_DATASETS[protocol.id_dataset].eval_split
    train = data.TfdsSource(protocol.id_dataset, "train", data_dir)
    test = data.TfdsSource(protocol.id_dataset, test_split, data_dir)
  mean, std = data.MEAN_STD[protocol.mean_std]
  return Inputs(model, variables, mean, std, evenly_spaced(train, max_train),
                evenly_spaced(test, max_test), _ood.protocol_sets(protocol, data_dir, ood_size),
                (protocol.image_size, protocol.image_size, protocol.channels),
                protocol.resize_size)
