"""The catalog of benchmark suites and the one hyperparameter rule (see `line_jax.suites`)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from line_jax import scorers


# One class for "a percentile of the training activations", whether a
# suite or a scorer's default sets it: `hparams_for` resolves it here, a
# fold resolves it where it is passed through unresolved.
TrainPercentile = scorers.TrainPercentile


@dataclasses.dataclass(frozen=True)
class OodSource:
  """Where one OOD set of a paper benchmark comes from.

  Attributes:
    name: column name in the results.
    kind: "tfds" (a TFDS dataset), "curated" (a `line_jax.data.CURATED_OOD`
      folder) or "svhn_mat" (torchvision's SVHN `.mat` files).
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
class Suite:
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
    offline_ood: `line_jax.data.ood_set` names that stand in where
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

SUITES: dict[str, Suite] = {
    # Selected by `python -m line_jax.tune` (validation split of the training
    # set and a validation OOD set disjoint from the test sets), every method
    # alike: the default of the embedded benchmark.
    "fashion_mnist": Suite(
        "fashion_mnist", "", "resnet_small", 10, "fashion_mnist", 28, 28, 1, (),
        offline_ood=_EMBEDDED, hparams={"react": {"percentile": 80.0}, "dice": {"p": 10.0}, "ash_p": {"percentile": 50.0},
         "ash_b": {"percentile": 50.0}, "ash_s": {"percentile": 50.0},
         "scale": {"percentile": 80.0}, "knn": {"k": 1}, "vim": {"dim": 32},
         "line": {"p_w": 10.0, "p_a": 10.0, "clip": TrainPercentile(80.0)}}),
    # The CIFAR settings carried over unchanged, for comparison.
    "fashion_mnist_cifar_settings": Suite(
        "fashion_mnist_cifar_settings", "", "resnet_small", 10, "fashion_mnist", 28, 28, 1, (),
        offline_ood=_EMBEDDED, hparams={**_CIFAR_COMMON, "vim": {"dim": 64},
         "line": {"p_w": 90.0, "p_a": 90.0, "clip": TrainPercentile(90.0)}}),
    "cifar10": Suite(
        "cifar10", "cifar10", "densenet100", 10, "cifar_line", 32, 32, 3, _CIFAR_OOD,
        offline_ood=_CIFAR_OFFLINE, hparams={**_CIFAR_COMMON, "vim": {"dim": 256},
         "line": {"p_w": 90.0, "p_a": 90.0, "clip": 1.0}}),
    "cifar100": Suite(
        "cifar100", "cifar100", "densenet100", 100, "cifar_line", 32, 32, 3, _CIFAR_OOD,
        offline_ood=_CIFAR_OFFLINE, hparams={**_CIFAR_COMMON, "vim": {"dim": 256},
         "line": {"p_w": 90.0, "p_a": 10.0, "clip": 1.0}}),
    "imagenet": Suite(
        "imagenet", "imagenet2012", "resnet50", 1000, "imagenet2012", 224, 256, 3,
        _IMAGENET_OOD,
        {"knn": {"k": 1000}, "vim": {"dim": 1000},
         "line": {"p_w": 10.0, "p_a": 10.0, "clip": 0.8}}),
}


def get(name: str) -> Suite:
  """The suite called `name`; ValueError listing the known ones."""
  if name not in SUITES:
    raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(SUITES)}, or "
                     f"{NO_BENCHMARK!r} for the registry defaults")
  return SUITES[name]


NO_BENCHMARK = "none"  # `--benchmark none`: every scorer at its registry defaults.


def hparams_for(suite: Suite | str | None, method: str,
                overrides: Mapping[str, Any] | None = None,
                train_features: np.ndarray | None = None) -> dict[str, Any]:
  """The hyperparameters `method` runs with: one rule for fit, tune and evaluate.

  The scorer's registry defaults, then the benchmark's settings, then the
  user's `overrides` (`--hparam`), each over the last.

  Args:
    suite: the benchmark (a `Suite` or its name); None or "none" for
      the registry defaults alone.
    method: scorer name.
    overrides: `{hyperparameter: value}` the user set.
    train_features: `[n, features]`, to resolve a `TrainPercentile` that the
      scorer does not resolve itself while fitting (None: only those the
      scorer resolves are allowed).
  """
  defaults = scorers.get(method).defaults
  if isinstance(suite, str):
    suite = None if suite == NO_BENCHMARK else get(suite)
  out = dict(defaults)
  out.update({} if suite is None else suite.hparams.get(method, {}))
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


def missing_inputs(suite: Suite, data_dir: str | None,
                   torch_checkpoint: str | None, id_folder: str | None = None, *,
                   needs_network: bool = True) -> list[str]:
  """What a paper benchmark needs and cannot find, one line each.

  Looks without loading: the PyTorch checkpoint file (unless `needs_network`
  is False: a network of the user's is given) and the ID data, either
  an ImageFolder-layout `id_folder` (with `train/` and `test/`) or the TFDS
  dataset prepared under `data_dir`. OOD sets are not required where the
  suite has offline stand-ins (`paper_ood`); otherwise each missing one is
  listed.
  """
  missing = []
  if needs_network and not torch_checkpoint:
    missing.append(f"--torch-checkpoint: the {suite.model} PyTorch state_dict "
                   f"trained on {suite.id_dataset}")
  elif needs_network and not os.path.isfile(torch_checkpoint):
    missing.append(f"--torch-checkpoint {torch_checkpoint}: no such file")
  if id_folder:
    for split in ("train", "test"):
      if not os.path.isdir(os.path.join(id_folder, split)):
        missing.append(f"--id-folder {id_folder}: no {split}/ folder (ImageFolder "
                       "layout: <folder>/{train,test}/<class>/<image>)")
  elif not data_dir:
    missing.append(f"--id-folder or --data-dir: the {suite.id_dataset} images "
                   "(an ImageFolder-layout folder, or the folder of TFDS datasets)")
  elif not _tfds_prepared(suite.id_dataset, data_dir):
    missing.append(f"TFDS dataset {suite.id_dataset!r} is not prepared under "
                   f"{data_dir} (prepare it with tfds, or pass --id-folder)")
  if not suite.offline_ood:
    missing.extend(paper_ood(suite, data_dir)[1])
  return missing


def paper_ood(suite: Suite, data_dir: str | None
              ) -> tuple[tuple[OodSource, ...], list[str]]:
  """The paper OOD sets present under `data_dir`, and a line per absent one."""
  present, absent = [], []
  for source in suite.ood:
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
