"""Fitting scorers on a checkpoint's features of a dataset: what `python -m line_jax.fit` runs.

    states = fitting.fit_checkpoint(config, "fits/fmnist", cache_dir=feature_cache.default_dir())
    state = fitting.load_state("fits/fmnist", "line")

A run lives in one output folder: `args.json` (its settings; a resume with
other ones is refused), `progress/` (orbax steps of the accumulators and the
stream's position), `features.npy` / `labels.npy` (the rows later passes
and the feature cache read), `<scorer>/` (each state, `line_jax.load`) and
`hparams.json` (the settings each scorer ran with, resolved).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import numpy as np

from line_jax import _cli
from line_jax import _protocols
from line_jax import feature_cache
from line_jax import fold
from line_jax import io
from line_jax import scorers

ARGS_FILE = "args.json"
HPARAMS_FILE = "hparams.json"
CACHED_DIR = "cached"  # Progress of a fit folded from the feature cache.


def claim(out: str, config: dict[str, Any]) -> None:
  """Writes args.json (process 0), or checks that a resumed run has the same arguments."""
  path = os.path.join(out, ARGS_FILE)
  resumed = os.path.exists(path)
  _cli.barrier("line_jax.fit:claim")  # Everyone has looked before process 0 writes.
  if jax.process_index() == 0 and not resumed:
    os.makedirs(out, exist_ok=True)
    _cli.write_json(path, config)
  _cli.barrier("line_jax.fit:claimed")
  if resumed:
    with open(path) as f:
      stored = json.load(f)
    if stored != config:
      diff = [f"{k}: {stored.get(k)!r} -> {config.get(k)!r}"
              for k in sorted(set(stored) | set(config)) if stored.get(k) != config.get(k)]
      raise ValueError(
          f"{out} holds a run started with other arguments ({'; '.join(diff)}); "
          "run again with the same arguments to resume, or choose another --out")


def fit_checkpoint(config: dict[str, Any], out: str, *, workers: int | None = None,
                   quiet: bool = False, cache_dir: str | None = None) -> dict[str, Any]:
  """Streams the training set, folds every scorer, saves the states in `out`.

  Args:
    config: the run's settings, as `python -m line_jax.fit` stores them in
      `out/args.json`: "checkpoint", "dataset", "scorers", "benchmark",
      "hparams" (`{scorer: {name: value}}` over the benchmark's),
      "batch_size", "save_every", "max_examples" (None: all).
    out: the output folder.
    workers: decoding threads.
    quiet: no progress output.
    cache_dir: the feature cache (None: none). Where it holds this model's
      features of the dataset (on every process), they are folded instead
      of running the model (progress in `out/cached/`); otherwise the
      features the fit streams are added to it at the end.
  """
  out = os.path.abspath(out)
  model = _cli.open_model(config["checkpoint"])
  source = model.source(config["dataset"], "train", config["batch_size"],
                        limit=config["max_examples"])
  hparams = {name: _protocols.hparams_for(config["benchmark"], name,
                                          config["hparams"].get(name))
             for name in config["scorers"]}
  kernel, bias = model.head
  for name, hp in hparams.items():  # A bad value fails here, before `out` is claimed.
    scorers.get(name)._check(hp)  # pylint: disable=protected-access
    scorers.get(name).fold.init(kernel, bias, **hp)
  claim(out, config)
  key = None if cache_dir is None else model.cache_key(source)
  hit = _everywhere(None if key is None else feature_cache.lookup(cache_dir, key))
  start = time.perf_counter()
  with _cli.progress(len(source), "features" if hit is None else "cached features",
                     quiet=quiet) as bar:
    if hit is not None:
      stream, folder = fold.CachedFeatures(hit.features, hit.labels, config["batch_size"]), (
          os.path.join(out, CACHED_DIR))
    else:
      stream, folder = model.features(model.batches(source, config["batch_size"],
                                                    workers=workers)), out
    # Rows are published only where this run kept all of them: a run resumed
    # from one that kept none (started with no cache) has no rows before its
    # resume point.
    publish = key is not None and hit is None and (
        not _resumed(out) or os.path.isfile(fold.features_files(out)[0]))

    def add_to_cache():  # Before the finalizes: their failure does not lose the rows.
      feature_cache.publish(cache_dir, key, *fold.features_files(out),
                            seconds=time.perf_counter() - start,
                            description=f"{config['dataset']} (train) through "
                                        f"{config['checkpoint']}")

    states = fold.fit_stream(hparams, kernel, bias, stream, folder,
                             save_every=config["save_every"], on_batch=bar,
                             keep_features=publish,
                             on_stream_end=add_to_cache if publish else None)
  for name, state in states.items():
    io.save(os.path.join(out, name), state)  # Collective; process 0 writes.
  if jax.process_index() == 0:
    _cli.write_json(os.path.join(out, HPARAMS_FILE),
                    {name: scorers.resolved_hparams(hparams[name], states[name])
                     for name in states})
  return states


def _resumed(out: str) -> bool:
  """Whether `out` holds a saved step of an earlier run's stream."""
  progress = os.path.join(out, fold.PROGRESS_DIR)
  return os.path.isdir(progress) and any(n.isdigit() for n in os.listdir(progress))


def _everywhere(found: Any) -> Any:
  """`found` where every process found its entry, else None (one decision for all)."""
  if jax.process_count() == 1:
    return found
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  flags = multihost_utils.process_allgather(np.asarray([found is not None], np.int32))
  return found if bool(np.all(flags)) else None


def load_state(out: str | os.PathLike, name: str) -> Any:
  """The state `python -m line_jax.fit --out OUT` wrote for scorer `name`."""
  path = os.path.join(os.fspath(out), name)
  if not os.path.isdir(path):
    raise ValueError(f"{out} holds no fitted state {name!r} (run python -m "
                     "line_jax.fit to the end first)")
  return io.load(path)
