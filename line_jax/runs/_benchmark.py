"""What `evaluate` and `ablation` read: a benchmark's backbone and its sets' features.

    with features_of(BenchmarkData("cifar10", ...), runtime) as (inputs, sets):
      sets["train"], sets["id"], sets["svhn"], ...     # memory-mapped CachedSets
    BenchmarkData("cifar10", network=Network(torch_checkpoint="r18.pth", arch="resnet18_cifar"))

The training, test and OOD sets stream through the input pipeline and the
backbone into the feature cache (`Backbone.read`), or are read back from it.
On multi-host each process reads its own contiguous shard of whole batches
of every set. With `skip_bad_images` the images that cannot be decoded are
left out, and each set's `CachedSet.skipped` says which (`skipped_of`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
import contextlib
import dataclasses
import os
import tempfile
from typing import Any, NamedTuple

import numpy as np

from line_jax import distributed
from line_jax import features
from line_jax import models
from line_jax import suites
from line_jax.features import cache
from line_jax.runs._network import Network
from line_jax.runs._shared import check_classes
from line_jax.runs._shared import check_positive
from line_jax.runs._shared import dataset_rows
from line_jax.runs._shared import gather_skipped
from line_jax.runs._shared import network_of
from line_jax.runs._shared import own_shard
from line_jax.runs._shared import Runtime
from line_jax.runs._shared import skipped_records


@dataclasses.dataclass(frozen=True)
class BenchmarkData:
  """Which benchmark's model and data a run reads.

  Attributes:
    benchmark: a key of `suites.SUITES`; None reads "fashion_mnist" (or your
      own `Inputs`, at the settings they name). With your own `Inputs` it
      must be None or the settings they name ("none": the registry
      defaults, `Inputs.from_arrays`'s), never another benchmark's.
    checkpoint: line_jax checkpoint folder (the Fashion-MNIST suites).
    torch_checkpoint: PyTorch state_dict of a paper suite's own network
      (`Suite.model`), where no `network` is given.
    data_dir: TFDS datasets and the paper's OOD sets.
    id_folder: ID `train/` and `test/` in ImageFolder layout (else TFDS,
      or Fashion-MNIST's files); their classes must be those a line_jax
      `checkpoint` records, where it does.
    max_train, max_test: subsets of this size by the one rule (quick runs;
      `data.subset_of`: every class in proportion, evenly spaced).
    ood_size: images per offline OOD set.
    extra_ood: more OOD sets, `NAME=PATH` (a uint8 `.npy` of the suite's
      input shape, or a folder of images of any size) or `(name, path)`.
    batch_size: images per network call.
    skip_bad_images: leave out the images that cannot be decoded (reported
      per set) instead of stopping at the first.
    network: a network of your own (`runs.Network`: a line_jax checkpoint,
      or a PyTorch state_dict of any architecture the import supports) for
      the suite's data, a paper suite's included (its classes must be the
      suite's); None: `checkpoint` (Fashion-MNIST suites) or the paper
      suite's own from `torch_checkpoint`.
  """

  benchmark: str | None = None
  checkpoint: str = models.DEFAULT_CHECKPOINT
  torch_checkpoint: str | None = None
  data_dir: str | None = None
  id_folder: str | None = None
  max_train: int | None = None
  max_test: int | None = None
  ood_size: int = 2000
  extra_ood: tuple = ()
  batch_size: int = features.IMAGES_PER_CALL
  skip_bad_images: bool = False
  network: Network | None = None

  @property
  def name(self) -> str:
    """The benchmark whose data this reads ("fashion_mnist" for None)."""
    return self.benchmark or "fashion_mnist"

  @property
  def suite(self) -> suites.Suite | None:
    """The suite; None for "none"."""
    return None if self.name == suites.NO_BENCHMARK else suites.get(self.name)

  def user_network(self) -> Network | None:
    """The network read, resolved: `network`, or a Fashion-MNIST suite's
    `checkpoint`; None for a paper suite's own (from `torch_checkpoint`)."""
    if self.network is not None and self.torch_checkpoint is not None:
      raise ValueError("torch_checkpoint is the paper benchmark's own network: give it or "
                       "a network of your own, not both")
    if self.network is None and not self.name.startswith("fashion_mnist"):
      return None
    return network_of(self.checkpoint, self.network)

  def inputs(self) -> suites.Inputs:
    """The suite's backbone and sources, from local files (at its settings)."""
    check_positive(batch_size=self.batch_size, max_train=self.max_train,
                   max_test=self.max_test, ood_size=self.ood_size)
    network = self.user_network()
    backbone = None if network is None else network.backbone()
    common = dict(max_train=self.max_train, max_test=self.max_test, ood_size=self.ood_size,
                  id_folder=self.id_folder, backbone=backbone)
    if self.name.startswith("fashion_mnist"):
      inputs = suites.fashion_mnist_inputs(settings=self.name, **common)
    else:
      inputs = suites.paper_inputs(self.suite, self.data_dir, self.torch_checkpoint, **common)
    if network is not None:  # Where a checkpoint records classes (a PyTorch file: none).
      classes = network.classes()
      for source in (inputs.train, inputs.test):  # Before any image is read.
        check_classes(source, classes, f"the checkpoint {network.checkpoint}")
    return inputs


def user_hparams(inputs: suites.Inputs, hparams: Mapping[str, Mapping[str, Any]]
                 ) -> dict[str, dict[str, Any]]:
  """`{scorer: {name: value}}` the user set: the Inputs' own, a run's `hparams` over them."""
  return {name: {**inputs.hparams.get(name, {}), **hparams.get(name, {})}
          for name in {*inputs.hparams, *hparams}}


@contextlib.contextmanager
def features_of(data: BenchmarkData, runtime: Runtime, *, inputs: suites.Inputs | None = None
                ) -> Iterator[tuple[suites.Inputs, dict[str, cache.CachedSet]]]:
  """`(inputs, sets)`: the benchmark's inputs and every set's features
  (`benchmark_sets` without the sources)."""
  with benchmark_sets(data, runtime, inputs=inputs) as (inputs, _, sets):
    yield inputs, sets


@contextlib.contextmanager
def benchmark_sets(data: BenchmarkData, runtime: Runtime, *,
                   inputs: suites.Inputs | None = None
                   ) -> Iterator[tuple[suites.Inputs, dict[str, Sequence],
                                       dict[str, cache.CachedSet]]]:
  """`(inputs, sources, sets)`: the benchmark's inputs, every set's source
  (whole, on every process) and its features.

  `sets` holds "train", "id" (the ID test set), each OOD set in column
  order, then the extra ones; this process's shard of each on multi-host
  (`dataset_rows` says which records). Features live in
  `runtime.cache_dir`, or in a temporary folder removed when the context exits.

  Args:
    data: the benchmark.
    runtime: decoding threads, cache, progress.
    inputs: ready `suites.Inputs` (custom data) instead of the suite's.
  """
  # The user's files are checked before the (slow) loading of everything else.
  suite = data.suite
  if inputs is not None:
    if data.benchmark not in (None, inputs.settings):
      raise ValueError(
          f"BenchmarkData({data.benchmark!r}) with Inputs whose settings are "
          f"{inputs.settings!r}: name the settings in the Inputs (Inputs.from_arrays(..., "
          f"settings={data.benchmark!r})) and leave BenchmarkData's benchmark out")
    shape, taken = inputs.image_shape, ["train", "id", *inputs.ood]
  elif suite is not None:
    shape = (suite.image_size, suite.image_size, suite.channels)
    taken = ["train", "id", *(s.name for s in suite.ood), *suite.offline_ood]
  else:
    raise ValueError("benchmark 'none' has no data of its own: pass your own Inputs")
  extra = suites.extra_sets(data.extra_ood, shape, taken)
  if inputs is None:
    inputs = data.inputs()
  sources: dict[str, Sequence] = {"train": inputs.train, "id": inputs.test, **inputs.ood,
                                  **extra}
  with read_sets(inputs.backbone, sources, runtime, batch_size=data.batch_size,
                 skip_bad_images=data.skip_bad_images) as sets:
    yield inputs, sources, sets


@contextlib.contextmanager
def read_sets(backbone: features.Backbone, sources: Mapping[str, Sequence], runtime: Runtime,
              *, batch_size: int = features.IMAGES_PER_CALL, skip_bad_images: bool = False
              ) -> Iterator[dict[str, cache.CachedSet]]:
  """`{name: CachedSet}`: each source's features through `backbone`, in order.

  Read from the cache (`runtime.cache_dir`) or extracted into it; without a
  cache, into a temporary folder removed when the context exits. On
  multi-host each process reads its own contiguous shard of whole batches of
  every set (`own_shard`); skipped images are indexed in the whole set.
  """
  with tempfile.TemporaryDirectory(prefix="line_jax_features_") as tmp:
    folder = os.fspath(runtime.cache_dir or tmp)
    sets = {}
    for name, source in sources.items():
      shard = own_shard(source, batch_size)
      sets[name] = _indexed_in_set(shard, backbone.read(
          shard, cache_dir=folder, scratch=tmp, batch_size=batch_size,
          workers=runtime.workers, description=f"{name}: {source!r}",
          progress=f"features: {name}" if runtime.progress else False,
          skip_bad_images=skip_bad_images))
    yield sets


def _indexed_in_set(shard: Sequence, cached: cache.CachedSet) -> cache.CachedSet:
  """`cached` with its skipped images' indices in the data set, not in the shard read."""
  records = skipped_records(shard, cached.skipped)
  return dataclasses.replace(cached, skipped=tuple(
      s._replace(index=r["index"]) for s, r in zip(cached.skipped, records)))


class SetRows(NamedTuple):
  """Which input each score of a set is, every process's rows in set order.

  Attributes:
    index: int64 `[n]`: each input's index in its data set (through every
      subset, as `skipped_records` counts).
    paths: each input's file; None for a set of pixels (arrays, TFDS).
    labels: int32 `[n]` (-1 where the set has none).
  """

  index: np.ndarray
  paths: list[str] | None
  labels: np.ndarray


def rows_of(sources: Mapping[str, Sequence], sets: Mapping[str, cache.CachedSet],
            batch_size: int) -> dict[str, SetRows]:
  """`{set: SetRows}` of each of `sets` (`benchmark_sets`' features, read of
  `sources` at `batch_size`), gathered from every process (collective)."""
  out = {}
  for name, cached in sets.items():
    index, whole = dataset_rows(sources[name], batch_size, cached.skipped)
    if index.size != len(cached):  # A feature row not matched to its input is no audit.
      raise RuntimeError(f"{name}: {len(cached)} feature rows for {index.size} inputs")
    index = distributed.gather_rows(index)
    paths = getattr(whole, "paths", None)
    out[name] = SetRows(index, None if paths is None else [str(paths[i]) for i in index],
                        distributed.gather_rows(np.asarray(cached.labels)))
  return out


def skipped_of(sets: Mapping[str, cache.CachedSet]) -> dict[str, list[dict[str, Any]]]:
  """`{set: [{"index", "path", "error"}, ...]}` of the images every process
  left out (collective), by index in each set; sets with none left out."""
  return gather_skipped({name: [s._asdict() for s in c.skipped] for name, c in sets.items()})
