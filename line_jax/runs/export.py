"""A deployable detector from a training set and held-out ID images.

    det = export.run(export.Config(dataset="train/", calibrate="val/",
                                   network=Network(torch_checkpoint="r18.pth", arch="resnet18")),
                     "det/")
    line_jax.export.load("det/")(images)          # score, is_ood, pred

What `python -m line_jax.export` runs: the scorer is fitted on the network's
features of `dataset` (streamed), the threshold set on `calibrate` (at a
TPR, or at an FPR on `calibrate_ood`), and the detector exported
(`Detector.export`: StableHLO, weights, manifest). The manifest records
where the network, the training and the calibration images came from.
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
import os
import sys
from typing import Any

from line_jax import data
from line_jax import features
from line_jax import scorers
from line_jax import suites
from line_jax.detector import Detector
from line_jax.detector import EXPORT_PLATFORMS
from line_jax.runs._network import Network
from line_jax.runs._shared import check_classes
from line_jax.runs._shared import check_positive
from line_jax.runs._shared import open_dataset
from line_jax.runs._shared import Runtime


@dataclasses.dataclass(frozen=True)
class Config:
  """What an export computes.

  Attributes:
    dataset: the training set the scorer is fitted on ('fashion_mnist',
      'tfds:NAME' or a folder: `data.open_source`, split "train").
    calibrate: held-out ID images (same naming, split "test"; a flat folder
      or one of class subfolders).
    network: the network (`Network`: a line_jax checkpoint or a PyTorch file).
    scorer: the registered scorer (LINe by default).
    hparams: its hyperparameters over the registry defaults.
    tpr: the share of ID inputs the threshold keeps.
    fpr: with `calibrate_ood`, the share of OOD inputs it lets through instead.
    calibrate_ood: validation OOD images (a folder).
    confidence: of the reported interval.
    max_examples, max_calibrate: this many training / calibration images by
      the subset rule (`data.subset_of`); None: all.
    batch_size: images per network call.
    platforms: what the export is lowered for.
  """

  dataset: str
  calibrate: str
  network: Network = Network()
  scorer: str = "line"
  hparams: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  tpr: float = 0.95
  fpr: float | None = None
  calibrate_ood: str | None = None
  confidence: float = 0.95
  max_examples: int | None = None
  max_calibrate: int | None = None
  batch_size: int = features.IMAGES_PER_CALL
  platforms: tuple[str, ...] = EXPORT_PLATFORMS

  def resolved(self) -> "Config":
    scorers.get(self.scorer).check_hparams(self.hparams)
    check_positive(max_examples=self.max_examples, max_calibrate=self.max_calibrate,
                   batch_size=self.batch_size)
    if (self.fpr is None) != (self.calibrate_ood is None):
      raise ValueError("--fpr and --calibrate-ood go together: the FPR is measured on the "
                       "validation OOD images")
    absolute = {k: os.path.abspath(v) if v and os.path.isdir(v) else v
                for k, v in (("dataset", self.dataset), ("calibrate", self.calibrate),
                             ("calibrate_ood", self.calibrate_ood))}
    return dataclasses.replace(self, network=self.network.resolved(),
                               platforms=tuple(self.platforms), **absolute)


def run(config: Config, out: str | os.PathLike, *, runtime: Runtime = Runtime()) -> Detector:
  """Fits, calibrates and exports the detector to the new folder `out`."""
  config = config.resolved()
  out = os.path.abspath(os.fspath(out))
  if os.path.exists(out):
    raise ValueError(f"--out {out} already exists; choose a new folder")
  backbone = config.network.backbone()
  train = _open(config.dataset, "train", config.max_examples, backbone, config.network)
  held_out = _open(config.calibrate, "test", config.max_calibrate, backbone, config.network)
  _refuse_overlap(train, held_out)
  hparams = suites.hparams_for(suites.NO_BENCHMARK, config.scorer, dict(config.hparams))
  detector = Detector.fit(backbone, train, scorer=config.scorer, hparams=hparams,
                          batch_size=config.batch_size, workers=runtime.workers,
                          progress="fit" if runtime.progress else False)
  ood = None if config.calibrate_ood is None else data.open_source(config.calibrate_ood, "test")
  detector = detector.calibrate(held_out, tpr=config.tpr, fpr=config.fpr, ood_images=ood,
                                confidence=config.confidence, batch_size=config.batch_size,
                                progress="calibrate" if runtime.progress else False)
  classes = config.network.classes()
  detector.export(out, platforms=config.platforms, trained_on=config.dataset,
                  trained_images=len(train), calibrated_on=config.calibrate,
                  calibration_ood=config.calibrate_ood, hparams=_jsonable(scorers.resolved_hparams(hparams, detector.state)),
                  classes=None if classes is None else list(classes),
                  network_source=config.network.record())
  if runtime.progress:
    print(detector.calibration.summary(), file=sys.stderr)
  return detector


def _open(spec: str, split: str, limit: int | None, backbone, network: Network):
  """The training set (labelled, checked), or the calibration images (labels unused)."""
  if split == "train":
    source = open_dataset(spec, split, backbone.num_classes, limit=limit)
  else:
    source = data.subset_of(data.open_source(spec, split), limit)
    if len(source) == 0:
      raise ValueError(f"--calibrate {spec} holds no image")
  check_classes(source, network.classes(), f"the network {network.describe()}")
  return source


def _refuse_overlap(train, held_out) -> None:
  """A threshold set on training images is optimistic: refuse shared files."""
  paths = [set(getattr(_inner(s), "paths", ()) or ()) for s in (train, held_out)]
  shared = paths[0] & paths[1]
  if shared:
    raise ValueError(f"--calibrate shares {len(shared)} images with --dataset (e.g. "
                     f"{sorted(shared)[0]}): calibrate on held-out images")


def _inner(source):
  while isinstance(source, data.Subset):
    source = source.source
  return source


def _jsonable(hparams: Mapping[str, Any]) -> dict[str, Any]:
  return {k: v if isinstance(v, (int, float, str, bool, type(None))) else repr(v)
          for k, v in hparams.items()}
