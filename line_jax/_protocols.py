"""Benchmark protocols: which model, data, OOD sets and hyperparameters.

One `Protocol` per benchmark `python -m line_jax.evaluate --benchmark` runs.
Scorer hyperparameters that differ from the registry defaults (which are the
papers' ImageNet settings) are listed per benchmark, each with its source:

| scorer      | fashion_mnist (tuned) (0) | fashion_mnist_cifar_settings   | cifar10 / cifar100           | imagenet              |
|-------------|---------------------------|--------------------------------|------------------------------|-----------------------|
| line        | 10/10, clip = p80         | p_w 90, p_a 90, clip = p90 (1) | 90/90/1.0; 90/10/1.0 (LINe)  | 10/10/0.8 (LINe)      |
| react       | p 80                      | p 90                           | p 90 (ReAct)                 | p 90 (ReAct)          |
| dice        | p 10                      | p 90 (DICE's CIFAR)            | p 90 (DICE)                  | p 70 (DICE)           |
| ash_p/b/s   | 50 / 50 / 50              | 90 / 95 / 95 (ASH's CIFAR)     | 90 / 95 / 95 (ASH)           | 60 / 65 / 90 (ASH)    |
| scale       | p 80                      | p 85                           | p 85                         | p 85 (SCALE)          |
| knn         | k 1                       | k 50 (KNN's CIFAR)             | k 50 (KNN)                   | k 1000 (KNN)          |
| vim         | D 32                      | D 64 (2)                       | D 256 (2)                    | D 1000 (ViM's code)   |
| react_dice  | default (15, 90)          | p 90, percentile 90            | p 90 (DICE), 90 (ReAct)      | p 15, percentile 90   |

Where a benchmark names no value, the registry's default holds, and two of
those adapt to the model and data: KNN's k is one neighbour per 1,000 bank
rows (`k=None`, KNN's CIFAR ratio) and ViM's D follows the official rule on
the feature width (`dim=None`). Every other scorer runs at its registry
default everywhere: its paper's setting, which for some (GEN's M = 100 capped at the class count, NNGuide's
12,811-row bank, NCI's alpha) is the ImageNet one, there being no CIFAR
setting in the paper or official code.

(0) Chosen by `python -m line_jax.tune` on a validation split of the training
    set and a validation OOD set disjoint from every test OOD set, for every
    method alike (best validation AUROC on its grid). Several choices sit on
    the edge of their grid (DICE 10, ASH 50, KNN 1, LINe 10/10).
(1) LINe's CIFAR clip of 1.0 is in DenseNet-BC feature units (DICE's CIFAR
    code sets ReAct's threshold to 1.0 too). Measured on the DICE CIFAR-10
    checkpoint over the 50,000 training images of the JPEG copy
    (docs/cifar10), 1.0 is the 96.6th percentile of the activations; their
    90th percentile, ReAct's own CIFAR rule and what the cifar10 protocol's
    `react` uses, is 0.40. This 128-feature network has other units, so
    the clip is a percentile of its own training activations
    (`TrainPercentile(90)`), resolved when fitting.
(2) ViM's paper fixes D only for features >= 1536 (D = 1000) or 768 (512);
    for the narrower CIFAR / Fashion-MNIST features we take half the width,
    rounded down to a power of two.

Normalisation: the CIFAR protocols use `MEAN_STD["cifar_line"]`, mean
(0.4914, 0.4822, 0.4465), std (0.2023, 0.1994, 0.2010): the constants of the
official LINe and DICE `ood_eval.py` / `precompute.py`, with which the DICE
DenseNet-BC-100 checkpoints were trained and evaluated.

OOD sets. The embedded Fashion-MNIST ones are built at 2,000 images each (see
`line_jax.data._embedded_ood`). The paper's CIFAR OOD sets, each used where
it is present under `--data-dir`:

* SVHN: the official selection of `select_svhn_data.py` (LINe / DICE): the
  first 1,000 test images of each label, in the order of torchvision's
  `test_32x32.mat`, 10,000 in all. Read from `<data-dir>/svhn/test_32x32.mat`
  (torchvision's `SVHN(root="<data-dir>/svhn")` file). TFDS's `svhn_cropped`
  is not used: it stores the test split shuffled, so "the first 1,000" there
  would be other images.
* LSUN-C, LSUN-R, iSUN: ODIN's curated folders.
* Textures: DTD, the 5,640 images, resized to 32 and center-cropped.
* Places365: DIFFERENT from the paper. The official code reads a 10,000-image
  Places365 subset whose file list was never published; here it is TFDS's
  `places365_small` validation split, its first 10,000, resized to 32. Its
  numbers are therefore not comparable image for image.

Where none of a CIFAR protocol's paper sets is present, the offline sets
stand in (`offline_ood`): the embedded sets built at 32x32 RGB plus
Fashion-MNIST; see `line_jax.data._embedded_ood` for each. ImageNet: iNaturalist, SUN,
Places, Textures (curated folders, 224 crops of 256 resizes); it has no
offline stand-in.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from line_jax import scorers


# One class for "a percentile of the training activations", whether a
# protocol or a scorer's default sets it: `hparams_for` resolves it here, a
# fold resolves it where it is passed through unresolved.
TrainPercentile = scorers.TrainPercentile


@dataclasses.dataclass(frozen=True)
class OodSource:
  """Where one OOD set of a paper benchmark comes from.

  Attributes:
    name: column name in the results.
    kind: "tfds" (a TFDS dataset), "curated" (`line_jax.data.load_curated`)
      or "svhn_mat" (torchvision's SVHN `.mat` files).
    dataset: TFDS name, curated key, or folder under the data dir
      ("svhn_mat": it holds `<split>_32x32.mat`).
    split: TFDS or SVHN split (ignored for curated sets).
    max_images: keep only the first this many (None: all).
    per_label: keep only the first this many images of each label, in file
      order (None: all); SVHN's official selection.
  """

  name: str
  kind: str
  dataset: str
  split: str | None = None
  max_images: int | None = None
  per_label: int | None = None

  def path(self, data_dir: str) -> str:
    """Where this set lives under `data_dir` (TFDS: the dataset's folder)."""
    if self.kind == "svhn_mat":
      return os.path.join(data_dir, self.dataset, f"{self.split}_32x32.mat")
    if self.kind == "curated":
      from line_jax.data import CURATED_OOD  # Light: no TFDS import.

      return os.path.join(data_dir, CURATED_OOD[self.dataset].folder)
    return os.path.join(data_dir, self.dataset)

  def present(self, data_dir: str | None) -> bool:
    """Whether the set can be read from `data_dir` (nothing is loaded)."""
    if not data_dir:
      return False
    if self.kind == "tfds":
      return _tfds_prepared(self.dataset, data_dir)
    if self.kind == "svhn_mat":
      return os.path.isfile(self.path(data_dir))
    return os.path.isdir(self.path(data_dir))


@dataclasses.dataclass(frozen=True)
class Protocol:
  """One benchmark.

  Attributes:
    name: the `--benchmark` value.
    id_dataset: TFDS name of the in-distribution data ("" for the embedded
      Fashion-MNIST, read from Debian's IDX files).
    model: `line_jax.models` registry name of the network.
    num_classes: classes of the head.
    mean_std: key of `line_jax.data.MEAN_STD` for normalisation.
    image_size: side of the network input; resize_size: shorter side before
      the center crop (ImageNet: 256 -> 224); channels: of the input.
    ood: the paper's OOD sets (empty: the embedded sets).
    offline_ood: `line_jax.data._embedded_ood` set names that stand in where
      none of `ood` is present (built at `image_size` x `channels`).
    hparams: scorer name -> hyperparameters overriding the registry defaults;
      a `TrainPercentile` value is resolved on the training features.
  """

  name: str
  id_dataset: str
  model: str
  num_classes: int
  mean_std: str
  image_size: int
  resize_size: int
  channels: int
  ood: tuple[OodSource, ...]
  hparams: Mapping[str, Mapping[str, Any]]
  offline_ood: tuple[str, ...] = ()


_CIFAR_OOD = (
    OodSource("svhn", "svhn_mat", "svhn", "test", per_label=1000),
    OodSource("lsun_c", "curated", "lsun_c"),
    OodSource("lsun_r", "curated", "lsun_r"),
    OodSource("isun", "curated", "isun"),
    OodSource("textures", "curated", "textures"),
    OodSource("places365", "tfds", "places365_small", "validation", 10_000),
)
_IMAGENET_OOD = (
    OodSource("inaturalist", "curated", "inaturalist"),
    OodSource("sun", "curated", "sun"),
    OodSource("places", "curated", "places"),
    OodSource("textures", "curated", "textures"),
)
_EMBEDDED = ("letters", "digits", "textures", "photos", "faces", "gaussian", "uniform")
# Fashion-MNIST is an OOD set only where it is not the ID data.
_CIFAR_OFFLINE = (*_EMBEDDED[:5], "fashion_mnist", *_EMBEDDED[5:])
_CIFAR_COMMON = {
    "react": {"percentile": 90.0},
    "dice": {"p": 90.0},
    "ash_p": {"percentile": 90.0},
    "ash_b": {"percentile": 95.0},
    "ash_s": {"percentile": 95.0},
    "knn": {"k": 50},
    # DICE's CIFAR sparsity (p = 90) with ReAct's percentile (90); the
    # registry default (p = 15) is DICE's ImageNet demo.
    "react_dice": {"p": 90.0, "percentile": 90.0},
}

PROTOCOLS: dict[str, Protocol] = {
    # Selected by `python -m line_jax.tune` (validation split of the training
    # set and a validation OOD set disjoint from the test sets), every method
    # alike: the default of the embedded benchmark.
    "fashion_mnist": Protocol(
        "fashion_mnist", "", "resnet_small", 10, "fashion_mnist", 28, 28, 1, (),
        offline_ood=_EMBEDDED, hparams={"react": {"percentile": 80.0}, "dice": {"p": 10.0}, "ash_p": {"percentile": 50.0},
         "ash_b": {"percentile": 50.0}, "ash_s": {"percentile": 50.0},
         "scale": {"percentile": 80.0}, "knn": {"k": 1}, "vim": {"dim": 32},
         "line": {"p_w": 10.0, "p_a": 10.0, "clip": TrainPercentile(80.0)}}),
    # The CIFAR settings carried over unchanged, for comparison.
    "fashion_mnist_cifar_settings": Protocol(
        "fashion_mnist_cifar_settings", "", "resnet_small", 10, "fashion_mnist", 28, 28, 1, (),
        offline_ood=_EMBEDDED, hparams={**_CIFAR_COMMON, "vim": {"dim": 64},
         "line": {"p_w": 90.0, "p_a": 90.0, "clip": TrainPercentile(90.0)}}),
    "cifar10": Protocol(
        "cifar10", "cifar10", "densenet100", 10, "cifar_line", 32, 32, 3, _CIFAR_OOD,
        offline_ood=_CIFAR_OFFLINE, hparams={**_CIFAR_COMMON, "vim": {"dim": 256},
         "line": {"p_w": 90.0, "p_a": 90.0, "clip": 1.0}}),
    "cifar100": Protocol(
        "cifar100", "cifar100", "densenet100", 100, "cifar_line", 32, 32, 3, _CIFAR_OOD,
        offline_ood=_CIFAR_OFFLINE, hparams={**_CIFAR_COMMON, "vim": {"dim": 256},
         "line": {"p_w": 90.0, "p_a": 10.0, "clip": 1.0}}),
    "imagenet": Protocol(
        "imagenet", "imagenet2012", "resnet50", 1000, "imagenet2012", 224, 256, 3,
        _IMAGENET_OOD,
        {"knn": {"k": 1000}, "vim": {"dim": 1000},
         "line": {"p_w": 10.0, "p_a": 10.0, "clip": 0.8}}),
}


def get(name: str) -> Protocol:
  """The protocol called `name`; ValueError listing the known ones."""
  if name not in PROTOCOLS:
    raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(PROTOCOLS)}, or "
                     f"{NO_BENCHMARK!r} for the registry defaults")
  return PROTOCOLS[name]


