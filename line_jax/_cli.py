"""What every `python -m line_jax.X` shares: help, errors, progress, models, data.

* `parser`: usage as `python -m line_jax.X`, defaults and choices in `--help`;
* `user_errors`: a user's mistake is one `error: ...` line (exit 2), Ctrl-C
  says how to resume (exit 130), not a traceback;
* `progress`: a tqdm bar on a terminal, plain periodic lines in a log,
  nothing with `--quiet`;
* `open_model`: a checkpoint's model, head and preprocessing, and
  `Model.source(dataset, split, ...)` / `Model.batches(source, ...)`, the
  one way every CLI reads images;
* `add_cache` / `cache_dir`: `--cache-dir` and `--no-cache`, the feature
  cache `fit`, `tune` and `evaluate` share (`line_jax.feature_cache`).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Sequence
import contextlib
import dataclasses
import functools
import json
import os
import sys
from typing import Any

import numpy as np

from line_jax import _progress
from line_jax import scorers

DEFAULT_CHECKPOINT = os.path.join(
    os.path.dirname(os.path.abspath(__file__)),
    "checkpoints", "fashion_mnist_resnet_small")
DATASET_HELP = ("'fashion_mnist' (Debian's files), 'tfds:NAME' (a prepared TFDS set), or a "
                "folder: images.npy + labels.npy, train/ and test/ class folders, or one "
                "ImageFolder")


class _Formatter(argparse.RawDescriptionHelpFormatter):
  """Shows every option's default and choices, help string or not."""

  def _get_help_string(self, action):
    text = action.help or ""
    if action.default is not argparse.SUPPRESS and action.option_strings and \
        "default" not in text and not isinstance(action, argparse._HelpAction):  # pylint: disable=protected-access
      text += (" " if text else "") + "(default: %(default)s)"
    return text


class _Parser(argparse.ArgumentParser):
  """A usage mistake is one `error: ...` line (exit 2), as every other user error."""

  def error(self, message: str):
    print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
    raise SystemExit(2)


def parser(prog: str, doc: str) -> argparse.ArgumentParser:
  """An argparse parser named `prog`, described by the module docstring `doc`."""
  return _Parser(prog=prog, description=doc, formatter_class=_Formatter)


def add_data(p: argparse.ArgumentParser, *, scorers_default: str | None,
             scorers_help: str) -> None:
  """The flags every CLI that reads images shares, with one name and default each."""
  p.add_argument("--scorers", "--methods", dest="scorers", default=scorers_default,
                 help=f"comma-separated scorer names ({scorers_help})")
  p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="line_jax checkpoint folder")
  p.add_argument("--batch-size", type=int, default=256, help="images per model call")
  p.add_argument("--workers", type=int, default=None,
                 help="decoding threads (default: one per core)")


def add_common(p: argparse.ArgumentParser) -> None:
  p.add_argument("--quiet", action="store_true", help="no progress output")


def add_cache(p: argparse.ArgumentParser) -> None:
  from line_jax import feature_cache  # pylint: disable=g-import-not-at-top
  p.add_argument("--cache-dir", default=feature_cache.default_dir(),
                 help=f"feature cache shared by fit, tune and evaluate (${feature_cache.ENV} "
                      "sets the default)")
  p.add_argument("--no-cache", action="store_true",
                 help="neither read nor write the feature cache")


def cache_dir(args: argparse.Namespace) -> str | None:
  """The feature cache folder the flags ask for (None: no cache)."""
  return None if args.no_cache else args.cache_dir


def add_distributed(p: argparse.ArgumentParser) -> None:
  g = p.add_argument_group("multi-host (run the same command in every process)")
  g.add_argument("--coordinator", default=None,
                 help="HOST:PORT of process 0; 'auto' lets JAX find its peers (Cloud TPU, "
                      "SLURM, Open MPI)")
  g.add_argument("--num-processes", type=int, default=None, help="processes in all")
  g.add_argument("--process-id", type=int, default=None, help="this process, 0-based")


