"""Hyperparameter selection on held-out data, each grid in one vmapped call.

    python -m line_jax.tune --out tune.json

Data (never the test sets of `line_jax.evaluate`):

* fit: the first 55,000 Fashion-MNIST training images; ID validation: the
  last 5,000 training images (the test split is not touched);
* OOD validation (`validation_ood`): a seeded set disjoint from the seven
  embedded test sets: half random square crops of `skimage.data` images no
  test set uses (moon, page, text, clock, cell, microaneurysms,
  hubble_deep_field, immunohistochemistry; gray), half Gaussian-blurred
  uniform noise (smooth blobs; the test noise sets are i.i.d. pixels).

Every scorer's hyperparameter becomes a traced value, so a method's whole
grid is scored by one jitted `jax.vmap(score, in_axes=(0, None))` over a
stacked state (fitted states are pytrees of arrays; masks and thresholds are
data): LINe over (p_w, p_a, clip), ReAct over its clipping threshold, DICE
over its masked head, ASH-P/B/S and SCALE over the kept count k (a traced
re-implementation, checked against the registry scorer), KNN over k (one
top-k_max per query, then a gather). The same grid is also scored by a
Python loop of the registry's `fit` / `score`; the two must agree (asserted)
and both times are reported. ViM's D fixes array shapes, so it is tuned by
the loop alone. Best = highest AUROC, ties broken by lower FPR95.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence
import functools
import itertools
import json
import sys
import time
import zlib
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from line_jax import _matmul
from line_jax import line
from line_jax import metrics as metrics_lib
from line_jax import scorers
from line_jax.scorers import _common
from line_jax.scorers import _knn
from line_jax.scorers import _shaping

CHUNK = 512  # validation samples per vmapped step: bounds [grid, chunk, m, C]
VALIDATION_SOURCES = ("moon", "page", "text", "clock", "cell", "microaneurysms",
                      "hubble_deep_field", "immunohistochemistry")

# Each method's grid lives next to it (`scorers.get(name).grid`).
GRIDS: dict[str, dict[str, tuple]] = {
    name: dict(scorers.get(name).grid) for name in scorers.names() if scorers.get(name).grid}


def grid_points(grid: Mapping[str, Sequence]) -> list[dict[str, Any]]:
  """Every combination of a `{name: values}` grid, last name fastest."""
  keys = list(grid)
  return [dict(zip(keys, values)) for values in itertools.product(*grid.values())]


# ---- Validation OOD data ---------------------------------------------------


def validation_ood(size: int = 2000, seed: int = 0) -> np.ndarray:
  """uint8 `[size, 28, 28, 1]` validation OOD images (see module docstring)."""
  from skimage import data
  from line_jax.data import _embedded_ood

  rng = np.random.default_rng([seed, zlib.crc32(b"tune-validation")])
  sources = [_embedded_ood._gray(getattr(data, name)()) for name in VALIDATION_SOURCES]
  crops = _embedded_ood._random_crops(sources, size // 2, rng, min_side=28, max_side=256)
  noise = rng.uniform(0, 255, (size - size // 2, 28, 28)).astype(np.float32)
  blurred = _blur(noise, sigma=rng.uniform(1.0, 3.0, size - size // 2))
  return np.concatenate([crops, blurred])[..., None]


def _blur(images: np.ndarray, sigma: np.ndarray) -> np.ndarray:
  """Gaussian blur per image, contrast stretched back to [0, 255], uint8."""
  from skimage.filters import gaussian

  out = np.empty(images.shape, np.uint8)
  for i, (image, s) in enumerate(zip(images, sigma)):
    smooth = gaussian(image, sigma=float(s), preserve_range=True)
    smooth = (smooth - smooth.min()) / max(float(np.ptp(smooth)), 1e-6)
    out[i] = np.round(smooth * 255).astype(np.uint8)
  return out


# ---- Traced-hyperparameter scorers ----------------------------------------


@flax.struct.dataclass
class ShapingK:
  """ASH / SCALE with the kept count k as data instead of a static field.

  Attributes:
    kernel: `[features, classes]`; bias: `[classes]`; k: int32 scalar.
  """

  kernel: jax.Array
  bias: jax.Array
  k: jax.Array


@flax.struct.dataclass
class KnnK:
  """KNN with the neighbour rank k as data.

  Attributes:
    bank: `[bank, features]` normalised training features; sq_norms: `[bank]`.
    k: int32 scalar; k_max: static, the largest k of the grid.
  """

  bank: jax.Array
  sq_norms: jax.Array
  k: jax.Array
  k_max: int = flax.struct.field(pytree_node=False)


def _ranks(h: jax.Array) -> jax.Array:
  """Rank of each entry in its row, largest first, ties by lower index first."""
  order = jnp.argsort(-h, axis=1, stable=True)
  return jnp.argsort(order, axis=1)


def _ash_k(state: ShapingK, features: jax.Array, variant: str) -> jax.Array:
  h = features.astype(jnp.float32)
  mask = _ranks(h) < state.k
  before = jnp.sum(h, axis=1, keepdims=True)
  if variant == "b":
    shaped = jnp.where(mask, before / state.k.astype(jnp.float32), 0.0)
  else:
    shaped = jnp.where(mask, h, 0.0)
    if variant == "s":
      shaped = shaped * jnp.exp(before / jnp.sum(shaped, axis=1, keepdims=True))
  return _common.energy(_matmul.dot(shaped, state.kernel) + state.bias)


def _scale_k(state: ShapingK, features: jax.Array) -> jax.Array:
  h = features.astype(jnp.float32)
  top = jnp.cumsum(-jnp.sort(-h, axis=1), axis=1)[:, state.k - 1]
  factor = jnp.exp(jnp.sum(h, axis=1) / top)
  return _common.energy(_matmul.dot(h * factor[:, None], state.kernel) + state.bias)


def _knn_k(state: KnnK, features: jax.Array) -> jax.Array:
  z = _knn._normalise(features)
  # Independent of k: under vmap over k this top-k runs once, not per k.
  best = jax.lax.top_k(_knn._affinity(z, state.bank, state.sq_norms), state.k_max)[0]
  kth = jnp.take(best, state.k - 1, axis=1)
  return -jnp.sqrt(jnp.maximum(jnp.sum(z * z, axis=1) - kth, 0.0))


_line_dense = functools.partial(line.score, strategy="dense")
_ash_p_k = functools.partial(_ash_k, variant="p")
_ash_b_k = functools.partial(_ash_k, variant="b")
_ash_s_k = functools.partial(_ash_k, variant="s")


@functools.partial(jax.jit, static_argnums=(0, 3))
def grid_scores(score_fn: Callable, states: Any, features: jax.Array, in_axes: Any = 0
                ) -> jax.Array:
  """`[grid, n]` scores of every grid point: one compiled computation.

  Args:
    score_fn: `score(state, [b, features]) -> [b]`, a module-level function.
    states: a state pytree whose batched leaves have a leading grid axis.
    features: `[n, features]`, scored in chunks of `CHUNK` under `lax.map`.
    in_axes: vmap axes of `states` (hashable: 0, or a state of 0 / None).
  """
  n, m = features.shape
  chunk = min(CHUNK, n)
  padded = -(-n // chunk) * chunk
  # Repeat the last row rather than pad with zeros (ASH-S divides by sums).
  idx = jnp.minimum(jnp.arange(padded), n - 1)
  chunks = features[idx].reshape(padded // chunk, chunk, m)
  per_chunk = jax.lax.map(
      lambda f: jax.vmap(score_fn, in_axes=(in_axes, None))(states, f), chunks)
  return jnp.moveaxis(per_chunk, 1, 0).reshape(per_chunk.shape[1], padded)[:, :n]


def stack(states: Sequence[Any]) -> Any:
  """One pytree whose leaves gain a leading grid axis."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *states)