NO_BENCHMARK = "none"  # `--benchmark none`: every scorer at its registry defaults.


def hparams_for(protocol: Protocol | str | None, method: str,
                overrides: Mapping[str, Any] | None = None,
                train_features: np.ndarray | None = None) -> dict[str, Any]:
  """The hyperparameters `method` runs with: one rule for fit, tune and evaluate.

  The scorer's registry defaults, then the benchmark's settings, then the
  user's `overrides` (`--hparam`), each over the last.

  Args:
    protocol: the benchmark (a `Protocol` or its name); None or "none" for
      the registry defaults alone.
    method: scorer name.
    overrides: `{hyperparameter: value}` the user set.
    train_features: `[n, features]`, to resolve a `TrainPercentile` that the
      scorer does not resolve itself while fitting (None: only those the
      scorer resolves are allowed).
  """
  defaults = scorers.get(method).defaults
  if isinstance(protocol, str):
    protocol = None if protocol == NO_BENCHMARK else get(protocol)
  out = dict(defaults)
  out.update({} if protocol is None else protocol.hparams.get(method, {}))
  out.update(overrides or {})
  for key, value in out.items():
    # A scorer whose default is a TrainPercentile resolves it itself, exactly
    # and across processes, while it fits; others get the value.
    if isinstance(value, TrainPercentile) and not isinstance(defaults.get(key), TrainPercentile):
      if train_features is None:
        raise ValueError(f"{method}.{key} = {value} needs the training features in memory; "
                         "give the value itself")
      out[key] = value.resolve(train_features)
  return out


