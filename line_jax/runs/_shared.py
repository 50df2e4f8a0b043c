"""What every run shares: how it runs, the network and the named data sets it
reads (checked against the checkpoint's classes), the images it skipped, its
output folders (refused where they hold a user's files), atomic writes."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
import contextlib
import dataclasses
import json
import os
import sys
import tempfile
from typing import Any

import jax
import numpy as np

from line_jax import data
from line_jax import distributed
from line_jax import models
from line_jax import scorers
from line_jax import suites
from line_jax.features import cache
from line_jax.runs._network import Network


@dataclasses.dataclass(frozen=True)
class Runtime:
  """How a run runs, not what it computes (never part of a run's record).

  Attributes:
    workers: decoding threads of the input pipeline (None: one per core).
    cache_dir: the feature cache shared by fit, tune and evaluate
      (`line_jax.features.cache`); None keeps features in a temporary folder.
    progress: progress bars (a terminal) or lines (a log); False is silent.
  """

  workers: int | None = None
  cache_dir: str | None = None
  progress: bool = True


def check_positive(**values: int | None) -> None:
  """Counts that must be at least 1 where given, named as their flags."""
  for name, value in values.items():
    if value is not None and value < 1:
      raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def checked_scorers(names: Sequence[str], hparams: Mapping[str, Mapping[str, Any]],
                    run: str) -> list[str]:
  """`names` (empty: every registered scorer), each known and its `hparams`
  valid, before any work; hyperparameters for a scorer not run are refused
  (`run` names the run in that message, e.g. "this evaluation")."""
  names = list(names or scorers.names())
  for name in names:
    scorers.get(name)  # Unknown names fail here, listing the valid ones.
  for name, values in hparams.items():
    if name not in names:
      raise ValueError(f"hyperparameters for {name!r}, which {run} does not run")
    scorers.get(name).check_hparams(values)
  return names


def network_of(checkpoint: str | None, network: Network | None) -> Network:
  """The one network of a config's `checkpoint` (a line_jax folder, the old
  field) and `network`, resolved: `network` where given, `checkpoint` else; a
  checkpoint of your own beside a PyTorch `network` is refused (`Network.resolved`)."""
  if network is None:
    return Network(checkpoint=checkpoint).resolved()
  if network.checkpoint is None:
    network = dataclasses.replace(network, checkpoint=checkpoint)
  return network.resolved()


def open_dataset(spec: str, split: str, num_classes: int, *,
                 limit: int | None = None, checkpoint: str | None = None) -> Sequence:
  """The records of data set `spec`'s `split` (`data.open_source`), checked.

  Args:
    spec: 'fashion_mnist', 'tfds:NAME' or a folder.
    split: "train" or "test".
    num_classes: the model's classes; labels a source knows must lie below.
    limit: this many records by the one subset rule (`data.subset_of`:
      every class in proportion, evenly spaced), not the first ones.
    checkpoint: the line_jax checkpoint of the model; where its config
      names its classes, a folder of class subfolders must have those
      (`check_classes`), checked before any image is read.
  """
  whole = data.open_source(spec, split)
  if checkpoint is not None:
    check_classes(whole, checkpoint_classes(checkpoint), f"the checkpoint {checkpoint}")
  source = data.subset_of(whole, limit)
  if len(source) == 0:
    raise ValueError(f"dataset {spec!r} ({split}) holds no image")
  labels = getattr(source, "labels", None)
  if labels is not None and len(labels):
    labels = np.asarray(labels)
    if labels.min() < 0 or labels.max() >= num_classes:
      raise ValueError(f"labels of {spec!r} must lie in [0, {num_classes}) for this model, "
                       f"got [{labels.min()}, {labels.max()}]")
  return source


def checkpoint_classes(checkpoint: str) -> tuple[str, ...] | None:
  """The class names a line_jax checkpoint records (`train` writes them); None if none."""
  classes = models.read_checkpoint_config(checkpoint).get("classes")
  return None if classes is None else tuple(classes)


def check_classes(source: Sequence, classes: Sequence[str] | None, against: str) -> None:
  """Refuses a folder of class subfolders (under any subset) whose class names
  are not `classes` in order (`data.check_class_names`), before any image is read.
  Flat folders, arrays and TFDS sets, which name no class, and `classes` None pass."""
  while isinstance(source, data.Subset):
    source = source.source
  if classes is not None and isinstance(source, data.ImageFolderSource) and source.classes:
    data.check_class_names(source.classes, classes, where=source.root, against=against)


def own_shard(source: Sequence, batch_size: int, *, allow_empty: bool = False) -> Sequence:
  """This process's contiguous shard of whole batches (all of it on one process)."""
  if jax.process_count() == 1:
    return source
  # Decided from the sizes alone, so every process raises alike (one
  # raising alone would leave the others waiting in a collective).
  empty = [i for i in range(jax.process_count())
           if len(set(distributed.batch_shard(len(source), batch_size, i))) == 1]
  if empty and not allow_empty:
    raise ValueError(f"a set of {len(source)} images leaves process {empty[0]} no batch of "
                     f"{batch_size}; use a smaller --batch-size or fewer processes")
  return data.Subset.range(source, *distributed.batch_shard(len(source), batch_size))