# ---- Per-method grids -----------------------------------------------------


def resolve(method: str, point: Mapping[str, Any], train_features: np.ndarray) -> dict:
  """Grid point -> the scorer's hyperparameters (percentiles -> thresholds)."""
  point = dict(point)
  if method == "line" and point["clip"] is not None:
    point["clip"] = float(np.percentile(train_features.astype(np.float64), point["clip"]))
  return point


def vmapped_grid(method: str, points: Sequence[Mapping[str, Any]], train_features,
                 train_labels, kernel, bias):
  """`(score_fn, stacked_state, in_axes)` of `method`'s grid, or None (loop only)."""
  kernel = jnp.asarray(kernel, jnp.float32)
  bias = jnp.asarray(bias, jnp.float32)
  m = train_features.shape[1]
  if method == "line":
    contrib = line.contributions(train_features, train_labels, kernel)
    states = [line.fit_from_contributions(
        contrib, kernel, bias, **resolve(method, p, train_features)).replace(p_w=None, p_a=None)
              for p in points]
    return _line_dense, stack(states), 0
  if method in ("react", "dice"):
    scorer = scorers.get(method)
    states = [scorer.fit(train_features, None, kernel, bias, **p) for p in points]
    return scorer.score, stack(states), 0
  if method in ("ash_p", "ash_b", "ash_s", "scale"):
    ks = [_shaping.kept_count(m, _shaping.check_percentile(p["percentile"], m)) for p in points]
    states = ShapingK(jnp.broadcast_to(kernel, (len(ks), *kernel.shape)),
                      jnp.broadcast_to(bias, (len(ks), *bias.shape)), jnp.asarray(ks, jnp.int32))
    fn = {"ash_p": _ash_p_k, "ash_b": _ash_b_k, "ash_s": _ash_s_k, "scale": _scale_k}[method]
    return fn, states, 0
  if method == "knn":
    ks = [int(p["k"]) for p in points]
    bank = _knn._normalise(jnp.asarray(train_features))
    states = KnnK(bank, jnp.sum(bank * bank, axis=-1), jnp.asarray(ks, jnp.int32), max(ks))
    return _knn_k, states, KnnK(None, None, 0, max(ks))
  return None