def missing_inputs(protocol: Protocol, data_dir: str | None,
                   torch_checkpoint: str | None, id_folder: str | None = None
                   ) -> list[str]:
  """What a paper benchmark needs and cannot find, one line each.

  Looks without loading: the PyTorch checkpoint file and the ID data, either
  an ImageFolder-layout `id_folder` (with `train/` and `test/`) or the TFDS
  dataset prepared under `data_dir`. OOD sets are not required where the
  protocol has offline stand-ins (`paper_ood`); otherwise each missing one is
  listed.
  """
  missing = []
  if not torch_checkpoint:
    missing.append(f"--torch-checkpoint: the {protocol.model} PyTorch state_dict "
                   f"trained on {protocol.id_dataset}")
  elif not os.path.isfile(torch_checkpoint):
    missing.append(f"--torch-checkpoint {torch_checkpoint}: no such file")
  if id_folder:
    for split in ("train", "test"):
      if not os.path.isdir(os.path.join(id_folder, split)):
        missing.append(f"--id-folder {id_folder}: no {split}/ folder (ImageFolder "
                       "layout: <folder>/{train,test}/<class>/<image>)")
  elif not data_dir:
    missing.append(f"--id-folder or --data-dir: the {protocol.id_dataset} images "
                   "(an ImageFolder-layout folder, or the folder of TFDS datasets)")
  elif not _tfds_prepared(protocol.id_dataset, data_dir):
    missing.append(f"TFDS dataset {protocol.id_dataset!r} is not prepared under "
                   f"{data_dir} (prepare it with tfds, or pass --id-folder)")
  if not protocol.offline_ood:
    missing.extend(paper_ood(protocol, data_dir)[1])
  return missing


