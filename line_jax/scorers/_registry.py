"""The registry: canonical scorer names -> `Scorer` (fit, score, defaults).

A plain dict, filled once at import. Each method's module declares its `Fold`
(`_protocol`) and its jitted `score`; `fit` and `fit_from_batches` are the one
fold (`_protocol.run`) over one batch and over a stream. Hyperparameters are
the keyword-only parameters of the fold's `init`; a misspelt one is an error
that lists the valid ones, never silently ignored.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import inspect
import types
from typing import Any, NamedTuple

import jax
import numpy as np

from line_jax import _buckets
from line_jax import _validation
from line_jax.scorers import _ash
from line_jax.scorers import _common
from line_jax.scorers import _dice
from line_jax.scorers import _energy
from line_jax.scorers import _entropy
from line_jax.scorers import _fdbd
from line_jax.scorers import _gen
from line_jax.scorers import _gradnorm
from line_jax.scorers import _klm
from line_jax.scorers import _knn
from line_jax.scorers import _line
from line_jax.scorers import _mahalanobis
from line_jax.scorers import _maxlogit
from line_jax.scorers import _msp
from line_jax.scorers import _nci
from line_jax.scorers import _nnguide
from line_jax.scorers import _protocol
from line_jax.scorers._quantile import TrainPercentile
from line_jax.scorers import _react
from line_jax.scorers import _react_dice
from line_jax.scorers import _rmds
from line_jax.scorers import _scale
from line_jax.scorers import _she
from line_jax.scorers import _vim


class Scorer(NamedTuple):
  """One OOD scorer on penultimate features; higher score = more ID.

  Attributes:
    name: canonical name in the registry.
    fold: its `Fold` (init / update / finalize, passes): how it fits.
    score: `score(state, features) -> [batch]`, the method's jitted score
      behind bucketed padding (`line_jax._buckets`): a stream of batch sizes
      compiles once per bucket, O(log batch) times, not once per size.
      Features may be NumPy, JAX, a list or a PyTorch tensor.
    defaults: the hyperparameters and their defaults (`fold.init`'s
      keyword-only parameters).
    grid: `{hyperparameter: values}` that `line_jax.tune` searches, kept
      next to the method (empty: nothing to tune).
  """

  name: str
  fold: _protocol.Fold
  score: Callable[[Any, Any], Any]
  defaults: Mapping[str, Any]
  grid: Mapping[str, tuple] = types.MappingProxyType({})

  @property
  def score_fn(self) -> Callable[[Any, Any], Any]:
    """The jitted `score` itself, unpadded (`score` calls it when traced)."""
    return self.score.__wrapped__

  def fit(self, features, labels, kernel, bias, **hparams) -> Any:
    """The fold over one in-memory batch.

    Args:
      features: `[n, features]` training activations.
      labels: `[n]` integer labels (or None where the scorer uses none).
      kernel: `[features, classes]` head kernel (Flax layout).
      bias: `[classes]` head bias (or None).
      **hparams: the scorer's hyperparameters (see `defaults`).

    Each array may be NumPy, JAX, a list or a PyTorch tensor; anything else
    is a TypeError that names it.
    """
    self._check(hparams)
    features, labels, kernel, bias = _validation.train_arrays(features, labels, kernel, bias)
    _common.check_train(features, labels, kernel, bias,
                        needs_labels=self.fold.needs_labels)
    return _protocol.run(self.fold, [(features, labels)], kernel, bias,
                         validate=False, **hparams)

  def fit_from_batches(self, batches, kernel, bias, **hparams) -> Any:
    """The fold over an iterable of `(features, labels)` batches.

    The same state as `fit` on their concatenation, in memory independent of
    the sample count; a re-iterable (not a generator) where `fold.passes > 1`.
    After `jax.distributed.initialize`, each process passes only its own
    batches and every process gets the state of all processes' batches
    (`_protocol.run_processes`). Arrays as in `fit`.
    """
    self._check(hparams)
    kernel, bias = _common.head_arrays(kernel, bias)
    batches = _common.array_batches(batches)
    if jax.process_count() > 1:
      return _protocol.run_processes(self.fold, batches, kernel, bias, **hparams)
    return _protocol.run(self.fold, batches, kernel, bias, **hparams)

  def _check(self, hparams: Mapping[str, Any]) -> None:
    unknown = sorted(set(hparams) - set(self.defaults))
    if unknown:
      valid = ", ".join(self.defaults) if self.defaults else "none"
      raise ValueError(
          f"unknown hyperparameter(s) {', '.join(unknown)} for scorer "
          f"{self.name!r}; valid: {valid}"
      )


def _defaults(fn: Callable[..., Any]) -> dict[str, Any]:
  params = inspect.signature(fn).parameters.values()
  return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


def _scorer(name: str, fold: _protocol.Fold, score, grid=None) -> Scorer:
  defaults = _defaults(fold.init)
  if set(grid or ()) - set(defaults):
    raise AssertionError(f"{name}: grid names unknown hyperparameters")
  return Scorer(name=name, fold=fold, score=_buckets.bucketed(score),
                defaults=types.MappingProxyType(defaults),
                grid=types.MappingProxyType(dict(grid or {})))


_REGISTRY: dict[str, Scorer] = {
    s.name: s
    for s in (
        _scorer("msp", _msp.FOLD, _msp.score),
        _scorer("maxlogit", _maxlogit.FOLD, _maxlogit.score),
        _scorer("energy", _energy.FOLD, _energy.score),
        _scorer("react", _react.FOLD, _react.score, _react.GRID),
        _scorer("dice", _dice.FOLD, _dice.score, _dice.GRID),
        _scorer("ash_p", _ash.FOLD_P, _ash.score_p, _ash.GRID),
        _scorer("ash_b", _ash.FOLD_B, _ash.score_b, _ash.GRID),
        _scorer("ash_s", _ash.FOLD_S, _ash.score_s, _ash.GRID),
        _scorer("scale", _scale.FOLD, _scale.score, _scale.GRID),
        _scorer("mahalanobis", _mahalanobis.FOLD, _mahalanobis.score),
        _scorer("knn", _knn.FOLD, _knn.score, _knn.GRID),
        _scorer("vim", _vim.FOLD, _vim.score, _vim.GRID),
        _scorer("gradnorm", _gradnorm.FOLD, _gradnorm.score),
        _scorer("line", _line.FOLD, _line.score, _line.GRID),
        _scorer("gen", _gen.FOLD, _gen.score, _gen.GRID),
        _scorer("entropy", _entropy.FOLD, _entropy.score),
        _scorer("klm", _klm.FOLD, _klm.score),
        _scorer("rmds", _rmds.FOLD, _rmds.score),
        _scorer("she", _she.FOLD, _she.score),
        _scorer("nnguide", _nnguide.FOLD, _nnguide.score, _nnguide.GRID),
        _scorer("fdbd", _fdbd.FOLD, _fdbd.score, _fdbd.GRID),
        _scorer("nci", _nci.FOLD, _nci.score, _nci.GRID),
        _scorer("react_dice", _react_dice.FOLD, _react_dice.score, _react_dice.GRID),
    )
}


def resolved_hparams(hparams: Mapping[str, Any], state: Any) -> dict[str, Any]:
  """The hyperparameters a fit ran with, as they paste into `fit` unchanged.

  A `TrainPercentile` the scorer resolved while fitting becomes the value its
  state holds (the threshold in feature units); a `None` the scorer resolved
  to a count (ViM's `dim`, KNN's `k`) becomes that count. The rest are as
  given. `fit` and `evaluate` write these to `hparams.json`.
  """
  out = {}
  for key, value in hparams.items():
    held = getattr(state, key, None)
    if isinstance(value, TrainPercentile) and held is not None:
      out[key] = float(np.asarray(held))
    elif value is None and held is not None and np.ndim(held) == 0 and np.issubdtype(
        np.asarray(held).dtype, np.integer):
      out[key] = int(np.asarray(held))
    else:
      out[key] = value
  return out


def names() -> tuple[str, ...]:
  """Canonical names of every registered scorer."""
  return tuple(_REGISTRY)


def get(name: str) -> Scorer:
  """The scorer called `name`.

  Raises:
    ValueError: for an unknown name, listing the registered ones.
  """
  try:
    return _REGISTRY[name]
  except (KeyError, TypeError):
    raise ValueError(
        f"unknown scorer {name!r}; registered: {', '.join(_REGISTRY)}"
    ) from None
