"""The registry: canonical scorer names -> `Scorer` (fit, score, defaults).

A plain dict, filled once at import. Hyperparameters are keyword arguments
whose names and defaults are read from each method's `fit`; a misspelt one is
an error that lists the valid ones, never silently ignored.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import functools
import inspect
import types
from typing import Any, NamedTuple

from line_jax.scorers import _ash
from line_jax.scorers import _dice
from line_jax.scorers import _energy
from line_jax.scorers import _gradnorm
from line_jax.scorers import _knn
from line_jax.scorers import _line
from line_jax.scorers import _mahalanobis
from line_jax.scorers import _maxlogit
from line_jax.scorers import _msp
from line_jax.scorers import _react
from line_jax.scorers import _scale
from line_jax.scorers import _vim


class Scorer(NamedTuple):
  """One OOD scorer on penultimate features; higher score = more ID.

  Attributes:
    name: canonical name in the registry.
    fit: `fit(features, labels, kernel, bias, **hparams) -> state` with
      `features: [n, features]`, `labels: [n]` (or None where unused),
      `kernel: [features, classes]`, `bias: [classes]` (or None).
    score: jitted `score(state, features) -> [batch]`.
    fit_from_batches: `fit_from_batches(batches, kernel, bias, **hparams)`,
      `batches` an iterable of `(features, labels)`: the same state as `fit`
      on their concatenation, in memory independent of the sample count.
    defaults: the hyperparameters and their defaults.
  """

  name: str
  fit: Callable[..., Any]
  score: Callable[[Any, Any], Any]
  fit_from_batches: Callable[..., Any]
  defaults: Mapping[str, Any]


def _defaults(fn: Callable[..., Any]) -> dict[str, Any]:
  params = inspect.signature(fn).parameters.values()
  return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


def _checked(name: str, fn: Callable[..., Any], defaults: Mapping[str, Any]):
  @functools.wraps(fn)
  def wrapped(*args, **hparams):
    unknown = sorted(set(hparams) - set(defaults))
    if unknown:
      valid = ", ".join(defaults) if defaults else "none"
      raise ValueError(
          f"unknown hyperparameter(s) {', '.join(unknown)} for scorer "
          f"{name!r}; valid: {valid}"
      )
    return fn(*args, **hparams)
  return wrapped


def _scorer(name: str, fit, score, fit_from_batches) -> Scorer:
  defaults = _defaults(fit)
  if _defaults(fit_from_batches) != defaults:
    raise AssertionError(f"{name}: fit and fit_from_batches disagree on hyperparameters")
  return Scorer(
      name=name,
      fit=_checked(name, fit, defaults),
      score=score,
      fit_from_batches=_checked(name, fit_from_batches, defaults),
      defaults=types.MappingProxyType(defaults),
  )


_REGISTRY: dict[str, Scorer] = {
    s.name: s
    for s in (
        _scorer("msp", _msp.fit, _msp.score, _msp.fit_from_batches),
        _scorer("maxlogit", _maxlogit.fit, _maxlogit.score, _maxlogit.fit_from_batches),
        _scorer("energy", _energy.fit, _energy.score, _energy.fit_from_batches),
        _scorer("react", _react.fit, _react.score, _react.fit_from_batches),
        _scorer("dice", _dice.fit, _dice.score, _dice.fit_from_batches),
        _scorer("ash_p", _ash.fit_p, _ash.score_p, _ash.fit_p_from_batches),
        _scorer("ash_b", _ash.fit_b, _ash.score_b, _ash.fit_b_from_batches),
        _scorer("ash_s", _ash.fit_s, _ash.score_s, _ash.fit_s_from_batches),
        _scorer("scale", _scale.fit, _scale.score, _scale.fit_from_batches),
        _scorer("mahalanobis", _mahalanobis.fit, _mahalanobis.score,
                _mahalanobis.fit_from_batches),
        _scorer("knn", _knn.fit, _knn.score, _knn.fit_from_batches),
        _scorer("vim", _vim.fit, _vim.score, _vim.fit_from_batches),
        _scorer("gradnorm", _gradnorm.fit, _gradnorm.score, _gradnorm.fit_from_batches),
        _scorer("line", _line.fit, _line.score, _line.fit_from_batches),
    )
}


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