def paper_ood(protocol: Protocol, data_dir: str | None
              ) -> tuple[tuple[OodSource, ...], list[str]]:
  """The paper OOD sets present under `data_dir`, and a line per absent one."""
  present, absent = [], []
  for source in protocol.ood:
    if source.present(data_dir):
      present.append(source)
    elif not data_dir:
      absent.append(f"OOD set {source.name!r}: no --data-dir")
    elif source.kind == "tfds":
      absent.append(f"OOD set {source.name!r}: TFDS dataset {source.dataset!r} is not "
                    f"prepared under {data_dir}")
    elif source.kind == "svhn_mat":
      absent.append(f"OOD set {source.name!r}: {source.path(data_dir)} not found "
                    "(torchvision.datasets.SVHN(root, split='test') writes it)")
    else:
      absent.append(f"OOD set {source.name!r}: folder {source.path(data_dir)} not "
                    "found (line_jax.data.download_curated)")
  return tuple(present), absent


def first_per_label(labels: np.ndarray, per_label: int) -> np.ndarray:
  """Indices of the first `per_label` samples of each label, in file order.

  The rule of LINe's / DICE's `select_svhn_data.py`: walk the test set in
  order and keep a sample while its label has fewer than `per_label` kept.

  Args:
    labels: `[n]` integer labels.
    per_label: how many to keep of each label.

  Returns:
    `[k]` int64 indices into `labels`, increasing.
  """
  labels = np.asarray(labels).reshape(-1)
  order = np.argsort(labels, kind="stable")  # Stable: file order within a label.
  sorted_labels = labels[order]
  starts = np.searchsorted(sorted_labels, sorted_labels, side="left")
  rank = np.arange(labels.size) - starts  # Position of each sample within its label.
  return np.sort(order[rank < per_label]).astype(np.int64)


def _tfds_prepared(name: str, data_dir: str) -> bool:
  # TFDS writes <data_dir>/<name>/<config?>/<version>/dataset_info.json.
  root = os.path.join(data_dir, name)
  if not os.path.isdir(root):
    return False
  for _, _, files in os.walk(root):
    if "dataset_info.json" in files:
      return True
  return False