def init_distributed(args: argparse.Namespace) -> None:
  """`jax.distributed.initialize` from the flags, before anything touches JAX."""
  if args.coordinator is None:
    if args.num_processes is not None or args.process_id is not None:
      raise ValueError("--num-processes and --process-id need --coordinator")
    return
  import jax  # pylint: disable=g-import-not-at-top
  if args.coordinator == "auto":
    jax.distributed.initialize()
    return
  if args.num_processes is None or args.process_id is None:
    raise ValueError("--coordinator HOST:PORT needs --num-processes and --process-id")
  if not 0 <= args.process_id < args.num_processes:
    raise ValueError(f"--process-id {args.process_id} is not in [0, {args.num_processes})")
  jax.distributed.initialize(args.coordinator, num_processes=args.num_processes,
                             process_id=args.process_id, initialization_timeout=120)


def barrier(name: str) -> None:
  """All processes wait here (no-op on one process)."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


@contextlib.contextmanager
def user_errors(*, resumable: bool = False) -> Iterator[None]:
  """Turns user errors into one line and exit code 2, Ctrl-C into a hint."""
  try:
    yield
  except (ValueError, FileNotFoundError, TypeError) as e:
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(2) from e
  except KeyboardInterrupt:
    hint = "; rerun the same command to resume" if resumable else ""
    print(f"interrupted{hint}", file=sys.stderr)
    raise SystemExit(130) from None


@contextlib.contextmanager
def progress(total: int, desc: str, *, quiet: bool = False):
  """Yields `on_batch(n)`; a bar on a TTY, periodic lines elsewhere."""
  bar = _progress.bar(total, desc, unit="img", enabled=not quiet)
  try:
    yield bar.update
  finally:
    bar.close()


def write_json(path: str, value: Any) -> None:
  """Writes `value` atomically: a reader sees the old file or the whole new one."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(value, f, indent=2, sort_keys=True)
    f.write("\n")
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def scorer_names(spec: str) -> list[str]:
  """`"line,knn"` -> checked, distinct registered names."""
  names = [n.strip() for n in spec.split(",") if n.strip()]
  for name in names:
    scorers.get(name)  # Unknown names fail here, listing the valid ones.
  if not names or len(set(names)) != len(names):
    raise ValueError(f"--scorers must list distinct scorers, got {spec!r}")
  return names


def parse_hparams(specs: Sequence[str], names: Sequence[str]) -> dict[str, dict]:
  """`["knn.k=50", "line.p_w=90"]` -> `{"knn": {"k": 50}, "line": {"p_w": 90}}`."""
  hparams: dict[str, dict] = {}
  for spec in specs:
    key, sep, value = spec.partition("=")
    scorer, dot, name = key.partition(".")
    if not sep or not dot or scorer not in names:
      raise ValueError(f"--hparam expects SCORER.NAME=VALUE for a requested "
                       f"scorer, got {spec!r}")
    try:
      parsed = json.loads(value)
    except json.JSONDecodeError:
      parsed = value
    valid = scorers.get(scorer).defaults
    if name not in valid:
      raise ValueError(f"unknown hyperparameter {name!r} for scorer {scorer!r}; "
                       f"valid: {', '.join(valid) or 'none'}")
    hparams.setdefault(scorer, {})[name] = parsed
  return hparams


