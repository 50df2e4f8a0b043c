"""Data parallelism over devices with `jax.sharding`: batches split along 'batch'.

Every line_jax computation treats samples independently (scores) or sums over
them (fit statistics), so splitting the batch axis over a 1-D mesh is all it
takes: a jitted function given a batch-sharded array runs one shard per device
and XLA inserts the cross-device sums (float64 ones included).

    mesh = sharding.batch_mesh()                       # all devices, axis 'batch'
    state = sharding.fit("line", features, labels, kernel, bias, mesh)
    scores = sharding.score(line.score, state, test_features, mesh)

Fit statistics are exact without padding tricks: `Batches` cuts each batch
into a prefix of a multiple of the device count, which is sharded, and a
remainder, which is not; streaming fits equal in-memory fits for any cut.
Scores are padded (zero rows) and the padding is dropped.

Multi-host (TPU pods, multi-node GPU), after `jax.distributed.initialize()`
in every process: `batch_mesh()` spans every host's devices, `shard_batch`
takes each process's own rows of the global batch
(`jax.make_array_from_process_local_data`), `score` scores each process's own
rows on its own devices, and a scorer's `fit_from_batches` over each
process's own batches returns the state of all of them on every process
(`line_jax.fold`; tested with two processes in tests/test_multihost.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
import functools
from typing import Any

import jax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from line_jax import line
from line_jax import scorers

AXIS = "batch"


def batch_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh whose one axis, 'batch', runs over `devices`.

  Args:
    devices: the devices to use; default `jax.devices()`, every device of
      every process (after `jax.distributed.initialize()` on multi-host).

  Returns:
    `Mesh` of shape `[len(devices)]` with axis name 'batch'.
  """
  devices = jax.devices() if devices is None else list(devices)
  if not devices:
    raise ValueError("batch_mesh needs at least one device")
  return Mesh(np.asarray(devices, dtype=object), (AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading axis split over 'batch', the rest of each array whole."""
  return NamedSharding(mesh, P(AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array (fitted states, heads)."""
  return NamedSharding(mesh, P())


def padded_size(n: int, mesh: Mesh) -> int:
  """`n` rounded up to a multiple of the mesh's device count."""
  d = mesh.devices.size
  return -(-n // d) * d


def shard_batch(x, mesh: Mesh, *, fill=0) -> jax.Array:
  """Pads `x` along axis 0 to a multiple of the devices and shards it.

  Args:
    x: `[batch, ...]` array (NumPy or JAX). On multi-host, this process's
      rows of the global batch; their count is padded to a multiple of its
      local devices.
    mesh: from `batch_mesh`.
    fill: value of the padding rows (they are appended after the real ones).

  Returns:
    `[padded, ...]` `jax.Array` with `NamedSharding(mesh, P('batch'))`; rows
    `[:batch]` are `x` (on multi-host, the concatenation over processes).
  """
  x = np.asarray(x) if not isinstance(x, jax.Array) else x
  sharding = batch_sharding(mesh)
  if jax.process_count() > 1:
    local = len(mesh.local_devices)
    x = _pad(x, -(-x.shape[0] // local) * local, fill)
    return jax.make_array_from_process_local_data(sharding, np.asarray(x))
  return jax.device_put(_pad(x, padded_size(x.shape[0], mesh), fill), sharding)


def _pad(x, size: int, fill):
  extra = size - x.shape[0]
  if extra == 0:
    return x
  widths = [(0, extra)] + [(0, 0)] * (x.ndim - 1)
  if isinstance(x, jax.Array):
    return jax.numpy.pad(x, widths, constant_values=fill)
  return np.pad(x, widths, constant_values=fill)


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Puts every leaf of `tree` (a fitted state, a head) on every device."""
  return jax.device_put(tree, replicated(mesh))


class Batches:
  """Re-iterable `(features, labels)` batches, sharded for an exact fit.

  Each batch becomes its largest prefix with a multiple of the device count
  rows, sharded over 'batch', then the few remaining rows as a plain
  (unsharded) batch. A scorer's `fit_from_batches` equals its fit on the
  concatenation for any split, so the statistics are those of the original
  rows and of nothing else. Iterable as often as `batches` is (two-pass
  scorers such as ReAct and ViM need a list, not a generator).
  """

  def __init__(self, batches: Iterable, mesh: Mesh):
    self._batches = batches
    self._mesh = mesh

  def __iter__(self) -> Iterator[tuple[jax.Array, jax.Array | None]]:
    d = self._mesh.devices.size
    for features, labels in self._batches:
      cut = (features.shape[0] // d) * d
      if cut:
        yield (shard_batch(features[:cut], self._mesh),
               None if labels is None else shard_batch(labels[:cut], self._mesh))
      if cut < features.shape[0]:
        yield features[cut:], None if labels is None else labels[cut:]


def update_sums(acc, features, labels, kernel, mesh: Mesh):
  """`line.update_sums` with the batch sharded over `mesh` (exact)."""
  for f, y in Batches([(features, labels)], mesh):
    acc = line.update_sums(acc, f, y, kernel)
  return acc


def fit(name: str, features, labels, kernel, bias, mesh: Mesh, **hparams) -> Any:
  """Fits the registered scorer `name` on batch-sharded training data.

  Args:
    name: a name from `line_jax.scorers.names()`.
    features: `[n, features]` training activations.
    labels: `[n]` integer labels or None.
    kernel: `[features, classes]` head kernel; bias: `[classes]` or None.
    mesh: from `batch_mesh`.
    **hparams: the scorer's hyperparameters.

  Returns:
    The scorer's state, equal to `scorers.get(name).fit(...)` up to the order
    of floating-point sums.
  """
  scorer = scorers.get(name)
  return scorer.fit_from_batches(Batches([(features, labels)], mesh), kernel, bias,
                                 **hparams)


def score(score_fn: Callable[..., jax.Array], state: Any, features, mesh: Mesh,
          **kwargs) -> jax.Array:
  """`score_fn(state, features, **kwargs)` with the batch sharded over `mesh`.

  The state is replicated and the features padded with zero rows and
  sharded; each device scores its rows. Dropping the padding leaves `[batch]`
  scores that XLA lays out as it likes (use `sharded_score_fn` to keep the
  padded scores split over 'batch').

  Args:
    score_fn: a scorer's `score` or `line.score` (then `strategy=` may be
      passed in `kwargs`).
    state: its fitted state.
    features: `[batch, features]`.
    mesh: from `batch_mesh`.

  Returns:
    `[batch]` scores of `features`' rows. On multi-host, each process passes
    its own rows and gets their scores: they are scored on its own devices
    (scores need no cross-process sum).
  """
  if mesh.is_multi_process:
    mesh = batch_mesh(jax.local_devices())
  n = features.shape[0]
  return sharded_score_fn(score_fn, mesh, **kwargs)(
      replicate(state, mesh), shard_batch(features, mesh))[:n]


def sharded_score_fn(score_fn: Callable[..., jax.Array], mesh: Mesh,
                     **kwargs) -> Callable[[Any, jax.Array], jax.Array]:
  """`score_fn` jitted with its output pinned to the 'batch' sharding.

  Takes a replicated state and `[padded]` batch-sharded features (from
  `shard_batch`); returns `[padded]` scores sharded over 'batch'.
  """
  return _sharded(score_fn, tuple(sorted(kwargs.items())), batch_sharding(mesh))


@functools.lru_cache(maxsize=64)
def _sharded(score_fn, kwargs, out_sharding):
  # Cached so that repeated calls share one compilation per (function,
  # keyword arguments, mesh).
  return jax.jit(functools.partial(score_fn, **dict(kwargs)),
                 out_shardings=out_sharding)