def loop_grid(method: str, points, train_features, train_labels, kernel, bias,
              val_features: np.ndarray) -> np.ndarray:
  """`[grid, n]` scores by the registry's fit / score, one point at a time."""
  from line_jax.evaluate import score_all

  scorer = scorers.get(method)
  out = []
  for p in points:
    state = scorer.fit(train_features, train_labels, kernel, bias,
                       **resolve(method, p, train_features))
    out.append(score_all(scorer, state, val_features))
  return np.stack(out)


def tune_method(method: str, train_features, train_labels, kernel, bias,
                val_id: np.ndarray, val_ood: np.ndarray, *,
                grid: Mapping[str, Sequence] | None = None, check: bool = True,
                rtol: float = 1e-4) -> dict[str, Any]:
  """Scores `method`'s grid vmapped and by a loop; picks the best point.

  Args:
    method: scorer name with a grid in `GRIDS` (or pass `grid`).
    train_features: `[n, features]`; train_labels: `[n]`; kernel, bias: head.
    val_id: `[n_id, features]` ID validation; val_ood: `[n_ood, features]`.
    grid: `{hyperparameter: values}`; defaults to `GRIDS[method]`.
    check: also run the Python loop and assert it agrees with the vmapped grid.
    rtol: relative tolerance of that check (atol = rtol).

  Returns:
    `{"best": point, "metrics": metrics of the best, "grid_size",
    "vmapped_s", "vmapped_compile_s", "loop_s", "grid": [[point, metrics], ...]}`.
  """
  points = grid_points(GRIDS[method] if grid is None else grid)
  val = np.concatenate([val_id, val_ood]).astype(np.float32)
  result: dict[str, Any] = {"grid_size": len(points), "vmapped_s": None,
                            "vmapped_compile_s": None, "loop_s": None}
  built = vmapped_grid(method, points, train_features, train_labels, kernel, bias)
  scores = None
  if built is not None:
    fn, states, in_axes = built
    start = time.perf_counter()
    jax.block_until_ready(grid_scores(fn, states, val, in_axes))
    result["vmapped_compile_s"] = time.perf_counter() - start
    start = time.perf_counter()  # Second call: the compiled computation alone.
    scores = np.asarray(jax.block_until_ready(grid_scores(fn, states, val, in_axes)),
                        np.float64)
    result["vmapped_s"] = time.perf_counter() - start
  if check or scores is None:
    start = time.perf_counter()
    looped = loop_grid(method, points, train_features, train_labels, kernel, bias, val)
    result["loop_s"] = time.perf_counter() - start
    if scores is not None:
      np.testing.assert_allclose(scores, looped, rtol=rtol, atol=rtol,
                                 err_msg=f"{method}: vmapped grid != Python loop")
    else:
      scores = looped
  n_id = val_id.shape[0]
  rows = [metrics_lib.evaluate(s[:n_id], s[n_id:]) for s in scores]
  best = max(range(len(points)), key=lambda i: (rows[i]["auroc"], -rows[i]["fpr95"]))
  result.update(best=points[best], metrics=rows[best],
                grid=[[p, r] for p, r in zip(points, rows)])
  return result