def batch_shard(num_records: int, batch_size: int, index: int, count: int) -> tuple[int, int]:
  """Process `index` of `count`'s records `[start, stop)`, whole batches each.

  Shard boundaries fall on multiples of `batch_size`, so every process's
  batches are exactly the batches one process would read (the same rows
  together, so the model computes the same bits), and only the last shard
  ends with a partial batch.
  """
  batches = -(-num_records // batch_size)
  first, last = index * batches // count, (index + 1) * batches // count
  return min(first * batch_size, num_records), min(last * batch_size, num_records)


@dataclasses.dataclass
class Model:
  """A checkpoint's model, its head, and how its inputs are made.

  The config's "head" (default "fc") names the final Dense layer.
  """

  module: Any
  variables: Any
  config: dict

  @property
  def head(self) -> tuple[Any, Any]:
    """`(kernel [features, classes], bias [classes] or None)`."""
    from line_jax import models  # pylint: disable=g-import-not-at-top
    return models.head_params(self.variables, head=self.config.get("head", "fc"))

  @property
  def kernel(self):
    return self.head[0]

  @property
  def bias(self):
    return self.head[1]

  @property
  def preprocess(self):
    """The `line_jax.data.Preprocess` of this model's input."""
    from line_jax import data  # pylint: disable=g-import-not-at-top
    height, width, channels = self.config["input_shape"]
    if height != width:
      raise ValueError(f"the model takes {height}x{width} inputs; only square crops are made")
    return data.Preprocess(image_size=height, channels=channels)

  def source(self, dataset: str, split: str, batch_size: int, *, limit: int | None = None):
    """The records of `dataset`'s `split` this process reads.

    On multi-host each process reads its own contiguous shard of whole
    batches (`batch_shard`).
    """
    import jax  # pylint: disable=g-import-not-at-top
    from line_jax import data  # pylint: disable=g-import-not-at-top
    from line_jax.data import _named  # pylint: disable=g-import-not-at-top
    source = _named.open_source(dataset, split)
    if limit is not None:
      source = data.Subset.range(source, 0, limit)
    if len(source) == 0:
      raise ValueError(f"dataset {dataset!r} ({split}) holds no image")
    _check_labels(getattr(source, "labels", None), int(self.config["num_classes"]), dataset)
    if jax.process_count() > 1:
      source = data.Subset.range(source, *batch_shard(len(source), batch_size,
                                                      jax.process_index(), jax.process_count()))
    return source

  def batches(self, source, batch_size: int, *, workers: int | None = None):
    """The grain pipeline over `source`, preprocessed for this model."""
    from line_jax import data  # pylint: disable=g-import-not-at-top
    return data.image_batches(source, self.preprocess, batch_size=batch_size, workers=workers)

  @functools.cached_property
  def model_key(self) -> str:
    """The `line_jax.feature_cache.model_key` of this model (digested once)."""
    from line_jax import feature_cache  # pylint: disable=g-import-not-at-top
    return feature_cache.model_key(self.module, self.variables, mean=self.config["mean"],
                                   std=self.config["std"], preprocess=self.preprocess,
                                   head=self.config.get("head"))

  def cache_key(self, source) -> str | None:
    """The `line_jax.feature_cache` key of this model's features of `source`
    (None for a source the cache cannot key)."""
    from line_jax import feature_cache  # pylint: disable=g-import-not-at-top
    return feature_cache.key(self.model_key, source)

  def features(self, batches):
    """A `line_jax.fold.Stream` of this model's features over `batches`."""
    from line_jax import fold  # pylint: disable=g-import-not-at-top
    return fold.ImageFeatures(batches, self.module, self.variables,
                              np.asarray(self.config["mean"], np.float32),
                              np.asarray(self.config["std"], np.float32),
                              head=self.config.get("head"))


def _check_labels(labels, num_classes: int, dataset: str) -> None:
  """Labels a source knows up front must fit the model's classes (-1: none)."""
  if labels is None or len(labels) == 0:
    return
  labels = np.asarray(labels)
  if labels.min() < 0 or labels.max() >= num_classes:
    raise ValueError(f"labels of {dataset!r} must lie in [0, {num_classes}) for this model, "
                     f"got [{labels.min()}, {labels.max()}]")


def open_model(checkpoint: str) -> Model:
  """Loads a line_jax checkpoint folder and checks it knows its normalisation."""
  from line_jax import _checkpoint  # pylint: disable=g-import-not-at-top
  module, variables, config = _checkpoint.load_model(checkpoint)
  if "mean" not in config or "std" not in config:
    raise ValueError(f"{checkpoint}/config.json has no 'mean' and 'std': "
                     "the normalisation the model was trained with is unknown")
  return Model(module, variables, config)
