"""What every jitted score does around its method, the same for all of them.

    score = _scoring.jit(method_score)            # static `layout`
    score = _scoring.jit(fn, static_argnames=("strategy", "layout"))

Around `fn(state, features, ...) -> [batch]`, inside the one jitted
computation:

* integer or boolean features are a TypeError at trace time (the dtype is
  static), as they are at fit;
* an empty batch `[0, features]` scores `[]` (its width checked all the same,
  by tracing the method on one abstract row), whatever the method's loops;
* a row holding NaN or Inf scores NaN, never a finite number: a row of
  `+inf` would otherwise pass clipping (LINe, ReAct) and score as more
  in-distribution than any real input. The NaN is the documented flag of a
  bad row; the host-side entry points (`Scorer.score_all`, the CLIs, the
  metrics) refuse it with an error naming the rows. Keeping the flag inside
  the jitted function (no host check) keeps scoring asynchronous and usable
  under `jit`, `vmap` and `grad`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import functools

import jax
import jax.numpy as jnp
import numpy as np

from line_jax import _matmul


def check_dtype(features) -> None:
  """Trace-time check that `features` is floating point (NumPy, JAX, tracer)."""
  if not jnp.issubdtype(features.dtype, jnp.floating):
    raise TypeError(f"features must be a floating-point array, got dtype {features.dtype}")


def guarded(fn: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
  """`fn` with the dtype check, the empty batch and NaN for non-finite rows."""

  @functools.wraps(fn)
  def score(state, features, *args, **kwargs) -> jax.Array:
    check_dtype(features)
    if features.ndim != 2:
      return fn(state, features, *args, **kwargs)  # The method's own shape error.
    if features.shape[0] == 0:
      one_row = jax.ShapeDtypeStruct((1, features.shape[1]), features.dtype)
      out = jax.eval_shape(lambda x: fn(state, x, *args, **kwargs), one_row)
      return jnp.zeros((0,), out.dtype)
    scores = fn(state, features, *args, **kwargs)
    return jnp.where(finite_rows(features), scores, jnp.asarray(jnp.nan, scores.dtype))

  return score


def finite_rows(features: jax.Array) -> jax.Array:
  """`[batch]` True where the row of `[batch, features]` holds no NaN or Inf.

  The row's product with a zero vector: `x * 0` is 0 for a finite `x` and NaN
  for NaN or +-Inf, and a sum with a NaN term is NaN. As a matrix-vector
  product it goes to the same kernels as the head's product; on XLA:CPU the
  same sum written as an element-wise reduction (`sum(x * 0, axis=1)`) is a
  fusion of its own that cost as much as a small head's whole score, and
  `all(isfinite(x), axis=1)` more still.
  """
  zeros = jnp.zeros((features.shape[-1],), features.dtype)
  return jnp.isfinite(_matmul.dot(features, zeros))


def jit(fn: Callable[..., jax.Array], *,
        static_argnames: Sequence[str] = ("layout",)) -> Callable[..., jax.Array]:
  """`jax.jit(guarded(fn))`: every scorer's `score` is built this way."""
  return jax.jit(guarded(fn), static_argnames=tuple(static_argnames))


def nonfinite_rows(features: np.ndarray) -> np.ndarray:
  """Indices of the rows of host `[n, features]` holding NaN or Inf."""
  return np.flatnonzero(~np.all(np.isfinite(features), axis=1))


def named_rows(rows: np.ndarray, total: int) -> str:
  """`"row(s) 4, 17 (2 of 30)"`: the first ten of `rows`, for an error message."""
  shown = ", ".join(str(int(r)) for r in rows[:10]) + (", ..." if rows.size > 10 else "")
  return f"row(s) {shown} ({rows.size} of {total})"


def refuse_nonfinite(rows: np.ndarray, total: int, what: str = "features") -> None:
  """ValueError naming the non-finite rows, if there are any."""
  if rows.size:
    raise ValueError(f"{what} {named_rows(rows, total)} contain NaN or Inf: "
                     "their scores would be NaN. Remove them, or pass nonfinite='nan' "
                     "to score them as NaN")