def dataset_rows(source: Sequence, batch_size: int, skipped: Sequence = ()
                 ) -> tuple[np.ndarray, Sequence]:
  """`(index, data set)`: the index in its data set (through every subset) of
  each record this process reads of `source` (its `own_shard`), less the
  `skipped` ones (`SkippedImage`s indexed in that data set), in reading order:
  `[n]` int64, one per feature row. The data set is the source under every subset."""
  shard = own_shard(source, batch_size)
  index, inner = np.arange(len(shard), dtype=np.int64), shard
  while isinstance(inner, data.Subset):
    index, inner = inner.indices[index], inner.source
  if skipped:
    index = index[~np.isin(index, [int(s.index) for s in skipped])]
  return index, inner


def skipped_records(source: Sequence, skipped: Sequence) -> list[dict[str, Any]]:
  """Each dropped image (`data.SkippedImage`s of `source`) as JSON: its index in
  the data set (through every subset and shard of it), file (None for pixels), error."""
  records = []
  for image in skipped:
    index, inner = int(image.index), source
    while isinstance(inner, data.Subset):
      index, inner = int(inner.indices[index]), inner.source
    records.append({"index": index, "path": image.path, "error": image.error})
  return records


def gather_skipped(skipped: Mapping[str, list[dict[str, Any]]]) -> dict[str, list[dict]]:
  """`{set: records}` of every process (collective), sets with none left out."""
  merged: dict[str, list[dict]] = {}
  for part in distributed.gather_bytes(json.dumps(skipped).encode()):
    for name, records in json.loads(part).items():
      merged.setdefault(name, []).extend(records)
  return {name: sorted(records, key=lambda r: r["index"])
          for name, records in merged.items() if records}


def report_skipped(skipped: Mapping[str, list[dict[str, Any]]]) -> None:
  """Says once (process 0), whatever `--quiet`, which images a run dropped:
  a run that skipped is visibly not a run over the whole data."""
  count = sum(len(records) for records in skipped.values())
  if not count or not distributed.is_primary():
    return
  lines = [f"skipped {count} image{'s' if count > 1 else ''} that cannot be decoded "
           "(--skip-bad-images):"]
  lines += [f"  {name}: {r['error']}" for name, records in skipped.items() for r in records]
  print("\n".join(lines), file=sys.stderr)


def hparams_report(settings: str | None, used: Mapping[str, Mapping[str, Any]],
                   overrides: Mapping[str, Mapping[str, Any]] | None = None) -> str:
  """What each scorer ran with and whose settings they are: printed once per run,
  so that no benchmark's settings reach a model unseen."""
  if settings in (None, suites.NO_BENCHMARK):
    whose = "the registry defaults"
  else:
    whose = f"the {settings} benchmark's settings over the registry defaults"
  lines = [f"hyperparameters: {whose}" + (", yours (*) over them" if overrides else "")]
  for name, hparams in used.items():
    mine = (overrides or {}).get(name, {})
    cells = [f"{k}={json.dumps(v, default=repr)}{'*' if k in mine else ''}"
             for k, v in hparams.items()]
    lines.append(f"  {name}: {', '.join(cells) or '(none)'}")
  return "\n".join(lines)


def check_out(folder: str | os.PathLike, owned: Sequence[str], *,
              marks: Mapping[str, Any] | None = None, what: str = "--out") -> None:
  """Refuses an output folder holding anything but its run's own files
  (`cache.refuse_foreign`: `owned` patterns, one of the `marks`), decided by
  process 0, the one that writes, and raised on every process."""
  problem = None
  if distributed.is_primary():
    try:
      cache.refuse_foreign(folder, owned, what=what, marks=marks)
    except ValueError as e:
      problem = e
  if not distributed.everyone(problem is None):
    raise problem or ValueError(f"{what} {os.fspath(folder)} was refused on process 0")


def has_keys(*keys: str):
  """A mark's check (`check_out`): a JSON object holding `keys`."""
  return lambda value: isinstance(value, dict) and set(keys) <= set(value)


def check_cache(runtime: Runtime) -> None:
  """Refuses a `--cache-dir` that holds files other than cache entries, before any work."""
  if runtime.cache_dir is not None:
    cache.check_folder(runtime.cache_dir)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, *, unique: bool = False) -> Iterator[str]:
  """A temporary path to write; moved onto `path` (`os.replace`) if the block ends well.

  A reader sees the old file or the whole new one. `unique` names the
  temporary file afresh (in a folder of the user's, where a fixed name could
  be theirs); otherwise it is `cache.temporary(path)`, in a folder of ours.
  """
  path = os.fspath(path)
  if unique:
    folder, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would make the result private.
  else:
    tmp = cache.temporary(path)
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    if os.path.lexists(tmp):
      os.remove(tmp)


def write_text(path: str | os.PathLike, text: str, *, unique: bool = False) -> None:
  """`text` to `path`, atomically (`atomic_file`)."""
  with atomic_file(path, unique=unique) as tmp:
    with open(tmp, "w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())


def write_json(path: str | os.PathLike, value: Any, *, sort_keys: bool = True,
               default=None, unique: bool = False) -> None:
  """`value` as JSON, atomically: a reader sees the old file or the whole new one.
  `default` turns what JSON cannot hold into what it can (`json.dump`'s)."""
  write_text(path, json.dumps(value, indent=2, sort_keys=sort_keys, default=default) + "\n",
             unique=unique)
