"""OpenOOD v1.5's benchmarks as data: which image list is which set, and the
rule for the sets a user has only part of.

    protocol = suites.OPENOOD["openood_cifar10"]
    sets = suites.openood_sets(protocol, "images_classic_root", partial=True)
    sets.sources["mnist"], sets.coverage["mnist"]   # 10,000 of 70,000 listed

A protocol names OpenOOD's own lists under `<data_dir>/benchmark_imglist/
<id>/`, whose paths are relative to `<data_dir>` (OpenOOD's `images_classic/`
with its `benchmark_imglist/` beside the image folders, as `../shared/data`
is laid out). The sets and groups are those of OpenOOD v1.5's
`evaluation_api/datasets.py` (`DATA_INFO`): ID train / val / test, near-OOD,
far-OOD, and the validation OOD set its hyperparameter search uses.

Rule for absent files, one for every list: a set whose listed files are all
absent is skipped and named; one with some absent is refused with the count,
unless `partial` is given, in which case the present files are used and the
count travels with the set (`Coverage`). The ID lists and the validation OOD
list cannot be skipped: without them there is nothing to fit or tune on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
import os

from line_jax import data
from line_jax import features
from line_jax import models


@dataclasses.dataclass(frozen=True)
class OpenOODProtocol:
  """One OpenOOD v1.5 benchmark.

  Attributes:
    name: the `--benchmark` value.
    id_name: the ID data set (`benchmark_imglist/<id_name>/`).
    num_classes: classes of the ID data.
    train, val, test: list names (file stems) of the ID splits: fitting,
      ID validation (hyperparameter search), ID test.
    near, far: `(set name, list name)` of each test OOD set, in column order.
    val_ood: `(set name, list name)` of the validation OOD sets.
    image_size, channels: the network input OpenOOD feeds (Resize, then
      CenterCrop, RGB).
    model: the `--arch` default (the DICE / LINe checkpoint's network).
    normalization: `{arch: data.MEAN_STD key}`, the constants a checkpoint
      of that network was trained with; `default_normalization` for others.
    default_normalization: OpenOOD's own constants for this ID set.
    settings: `{arch: suite name}` whose hyperparameters the untuned rows take
      (the paper's settings are for the paper's network only); other
      networks take the registry defaults.
  """

  name: str
  id_name: str
  num_classes: int
  train: str
  val: str
  test: str
  near: tuple[tuple[str, str], ...]
  far: tuple[tuple[str, str], ...]
  val_ood: tuple[tuple[str, str], ...]
  image_size: int
  channels: int
  model: str
  normalization: Mapping[str, str]
  default_normalization: str
  settings: Mapping[str, str]

  def list_path(self, data_dir: str | os.PathLike, list_name: str) -> str:
    """`<data_dir>/benchmark_imglist/<id>/<list_name>.txt`."""
    return os.path.join(os.fspath(data_dir), "benchmark_imglist", self.id_name,
                        f"{list_name}.txt")

  def normalization_of(self, arch: str) -> str:
    """The `data.MEAN_STD` key a torch checkpoint of `arch` takes by default."""
    return self.normalization.get(arch, self.default_normalization)

  def settings_of(self, arch: str | None) -> str:
    """Whose hyperparameters the untuned rows take for network `arch`
    (None: a line_jax checkpoint): the paper's for its own network, else
    the registry defaults ("none")."""
    return self.settings.get(arch or "", "none")


OPENOOD: dict[str, OpenOODProtocol] = {
    "openood_cifar10": OpenOODProtocol(
        "openood_cifar10", "cifar10", 10, "train_cifar10", "val_cifar10", "test_cifar10",
        near=(("cifar100", "test_cifar100"), ("tin", "test_tin")),
        far=(("mnist", "test_mnist"), ("svhn", "test_svhn"), ("texture", "test_texture"),
             ("places365", "test_places365")),
        val_ood=(("tin", "val_tin"),),
        image_size=32, channels=3, model="densenet100",
        # The DICE / LINe DenseNet-BC-100 checkpoints were trained and
        # evaluated with the official code's constants (see docs/suites.md);
        # OpenOOD's own CIFAR-10 networks with CIFAR-10's pixel statistics.
        normalization={"densenet100": "cifar_line"}, default_normalization="cifar10",
        settings={"densenet100": "cifar10"}),
}


@dataclasses.dataclass(frozen=True)
class Coverage:
  """How much of one list a run reads.

  Attributes:
    list_file: the list's file name (`test_mnist.txt`).
    listed: images the list names.
    used: images present (and read).
    group: "train", "val", "test", "near", "far" or "val_ood".
  """

  list_file: str
  listed: int
  used: int
  group: str

  def describe(self, name: str) -> str:
    """'mnist: 10,000 of 70,000 listed images (test_mnist.txt)'."""
    return f"{name}: {self.used:,} of {self.listed:,} listed images ({self.list_file})"

  def record(self) -> dict:
    """As JSON: `{"list", "listed", "used", "group"}`."""
    return {"list": self.list_file, "listed": self.listed, "used": self.used,
            "group": self.group}


@dataclasses.dataclass(frozen=True)
class OpenOODSets:
  """The sets of a protocol found under a data folder.

  Attributes:
    sources: set name -> `data.ImageListSource`, keys "train", "val_id",
      "id" (the ID test set), then each present near and far set in column
      order, then "val_ood:<name>" for each validation OOD set.
    coverage: set name -> `Coverage`, for every set in `sources`.
    absent: set name -> why it is skipped (all of its listed files absent,
      or no list file).
  """

  sources: Mapping[str, data.ImageListSource]
  coverage: Mapping[str, Coverage]
  absent: Mapping[str, str]

  def validation(self) -> dict[str, data.ImageListSource]:
    """The sets the search reads: "val_id" and each "val_ood:<name>"."""
    return {n: s for n, s in self.sources.items()
            if self.coverage[n].group in ("val", "val_ood")}

  def tests(self) -> dict[str, data.ImageListSource]:
    """The sets scored once: "id" and each near and far set."""
    return {n: s for n, s in self.sources.items()
            if self.coverage[n].group in ("test", "near", "far")}


# The set names of the ID splits in `OpenOODSets.sources`.
ID_SETS = {"train": "train", "val": "val_id", "test": "id"}
VAL_OOD_PREFIX = "val_ood:"


def openood_sets(protocol: OpenOODProtocol, data_dir: str | os.PathLike, *,
                 partial: bool = False, validation: bool = True) -> OpenOODSets:
  """Every set of `protocol` under `data_dir`, by the rule for absent files.

  Only the lists are read and the files looked for; no image is opened.

  Args:
    protocol: the benchmark.
    data_dir: OpenOOD's `images_classic/` root holding `benchmark_imglist/`.
    partial: use the present files of a list with some absent (counted in
      `coverage`) instead of refusing it.
    validation: read the validation lists (ID and OOD) too; False leaves
      them out (a run without the search).

  Raises:
    FileNotFoundError: no `benchmark_imglist/<id>/` folder; an ID or
      validation OOD list absent, or all of its files; or (without `partial`)
      every list with some files absent, each with its count, in one message.
    ValueError: a validation image that is also in a test list (the
      selection would see test data).
  """
  folder = os.path.dirname(protocol.list_path(data_dir, "x"))
  if not os.path.isdir(folder):
    raise FileNotFoundError(
        f"--data-dir {os.fspath(data_dir)}: no {os.path.relpath(folder, data_dir)}/ "
        "(OpenOOD's layout: <data-dir>/benchmark_imglist/<id>/*.txt beside the image "
        "folders its lines name)")
  splits = ("train", "val", "test") if validation else ("train", "test")
  wanted = [(ID_SETS[split], getattr(protocol, split), split) for split in splits]
  wanted += [(name, stem, "near") for name, stem in protocol.near]
  wanted += [(name, stem, "far") for name, stem in protocol.far]
  if validation:
    wanted += [(VAL_OOD_PREFIX + name, stem, "val_ood") for name, stem in protocol.val_ood]
  sources, coverage, absent, partial_lists, required = {}, {}, {}, [], []
  for name, stem, group in wanted:
    path = protocol.list_path(data_dir, stem)
    if not os.path.isfile(path):
      why = f"no list {path}"
    else:
      source = data.ImageListSource(path, data_dir, allow_missing=True)
      cover = Coverage(os.path.basename(path), source.listed, len(source), group)
      if len(source):
        sources[name], coverage[name] = source, cover
        if source.missing:
          partial_lists.append(cover.describe(name))
        continue
      why = f"all {source.listed:,} listed images absent ({os.path.basename(path)})"
    if group in ("near", "far"):
      absent[name] = why
    else:
      required.append(f"{name}: {why}")
  if required:
    raise FileNotFoundError(
        f"{protocol.name} needs its ID and validation lists under {os.fspath(data_dir)}:\n"
        "  - " + "\n  - ".join(required))
  if partial_lists and not partial:
    raise FileNotFoundError(
        "some listed images are absent; --partial-sets uses the present ones and says so "
        "in every output:\n  - " + "\n  - ".join(partial_lists))
  found = OpenOODSets(sources, coverage, absent)
  check_disjoint(found.validation(), found.tests())
  return found


def check_disjoint(validation: Mapping[str, Sequence], tests: Mapping[str, Sequence]) -> None:
  """Refuses a validation image file that a test set holds too (by path).

  Args:
    validation, tests: set name -> a source with `paths` (sources without,
      arrays, are not compared).

  Raises:
    ValueError: naming the two sets and one shared file.
  """
  seen = {}
  for name, source in tests.items():
    for path in getattr(source, "paths", ()):
      seen.setdefault(os.path.realpath(path), name)
  for name, source in validation.items():
    for path in getattr(source, "paths", ()):
      test = seen.get(os.path.realpath(path))
      if test is not None:
        raise ValueError(f"{path} is in the validation set {name} and in the test set "
                         f"{test}: the selection would see a test image")


def openood_backbone(protocol: OpenOODProtocol, *, torch_checkpoint: str | None = None,
                     arch: str | None = None, normalization: str | None = None,
                     checkpoint: str | None = None) -> tuple[features.Backbone, str]:
  """`(backbone, settings)`: the network a protocol run reads, and whose
  hyperparameters its untuned rows take (`OpenOODProtocol.settings_of`).

  Args:
    protocol: the benchmark.
    torch_checkpoint: a PyTorch state_dict of `arch` (default: the
      protocol's network), normalised by `normalization` (a `data.MEAN_STD`
      key; default: what that network's checkpoints were trained with).
    checkpoint: a line_jax checkpoint folder instead (its own normalisation
      and input shape; OpenOOD's images are resized to it).

  Raises:
    ValueError: neither or both checkpoints, `arch` / `normalization` with a
      line_jax checkpoint, an unknown normalisation, or a network with
      another number of classes than the protocol's ID data.
  """
  if (torch_checkpoint is None) == (checkpoint is None):
    raise ValueError(f"{protocol.name} needs the network: --torch-checkpoint PATH (with "
                     "--arch NAME) or --checkpoint FOLDER, one of them")
  if checkpoint is not None:
    if arch or normalization:
      raise ValueError("--arch and --normalization describe a --torch-checkpoint; a line_jax "
                       "--checkpoint records its own")
    backbone, settings = features.Backbone.from_checkpoint(checkpoint), protocol.settings_of(None)
  else:
    arch = arch or protocol.model
    normalization = normalization or protocol.normalization_of(arch)
    if normalization not in data.MEAN_STD:
      raise ValueError(f"unknown --normalization {normalization!r}; known: "
                       f"{', '.join(data.MEAN_STD)}")
    model, variables = models.load_torch_checkpoint(arch, torch_checkpoint,
                                                    protocol.num_classes)
    mean, std = data.MEAN_STD[normalization]
    backbone = features.Backbone(model, variables, mean, std, data.Preprocess(
        protocol.image_size, protocol.image_size, protocol.channels))
    settings = protocol.settings_of(arch)
  if backbone.num_classes != protocol.num_classes:
    raise ValueError(f"the network has {backbone.num_classes} classes; {protocol.name}'s ID "
                     f"data {protocol.id_name} has {protocol.num_classes}")
  return backbone, settings
