"""The registry: canonical scorer names -> `Scorer` (fit, score, defaults).

A plain dict, filled once at import. Each method's module declares its `Fold`
(`line_jax.fold`) and its jitted `score`; `fit` and `fit_from_batches` are
the one fold (`line_jax.fold.fit`) over one batch and over a stream.
Hyperparameters are
the keyword-only parameters of the fold's `init`; a misspelt one is an error
that lists the valid ones, never silently ignored.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import inspect
import types
from typing import Any, NamedTuple

import numpy as np

from line_jax import _buckets
from line_jax import _scoring
from line_jax import _validation
from line_jax import fold as fold_lib
from line_jax import line
from line_jax.scorers import _ash
from line_jax.scorers import _caref
from line_jax.scorers import _cfood
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
from line_jax.scorers import _lts
from line_jax.scorers import _mahalanobis
from line_jax.scorers import _maxlogit
from line_jax.scorers import _mcm
from line_jax.scorers import _msp
from line_jax.scorers import _nci
from line_jax.scorers import _neco
from line_jax.scorers import _nnguide
from line_jax.scorers import _openmax
from line_jax.scorers import _optfs
from line_jax.scorers import _pnml
from line_jax.scorers import _react
from line_jax.scorers import _react_dice
from line_jax.scorers import _relation
from line_jax.scorers import _residual
from line_jax.scorers import _rmds
from line_jax.scorers import _scale
from line_jax.scorers import _shaping
from line_jax.scorers import _she
from line_jax.scorers import _temp_scaling
from line_jax.scorers import _vim
from line_jax.scorers import _vra
from line_jax.scorers import _weiper
from line_jax.scorers._quantile import TrainPercentile


# Rows per call of `Scorer.score_all`: bounds KNN's `[chunk, bank block]` temporary.
SCORE_CHUNK = 2048


class Scorer(NamedTuple):
  """One OOD scorer on penultimate features; higher score = more ID.

  Attributes:
    name: canonical name in the registry.
    fold: its `Fold` (init / update / finalize, passes): how it fits.
    score: `score(state, features, layout=None) -> [batch]`, the method's
      jitted score behind bucketed padding (`line_jax._buckets`): a stream of
      batch sizes compiles once per bucket, O(log batch) times, not once per
      size. Features may be NumPy, JAX, a list or a PyTorch tensor; `layout`
      (`line_jax.layout.CPU` or `ACCELERATOR`) defaults to that of the
      device the features are on.
    defaults: the hyperparameters and their defaults (`fold.init`'s
      keyword-only parameters).
    state_type: the class of its fitted states (its own: a state says whose
      it is, and `line_jax.save` records the scorer's name).
    grid: `{hyperparameter: values}` that `line_jax.runs.tune` searches, kept
      next to the method (empty: nothing to tune).
  """

  name: str
  fold: fold_lib.Fold
  score: Callable[[Any, Any], Any]
  defaults: Mapping[str, Any]
  state_type: type
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
    self.check_hparams(hparams)
    features, labels, kernel, bias = _validation.train_arrays(features, labels, kernel, bias)
    _common.check_train(features, labels, kernel, bias,
                        needs_labels=self.fold.needs_labels)
    # In-memory data is the whole training set, on every process alike.
    return fold_lib.fit(self.fold, [(features, labels)], kernel, bias, validate=False,
                        across_processes=False, **hparams)

  def fit_from_batches(self, batches, kernel, bias, **hparams) -> Any:
    """The fold over an iterable of `(features, labels)` batches.

    The same state as `fit` on their concatenation, in memory independent of
    the sample count; a re-iterable (not a generator) where `fold.passes > 1`.
    After `jax.distributed.initialize`, each process passes only its own
    batches and every process gets the state of all processes' batches
    (merged in process order after each pass). Arrays as in `fit`.
    """
    self.check_hparams(hparams)
    kernel, bias = _common.head_arrays(kernel, bias)
    return fold_lib.fit(self.fold, _common.array_batches(batches), kernel, bias, **hparams)

  def score_all(self, state: Any, features, *, nonfinite: str = "raise") -> np.ndarray:
    """`[n]` float64 scores of any number of rows, `SCORE_CHUNK` at a time.

    `features` is any sliceable `[n, features]` array (a memmap is read chunk
    by chunk). Every chunk has one shape (the last padded by repeating real
    rows: zeros would be NaN for ASH-S), so a set of any size compiles once.

    Args:
      state: this scorer's fitted state.
      features: `[n, features]` floating-point rows.
      nonfinite: "raise" (default): a row holding NaN or Inf is a ValueError
        naming the rows (after one pass, so a memmap is read once); "nan": such rows
        score NaN, as the jitted `score` gives them.
    """
    if nonfinite not in ("raise", "nan"):
      raise ValueError(f"nonfinite must be 'raise' or 'nan', got {nonfinite!r}")
    n = features.shape[0]
    if n == 0:
      return np.asarray(self.score(state, np.asarray(features)), np.float64)
    chunk = min(SCORE_CHUNK, n)
    out, bad = [], []
    for start in range(0, n, chunk):
      part = np.asarray(features[start:start + chunk])
      if nonfinite == "raise":
        bad.append(start + _scoring.nonfinite_rows(part))
      valid = part.shape[0]
      if valid < chunk:
        part = np.concatenate([part, np.repeat(part[-1:], chunk - valid, axis=0)])
      out.append(np.asarray(self.score(state, part))[:valid])
    if bad:
      _scoring.refuse_nonfinite(np.concatenate(bad), n)
    return np.concatenate(out).astype(np.float64)

  def check_hparams(self, hparams: Mapping[str, Any]) -> None:
    """Raises ValueError for a hyperparameter name this scorer does not take."""
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


# Format-1 files saved these shared base classes, which any scorer of that
# class may score (`line_jax.io`); every other state belongs to one scorer.
_LEGACY = (_common.HeadState, _shaping.ShapingState)


def _scorer(name: str, module: types.ModuleType, state_type: type, *, fold=None, score=None,
            grid=None) -> Scorer:
  """The registry entry of the method in `module` (its `FOLD`, `score`, `GRID`)."""
  fold = fold or module.FOLD
  grid = getattr(module, "GRID", None) if grid is None else grid
  defaults = _defaults(fold.init)
  if set(grid or ()) - set(defaults):
    raise AssertionError(f"{name}: grid names unknown hyperparameters")
  def check_state(state: Any) -> None:
    owner = _BY_STATE.get(type(state))
    if isinstance(state, state_type) or (owner is None and isinstance(state, _LEGACY)
                                         and issubclass(state_type, type(state))):
      return
    whose = f"the state of scorer {owner!r}" if owner else f"not a {state_type.__name__}"
    raise TypeError(f"scorer {name!r} cannot score a {type(state).__name__}: it is {whose}")

  return Scorer(name=name, fold=fold, score=_buckets.bucketed(score or module.score, check_state),
                defaults=types.MappingProxyType(defaults), state_type=state_type,
                grid=types.MappingProxyType(dict(grid or {})))


_REGISTRY: dict[str, Scorer] = {
    s.name: s
    for s in (
        _scorer("msp", _msp, _msp.MspState),
        _scorer("maxlogit", _maxlogit, _maxlogit.MaxLogitState),
        _scorer("energy", _energy, _energy.EnergyState),
        _scorer("react", _react, _react.ReactState),
        _scorer("dice", _dice, _dice.DiceState),
        _scorer("ash_p", _ash, _ash.AshPState, fold=_ash.FOLD_P, score=_ash.score_p),
        _scorer("ash_b", _ash, _ash.AshBState, fold=_ash.FOLD_B, score=_ash.score_b),
        _scorer("ash_s", _ash, _ash.AshSState, fold=_ash.FOLD_S, score=_ash.score_s),
        _scorer("scale", _scale, _scale.ScaleState),
        _scorer("mahalanobis", _mahalanobis, _mahalanobis.MahalanobisState),
        _scorer("knn", _knn, _knn.KnnState),
        _scorer("vim", _vim, _vim.VimState),
        _scorer("gradnorm", _gradnorm, _gradnorm.GradNormState),
        _scorer("line", _line, line.LineState),
        _scorer("gen", _gen, _gen.GenState),
        _scorer("entropy", _entropy, _entropy.EntropyState),
        _scorer("klm", _klm, _klm.KlmState),
        _scorer("rmds", _rmds, _rmds.RmdsState),
        _scorer("she", _she, _she.SheState),
        _scorer("nnguide", _nnguide, _nnguide.NnguideState),
        _scorer("fdbd", _fdbd, _fdbd.FdbdState),
        _scorer("nci", _nci, _nci.NciState),
        _scorer("react_dice", _react_dice, _react_dice.ReactDiceState),
        # Issue 24: the rest of OpenOOD's and pytorch-ood's feature-and-head methods.
        _scorer("temp_scaling", _temp_scaling, _temp_scaling.TempScalingState),
        _scorer("vra", _vra, _vra.VraState),
        _scorer("residual", _residual, _residual.ResidualState),
        _scorer("mcm", _mcm, _mcm.McmState),
        _scorer("pnml", _pnml, _pnml.PnmlState),
        _scorer("neco", _neco, _neco.NecoState),
        _scorer("lts", _lts, _lts.LtsState),
        _scorer("caref", _caref, _caref.CarefState, fold=_caref.FOLD_CAREF,
                score=_caref.score_caref),
        _scorer("cadref", _caref, _caref.CadrefState, fold=_caref.FOLD_CADREF,
                score=_caref.score_cadref, grid=_caref.GRID_CADREF),
        _scorer("optfs", _optfs, _optfs.OptfsState),
        _scorer("relation", _relation, _relation.RelationState),
        _scorer("cfood", _cfood, _cfood.CfoodState),
        _scorer("openmax", _openmax, _openmax.OpenmaxState),
        _scorer("weiper", _weiper, _weiper.WeiperState),
    )
}
_BY_STATE = {s.state_type: s.name for s in _REGISTRY.values()}
assert len(_BY_STATE) == len(_REGISTRY), "every scorer needs a state class of its own"


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


def name_of(state: Any) -> str:
  """The registered name of the scorer whose fitted state `state` is.

  Raises:
    TypeError: for anything but a registered scorer's state.
  """
  name = _BY_STATE.get(type(state))
  if name is None:
    raise TypeError(f"{type(state).__name__} is not the fitted state of a registered scorer")
  return name


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
