"""What a benchmark feeds an evaluation: a backbone and image sources.

Every image set is a random-access source of `(image or path, label)` records
(`line_jax.data` sources), streamed through the input pipeline later; none is
decoded here. Small sets (the offline OOD sets, SVHN's 10,000, a user's
`.npy`) are `ArraySource`s in memory; the training and test sets of a paper
benchmark stay on disk (an ImageFolder-layout folder or TFDS). Subsets
(`max_train`, `max_test`) follow the one subset rule, `data.subset_of`.

`Inputs` name whose hyperparameters the scorers take (`settings`): a
benchmark's own inputs its settings, a user's (`Inputs.from_arrays`) the
registry defaults unless they name a benchmark, and `hparams` over either.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
import os
from typing import Any

import numpy as np

from line_jax import data
from line_jax import features
from line_jax import models
from line_jax import scorers
from line_jax.suites import _catalog
from line_jax.suites import _ood


@dataclasses.dataclass(frozen=True)
class Inputs:
  """Everything a benchmark feeds the evaluation.

  Attributes:
    backbone: the network, its normalisation, head and preprocessing.
    train, test: ID sources of labelled records.
    ood: OOD set name -> source, in column order.
    settings: whose hyperparameters the scorers take (`hparams_for`): a
      benchmark's name (`SUITES`), or "none" for the registry defaults.
    hparams: `{scorer: {name: value}}` over those settings (yours).
  """

  backbone: features.Backbone
  train: Sequence
  test: Sequence
  ood: Mapping[str, Sequence]
  settings: str = _catalog.NO_BENCHMARK
  hparams: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if self.settings != _catalog.NO_BENCHMARK:
      _catalog.get(self.settings)  # An unknown name fails here, listing the known ones.
    for name, values in self.hparams.items():
      scorers.get(name).check_hparams(values)  # Unknown scorers and names fail here.
    object.__setattr__(self, "hparams", {k: dict(v) for k, v in self.hparams.items()})

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """`(H, W, C)` the network takes."""
    return self.backbone.input_shape

  @classmethod
  def from_arrays(cls, model, variables, mean, std, train_images, train_labels,
                  test_images, test_labels, ood: Mapping[str, np.ndarray], *,
                  head: str | None = None, settings: str = _catalog.NO_BENCHMARK,
                  hparams: Mapping[str, Mapping[str, Any]] | None = None) -> "Inputs":
    """Inputs from uint8 `[n, H, W, C]` arrays (custom data, tests).

    Args:
      model, variables, mean, std, head: the network (`features.Backbone`).
      train_images, train_labels, test_images, test_labels: the ID sets.
      ood: OOD set name -> images.
      settings: whose hyperparameters the scorers take: "none" (default),
        the registry defaults, or a benchmark's name for its settings (which
        were chosen for its model: "fashion_mnist" suits only a network
        like the embedded one).
      hparams: `{scorer: {name: value}}`, yours over those settings.
    """
    height, _, channels = np.shape(test_images)[1:]
    backbone = features.Backbone(model, variables, mean, std,
                                 data.Preprocess(height, height, channels), head)
    return cls(backbone,
               data.ArraySource(train_images, train_labels, name="train images"),
               data.ArraySource(test_images, test_labels, name="test images"),
               {k: data.ArraySource(v, name=k) for k, v in ood.items()},
               settings=settings, hparams=dict(hparams or {}))


def evenly_spaced(source: Sequence, count: int | None) -> Sequence:
  """The one subset rule, `data.subset_of` (its former name): every class in
  proportion, evenly spaced; all of `source` when `count` is None or larger."""
  return data.subset_of(source, count)


def fashion_mnist_inputs(checkpoint: str = models.DEFAULT_CHECKPOINT, *,
                         max_train: int | None = None, max_test: int | None = None,
                         ood_size: int = 2000, settings: str = "fashion_mnist",
                         id_folder: str | None = None,
                         backbone: features.Backbone | None = None) -> Inputs:
  """The default benchmark: Fashion-MNIST (Debian's files), the embedded OOD sets.

  `settings` names the Fashion-MNIST suite whose hyperparameters the scorers
  take ("fashion_mnist" or "fashion_mnist_cifar_settings"); `max_train`,
  `max_test`: subsets by the one rule (`data.subset_of`); `id_folder`: the
  ID images as `<id_folder>/{train,test}/<class>/<image>` instead of
  Fashion-MNIST's (a checkpoint trained on a folder of your own);
  `backbone`: the network instead of `checkpoint`'s (e.g. an imported
  PyTorch one, `Backbone.from_torch`).
  """
  suite = _catalog.get(settings)
  if id_folder:
    train, test = id_folder_sources(id_folder, None, suite.name)
  else:
    train, test = data.fashion_mnist_source("train"), data.fashion_mnist_source("test")
  return Inputs(
      backbone or features.Backbone.from_checkpoint(checkpoint),
      data.subset_of(train, max_train), data.subset_of(test, max_test),
      _ood.offline_sets(suite, ood_size), settings=suite.name)


def id_folder_sources(id_folder: str, num_classes: int | None, name: str
                      ) -> tuple[data.ImageFolderSource, data.ImageFolderSource]:
  """`(train, test)`: `<id_folder>/{train,test}/<class>/<image>`, one set of
  classes in both (`num_classes` of them, where given).

  Raises:
    FileNotFoundError: naming a missing `train/` or `test/`.
    ValueError: for classes that differ between the two, or in number.
  """
  for split in ("train", "test"):
    if not os.path.isdir(os.path.join(id_folder, split)):
      raise FileNotFoundError(f"--id-folder {id_folder}: no {split}/ folder (ImageFolder "
                              "layout: <id-folder>/{train,test}/<class>/<image>)")
  train = data.ImageFolderSource(os.path.join(id_folder, "train"), flat=False)
  test = data.ImageFolderSource(os.path.join(id_folder, "test"), flat=False)
  if train.classes != test.classes or num_classes not in (None, len(train.classes)):
    needs = f"the same {num_classes}" if num_classes else "the same ones"
    raise ValueError(
        f"--id-folder {id_folder}: train/ has {len(train.classes)} classes and test/ "
        f"{len(test.classes)}; {name} needs {needs} in both")
  return train, test


def paper_inputs(suite: _catalog.Suite, data_dir: str | None,
                 torch_checkpoint: str | None, *, id_folder: str | None = None,
                 max_train: int | None = None, max_test: int | None = None,
                 ood_size: int = 2000, backbone: features.Backbone | None = None
                 ) -> Inputs:
  """A paper benchmark (CIFAR-10/100, ImageNet) from local files.

  Args:
    suite: the benchmark.
    data_dir: TFDS datasets and the paper's OOD sets (may be None with
      `id_folder` and a suite with offline OOD sets).
    torch_checkpoint: the PyTorch state_dict of `suite.model`.
    id_folder: ID images in torchvision's ImageFolder layout,
      `<id_folder>/{train,test}/<class>/<image>`; None reads TFDS.
    max_train, max_test: subsets of this size by the one rule
      (`data.subset_of`: every class in proportion, evenly spaced).
    ood_size: images per offline OOD set.
    backbone: a network of your own with the suite's classes, instead of
      `suite.model` from `torch_checkpoint` (None then).

  Raises:
    FileNotFoundError: listing every missing input before anything loads.
    ValueError: a `backbone` of another number of classes.
  """
  missing = _catalog.missing_inputs(suite, data_dir, torch_checkpoint, id_folder,
                                    needs_network=backbone is None)
  if missing:
    raise FileNotFoundError(
        f"benchmark {suite.name!r} cannot run; missing:\n  - " + "\n  - ".join(missing))
  if backbone is not None and backbone.num_classes != suite.num_classes:
    raise ValueError(f"the network has {backbone.num_classes} classes; benchmark "
                     f"{suite.name!r} has {suite.num_classes}")
  if id_folder:
    train, test = id_folder_sources(id_folder, suite.num_classes, suite.name)
  else:
    test_split = data.STOCK_DATASETS[suite.id_dataset].eval_split
    train = data.TfdsSource(suite.id_dataset, "train", data_dir)
    test = data.TfdsSource(suite.id_dataset, test_split, data_dir)
  if backbone is None:
    model, variables = models.load_torch_checkpoint(suite.model, torch_checkpoint,
                                                    suite.num_classes)
    mean, std = data.MEAN_STD[suite.mean_std]
    backbone = features.Backbone(
        model, variables, mean, std,
        data.Preprocess(suite.image_size, suite.resize_size, suite.channels))
  return Inputs(backbone, data.subset_of(train, max_train), data.subset_of(test, max_test),
                _ood.suite_sets(suite, data_dir, ood_size), settings=suite.name)
