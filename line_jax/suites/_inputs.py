"""What a benchmark feeds an evaluation: a backbone and image sources.

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

import numpy as np

from line_jax import data
from line_jax import features
from line_jax import models
from line_jax.suites import _catalog
from line_jax.suites import _ood


@dataclasses.dataclass(frozen=True)
class Inputs:
  """Everything a benchmark feeds the evaluation.

  Attributes:
    backbone: the network, its normalisation, head and preprocessing.
    train, test: ID sources of labelled records.
    ood: OOD set name -> source, in column order.
  """

  backbone: features.Backbone
  train: Sequence
  test: Sequence
  ood: Mapping[str, Sequence]

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """`(H, W, C)` the network takes."""
    p = self.backbone.preprocess
    return (p.image_size, p.image_size, p.channels)

  @classmethod
  def from_arrays(cls, model, variables, mean, std, train_images, train_labels,
                  test_images, test_labels, ood: Mapping[str, np.ndarray], *,
                  head: str | None = None) -> "Inputs":
    """Inputs from uint8 `[n, H, W, C]` arrays (tests, custom data)."""
    height, _, channels = np.shape(test_images)[1:]
    backbone = features.Backbone(model, variables, mean, std,
                                 data.Preprocess(height, height, channels), head)
    return cls(backbone,
               data.ArraySource(train_images, train_labels, name="train images"),
               data.ArraySource(test_images, test_labels, name="test images"),
               {k: data.ArraySource(v, name=k) for k, v in ood.items()})


def evenly_spaced(source: Sequence, count: int | None) -> Sequence:
  """`count` records spread evenly over `source` (all when None or larger).

  Not the first `count`: an ImageFolder source is sorted by class, and a
  subset must hold every class for the per-class fits (LINe, Mahalanobis).
  """
  if count is None or count >= len(source):
    return source
  if count < 1:
    raise ValueError(f"a subset needs at least one image, got {count}")
  return data.Subset(source, np.linspace(0, len(source) - 1, count).round().astype(np.int64))


def fashion_mnist_inputs(checkpoint: str = models.DEFAULT_CHECKPOINT, *,
                         max_train: int | None = None, max_test: int | None = None,
                         ood_size: int = 2000) -> Inputs:
  """The default benchmark: Fashion-MNIST (Debian's files), the embedded OOD sets."""
  suite = _catalog.get("fashion_mnist")
  return Inputs(
      features.Backbone.from_checkpoint(checkpoint),
      evenly_spaced(data.fashion_mnist_source("train"), max_train),
      evenly_spaced(data.fashion_mnist_source("test"), max_test),
      _ood.offline_sets(suite, ood_size))


def paper_inputs(suite: _catalog.Suite, data_dir: str | None,
                 torch_checkpoint: str | None, *, id_folder: str | None = None,
                 max_train: int | None = None, max_test: int | None = None,
                 ood_size: int = 2000) -> Inputs:
  """A paper benchmark (CIFAR-10/100, ImageNet) from local files.

  Args:
    suite: the benchmark.
    data_dir: TFDS datasets and the paper's OOD sets (may be None with
      `id_folder` and a suite with offline OOD sets).
    torch_checkpoint: the PyTorch state_dict of `suite.model`.
    id_folder: ID images in torchvision's ImageFolder layout,
      `<id_folder>/{train,test}/<class>/<image>`; None reads TFDS.
    max_train, max_test: evenly spaced subsets of this size (quick runs).
    ood_size: images per offline OOD set.

  Raises:
    FileNotFoundError: listing every missing input before anything loads.
  """
  missing = _catalog.missing_inputs(suite, data_dir, torch_checkpoint, id_folder)
  if missing:
    raise FileNotFoundError(
        f"benchmark {suite.name!r} cannot run; missing:\n  - " + "\n  - ".join(missing))
  model, variables = models.load_torch_checkpoint(suite.model, torch_checkpoint,
                                                  suite.num_classes)
  if id_folder:
    train = data.ImageFolderSource(os.path.join(id_folder, "train"), flat=False)
    test = data.ImageFolderSource(os.path.join(id_folder, "test"), flat=False)
    if len(train.classes) != suite.num_classes or train.classes != test.classes:
      raise ValueError(
          f"--id-folder {id_folder}: train/ has {len(train.classes)} classes and test/ "
          f"{len(test.classes)}; {suite.name} needs the same {suite.num_classes} in both")
  else:
    test_split = data.STOCK_DATASETS[suite.id_dataset].eval_split
    train = data.TfdsSource(suite.id_dataset, "train", data_dir)
    test = data.TfdsSource(suite.id_dataset, test_split, data_dir)
  mean, std = data.MEAN_STD[suite.mean_std]
  backbone = features.Backbone(
      model, variables, mean, std,
      data.Preprocess(suite.image_size, suite.resize_size, suite.channels))
  return Inputs(backbone, evenly_spaced(train, max_train), evenly_spaced(test, max_test),
                _ood.suite_sets(suite, data_dir, ood_size))