def run_tuning(methods: Sequence[str] | None = None, *, checkpoint: str | None = None,
               val_size: int = 5000, ood_size: int = 2000, check: bool = True,
               batch_size: int = 512, progress: bool = True) -> dict[str, dict]:
  """Extracts features of the fit / validation data and tunes each method."""
  from line_jax import _checkpoint
  from line_jax import data
  from line_jax import evaluate
  from line_jax import features

  model, variables, config = _checkpoint.load_model(checkpoint or evaluate.DEFAULT_CHECKPOINT)
  images, labels = data.read_fashion_mnist("train")
  extract = functools.partial(features.extract, model, variables, mean=config["mean"],
                              std=config["std"], batch_size=batch_size)
  feats = extract(images[..., None], progress="features: train" if progress else False)[1]
  val_ood = extract(validation_ood(ood_size), progress=False)[1]
  head = variables["params"]["fc"]
  methods = [m for m in (methods or GRIDS)]
  out = {}
  for method in methods:
    if method not in GRIDS:
      raise ValueError(f"no grid for {method!r}; tunable: {', '.join(GRIDS)}")
    out[method] = tune_method(method, feats[:-val_size], labels[:-val_size], head["kernel"],
                              head["bias"], feats[-val_size:], val_ood, check=check)
    if progress:
      print(_row(method, out[method]), flush=True)
  return out


def _row(method: str, r: Mapping[str, Any]) -> str:
  def secs(x):
    return "-" if x is None else f"{x:.2f}"
  best = ", ".join(f"{k}={v}" for k, v in r["best"].items())
  return (f"| {method} | {best} | {100 * r['metrics']['fpr95']:.2f} | "
          f"{100 * r['metrics']['auroc']:.2f} | {r['grid_size']} | {secs(r['vmapped_s'])} | "
          f"{secs(r['vmapped_compile_s'])} | {secs(r['loop_s'])} |")


def format_table(results: Mapping[str, Mapping[str, Any]]) -> str:
  """Markdown: best point, its validation FPR95 / AUROC (%), and the times."""
  lines = ["| method | best | val FPR95 | val AUROC | grid | vmapped s | "
           "first call s (compile) | loop s |", "|---|---|---|---|---|---|---|---|"]
  return "\n".join(lines + [_row(m, r) for m, r in results.items()]) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
  p = argparse.ArgumentParser(prog="python -m line_jax.tune", description=__doc__.split("\n")[0])
  p.add_argument("--out", default=None, help="JSON file for the results")
  p.add_argument("--methods", default=None, help="comma-separated (default: all with a grid)")
  p.add_argument("--checkpoint", default=None, help="line_jax checkpoint folder")
  p.add_argument("--no-check", action="store_true", help="skip the Python-loop comparison")
  args = p.parse_args(argv)
  try:
    results = run_tuning(None if args.methods is None else args.methods.split(","),
                         checkpoint=args.checkpoint, check=not args.no_check)
  except ValueError as e:
    sys.exit(f"error: {e}")
  print(format_table(results))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  main()
