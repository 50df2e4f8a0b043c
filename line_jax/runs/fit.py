"""Fit scorers on a backbone's features of a data set, streaming and resumable.

    states = fit.run(fit.Config(dataset="path/to/imagefolder"), "fits/mine",
                     runtime=Runtime(cache_dir=features.cache.default_dir()))
    state = fit.load_state("fits/mine", "line")

What `python -m line_jax.fit` runs: every scorer folds over one stream of the
network's features (`Config.network`: a line_jax checkpoint or a PyTorch
state_dict; `fold.chain`, resumably: `line_jax.resumable`), or
over the feature cache's rows where it holds them. A run's folder holds
`args.json` (its `Config`; a resume with another is refused), `progress/`,
`features.npy` / `labels.npy`, `<scorer>/` (each state, `line_jax.load`) and
`hparams.json` (the settings each scorer ran with, resolved: they paste into
`Scorer.fit`), and with `skip_bad_images` `skipped.json` (the images that
could not be decoded and were left out). A folder holding anything else is
refused before the run starts (`cache.refuse_foreign`): a user's files are
never replaced. On multi-host each process reads its own shard of whole
batches (and drops its own bad images), and process 0 writes.
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
import json
import os
import sys
import time
from typing import Any

import jax

from line_jax import _progress
from line_jax import distributed
from line_jax import features
from line_jax import fold
from line_jax import io
from line_jax import models
from line_jax import resumable
from line_jax import scorers
from line_jax import suites
from line_jax.features import cache
from line_jax.runs._network import Network
from line_jax.runs._shared import check_cache
from line_jax.runs._shared import check_out
from line_jax.runs._shared import check_positive
from line_jax.runs._shared import gather_skipped
from line_jax.runs._shared import has_keys
from line_jax.runs._shared import hparams_report
from line_jax.runs._shared import network_of
from line_jax.runs._shared import open_dataset
from line_jax.runs._shared import own_shard
from line_jax.runs._shared import report_skipped
from line_jax.runs._shared import Runtime
from line_jax.runs._shared import skipped_records
from line_jax.runs._shared import write_json

ARGS_FILE = "args.json"
HPARAMS_FILE = "hparams.json"
SKIPPED_FILE = "skipped.json"  # With skip_bad_images: the images left out.
CACHED_DIR = "cached"  # Progress of a fit folded from the feature cache.


@dataclasses.dataclass(frozen=True)
class Config:
  """What a fit computes (stored in `args.json`).

  Attributes:
    checkpoint: a line_jax checkpoint folder (`models.save_checkpoint`,
      `features.Backbone.save`); None once resolved with a PyTorch `network`.
    dataset: 'fashion_mnist', 'tfds:NAME' or a folder (`data.open_source`).
    scorers: registered scorer names; empty: every one.
    benchmark: whose settings the scorers take (`suites.SUITES` or "none");
      None: "fashion_mnist" for the committed checkpoint on that data set
      (the model they were tuned for), else "none" (the registry defaults).
    hparams: `{scorer: {name: value}}` over the benchmark's settings.
    batch_size: images per network call.
    save_every: batches between progress saves.
    max_examples: this many images by the subset rule (`data.subset_of`:
      every class in proportion, evenly spaced; None: all).
    skip_bad_images: leave out the images that cannot be decoded (listed in
      `skipped.json`) instead of stopping at the first.
    network: the network instead of `checkpoint` (`runs.Network`: a line_jax
      checkpoint, or a PyTorch state_dict of any architecture the import
      supports); None: `checkpoint`. Resolved, a line_jax one becomes
      `checkpoint` (the record of such a run is what it was before).
  """

  checkpoint: str | None = models.DEFAULT_CHECKPOINT
  dataset: str = "fashion_mnist"
  scorers: tuple[str, ...] = ()
  benchmark: str | None = None
  hparams: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
  batch_size: int = features.IMAGES_PER_CALL
  save_every: int = 20
  max_examples: int | None = None
  skip_bad_images: bool = False
  network: Network | None = None

  def resolved(self) -> "Config":
    """Paths absolute, names checked, defaults filled in."""
    names = tuple(self.scorers or scorers.names())
    for name in names:
      scorers.get(name)  # Unknown names fail here, listing the valid ones.
    if len(set(names)) != len(names):
      raise ValueError(f"scorers must be distinct, got {', '.join(names)}")
    for name in self.hparams:
      if name not in names:
        raise ValueError(f"hyperparameters for {name!r}, which this fit does not run")
    check_positive(batch_size=self.batch_size, save_every=self.save_every,
                   max_examples=self.max_examples)
    dataset = os.path.abspath(self.dataset) if os.path.isdir(self.dataset) else self.dataset
    network = network_of(self.checkpoint, self.network)
    committed = self.dataset == "fashion_mnist" and network.checkpoint == os.path.abspath(
        models.DEFAULT_CHECKPOINT)
    benchmark = self.benchmark or ("fashion_mnist" if committed else suites.NO_BENCHMARK)
    if benchmark != suites.NO_BENCHMARK:
      suites.get(benchmark)
    return dataclasses.replace(
        self, checkpoint=network.checkpoint, dataset=dataset, scorers=names,
        benchmark=benchmark, hparams={k: dict(v) for k, v in self.hparams.items()},
        network=None if network.torch_checkpoint is None else network)

  def record(self) -> dict[str, Any]:
    """The JSON of `args.json`; a resume must have the same."""
    record = json.loads(json.dumps(dataclasses.asdict(self)))
    # Absent, as before they existed, unless used: older runs still resume.
    del record["network"]
    if self.network is not None:  # A PyTorch network's (`resolved`): its file and arch.
      record["network"] = self.network.record()
    if not self.skip_bad_images:
      del record["skip_bad_images"]
    if jax.process_count() > 1:  # A resume must keep the process count (the shards).
      record["num_processes"] = jax.process_count()
    return record


def own_files() -> tuple[str, ...]:
  """Glob patterns of what a fit writes in its folder (`cache.refuse_foreign`)."""
  # io.save writes a state as `<name>.line_jax-saving` before renaming it.
  states = [p for name in scorers.names() for p in (name, f"{name}.line_jax-saving")]
  return (ARGS_FILE, HPARAMS_FILE, SKIPPED_FILE, "features*.npy", "labels*.npy",
          resumable.PROGRESS_DIR, CACHED_DIR, *states)


def claim(out: str, record: dict[str, Any]) -> None:
  """Writes args.json (process 0), or checks that a resumed run has the same record."""
  path = os.path.join(out, ARGS_FILE)
  resumed = os.path.exists(path)
  distributed.barrier("line_jax.fit:claim")  # Everyone has looked before process 0 writes.
  if distributed.is_primary() and not resumed:
    os.makedirs(out, exist_ok=True)
    write_json(path, record)
  distributed.barrier("line_jax.fit:claimed")
  if resumed:
    with open(path) as f:
      stored = json.load(f)
    if stored != record:
      diff = [f"{k}: {stored.get(k)!r} -> {record.get(k)!r}"
              for k in sorted(set(stored) | set(record)) if stored.get(k) != record.get(k)]
      raise ValueError(
          f"{out} holds a run started with other arguments ({'; '.join(diff)}); "
          "run again with the same arguments to resume, or choose another --out")


def run(config: Config, workdir: str | os.PathLike, *,
        runtime: Runtime = Runtime()) -> dict[str, Any]:
  """Streams the training set, folds every scorer, saves the states in `workdir`.

  Args:
    config: what to fit.
    workdir: the run's folder (resumed where it holds an unfinished run of
      the same `config`, replaced where it holds a finished one; refused
      where it holds anything a fit does not write).
    runtime: decoding threads, the feature cache, progress output. With a
      cache, where it holds the backbone's features of the data set (on every
      process) they are folded instead of running the network (progress in
      `workdir/cached/`); otherwise the features the fit streams are added
      to it once the stream is read.

  Returns:
    `{scorer name: fitted state}`.
  """
  config = config.resolved()
  out = os.path.abspath(os.fspath(workdir))
  check_out(out, own_files(), marks={ARGS_FILE: has_keys("checkpoint", "dataset", "scorers")})
  check_cache(runtime)
  network = network_of(config.checkpoint, config.network)
  backbone = network.backbone()
  kernel, bias = backbone.head_params()
  source = own_shard(open_dataset(config.dataset, "train", backbone.num_classes,
                                  limit=config.max_examples, checkpoint=network.checkpoint),
                     config.batch_size, allow_empty=True)
  hparams = {name: suites.hparams_for(config.benchmark, name, config.hparams.get(name))
             for name in config.scorers}
  for name, hp in hparams.items():
    scorers.get(name).check_hparams(hp)
  chained = fold.chain({name: scorers.get(name).fold for name in config.scorers})
  acc = chained.init(kernel, bias, **hparams)  # A bad value fails before `out` is claimed.
  claim(out, config.record())
  skip = config.skip_bad_images
  key = None if runtime.cache_dir is None else cache.key(backbone.key, source,
                                                         skip_bad_images=skip)
  hit = None if key is None else cache.lookup(runtime.cache_dir, key)
  hit = hit if distributed.everyone(hit is not None) else None
  start = time.perf_counter()
  with _progress.counting(len(source), "features" if hit is None else "cached features",
                          enabled=runtime.progress) as on_batch:
    if hit is not None:
      stream = resumable.StoredRows(hit.features, hit.labels, config.batch_size)
      folder = os.path.join(out, CACHED_DIR)
    else:
      stream = backbone.stream(backbone.batches(source, config.batch_size,
                                                workers=runtime.workers, skip_bad_images=skip))
      folder = out
    # Rows are published only where this run kept all of them: a run resumed
    # from one that kept none (started with no cache) has no rows before its
    # resume point.
    publish = distributed.everyone(key is not None and hit is None and (
        not resumable.resumed(out) or os.path.isfile(resumable.rows_files(out)[0])))

    def add_to_cache():  # Before the finalizes: their failure does not lose the rows.
      cache.publish(runtime.cache_dir, key, *resumable.rows_files(out),
                    seconds=time.perf_counter() - start,
                    description=f"{config.dataset} (train) through {network.describe()}",
                    skipped=stream.skipped)

    acc = resumable.accumulate(
        chained, acc, stream, folder, num_features=int(kernel.shape[0]),
        check=fold.batch_check(chained, kernel, bias), save_every=config.save_every,
        on_batch=on_batch, keep_rows=publish, on_stream_end=add_to_cache if publish else None)
  if skip:  # Before the finalizes: their failure does not lose the list.
    write_skipped(out, source, hit.skipped if hit is not None else stream.skipped)
  states = chained.finalize(acc)
  for name, state in states.items():
    io.save(os.path.join(out, name), state)  # Collective; process 0 writes.
  used = {name: scorers.resolved_hparams(hparams[name], states[name]) for name in states}
  if distributed.is_primary():
    write_json(os.path.join(out, HPARAMS_FILE), used)
    if runtime.progress:
      print(hparams_report(config.benchmark, used, config.hparams), file=sys.stderr)
  return states


def write_skipped(out: str, source, skipped) -> None:
  """Writes `skipped.json` (process 0) and says once which images every
  process left out (collective); `skipped`: this process's `SkippedImage`s of
  `source`, indexed in the data set there."""
  records = gather_skipped({"train": skipped_records(source, skipped)})
  if distributed.is_primary():
    write_json(os.path.join(out, SKIPPED_FILE), records.get("train", []))
  report_skipped(records)


def load_state(out: str | os.PathLike, name: str) -> Any:
  """The state `run` (`python -m line_jax.fit --out OUT`) wrote for scorer `name`."""
  path = os.path.join(os.fspath(out), name)
  if not os.path.isdir(path):
    raise ValueError(f"{out} holds no fitted state {name!r} (run python -m "
                     "line_jax.fit to the end first)")
  return io.load(path)
