"""Hyperparameter selection on held-out data, each grid in one vmapped call.

    results = tune.run(tune.Config(scorers=("line", "knn")), "out/tune")

What `python -m line_jax.tune` runs. `val_size` images of the training
split, held out by the one subset rule (`line_jax.data.hold_out`: every
class in proportion, evenly spaced), are the ID validation set, the rest of
the split the fitting set (the test split is never touched), and
`line_jax.data.validation_ood`, disjoint from every test OOD set, the OOD
one; features come from the shared cache, through `Config.network` (a line_jax
checkpoint, or a PyTorch state_dict of any architecture the import supports). With `skip_bad_images`, images
that cannot be decoded are left out before the hold-out (as if the folder
did not hold them) and each result lists them ("skipped_images").

Every scorer with a grid (`Scorer.grid`) is tuned alike: a state is fitted
at each point (one fold where the points share the data's statistics), the
states stack into one pytree with a leading grid axis, and one jitted
`jax.vmap` of the registry's own `score` scores the whole grid. States that
do not stack (ViM's D sizes its arrays) are scored by a loop of the
registry's `fit` / `score`; with `check` that loop runs for every grid and
must agree. Best = highest AUROC, then lower FPR95. Reported settings paste
into `fit`: a percentile grid (LINe's clip) is resolved to the threshold,
with the percentile reported as `clip_percentile`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import contextlib
import dataclasses
import functools
import itertools
import json
import os
import sys
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from line_jax import data
from line_jax import features
from line_jax import fold
from line_jax import metrics as metrics_lib
from line_jax import models
from line_jax import scorers
from line_jax.runs._network import Network
from line_jax.runs._shared import check_cache
from line_jax.runs._shared import check_out
from line_jax.runs._shared import check_positive
from line_jax.runs._shared import network_of
from line_jax.runs._shared import open_dataset
from line_jax.runs._shared import report_skipped
from line_jax.runs._shared import Runtime
from line_jax.runs._shared import skipped_records
from line_jax.runs._shared import write_json
from line_jax.runs._shared import write_text

OWN_FILES = ("tune.json", "table.md")  # What `run` writes in its folder.
CHUNK = 512  # validation samples per vmapped step: bounds [grid, chunk, m, C]

# Each method's grid lives next to it (`scorers.get(name).grid`).
GRIDS: dict[str, dict[str, tuple]] = {
    name: dict(scorers.get(name).grid) for name in scorers.names() if scorers.get(name).grid}

# Training rows of the probe batch that `_fold_once` folds per point.
_PROBE_ROWS = 64


def grid_points(grid: Mapping[str, Sequence]) -> list[dict[str, Any]]:
  """Every combination of a `{name: values}` grid, last name fastest."""
  keys = list(grid)
  return [dict(zip(keys, values)) for values in itertools.product(*grid.values())]


def feasible(method: str, points: Sequence[Mapping[str, Any]], kernel, bias
             ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
  """The grid points `method` accepts on this head, and the others with why.

  A grid is written once for every model; a point that cannot work on this
  one (ViM's `dim` at or above its feature count) is refused by the fold's
  `init`, the same check `fit` makes, and is left out, not capped.

  Returns:
    `(kept, skipped)`: points in grid order, and `{"hparams", "why"}` each.
  """
  init = scorers.get(method).fold.init
  kept, skipped = [], []
  for point in points:
    try:
      init(kernel, bias, **point)
    except ValueError as e:
      skipped.append({"hparams": dict(point), "why": str(e)})
    else:
      kept.append(dict(point))
  return kept, skipped


# ---- Grids of fitted states ------------------------------------------------


def resolve(points: Sequence[Mapping[str, Any]], train_features
            ) -> list[tuple[dict[str, Any], dict[str, float]]]:
  """Grid points -> `(hyperparameters, percentiles)` of each.

  The hyperparameters paste into `scorers.get(method).fit` unchanged: a grid
  value that is a percentile of the training activations (a
  `TrainPercentile`) becomes that threshold, in feature units, and the
  percentile it came from is kept under `"<name>_percentile"` in the second
  dict. Each percentile is computed once for the whole grid.
  """
  def percentile_of(value):
    return float(value.percentile) if isinstance(value, scorers.TrainPercentile) else None

  wanted = sorted({p for point in points for name, value in point.items()
                   if (p := percentile_of(value)) is not None})
  values = {}
  if wanted:
    flat = np.asarray(train_features, np.float64).reshape(-1)
    values = dict(zip(wanted, (float(v) for v in np.percentile(flat, wanted))))
  out = []
  for point in points:
    hparams, percentiles = {}, {}
    for name, value in point.items():
      p = percentile_of(value)
      if p is not None:
        value, percentiles[f"{name}_percentile"] = values[p], p
      hparams[name] = value
    out.append((hparams, percentiles))
  return out


def _equal(a, b) -> bool:
  a, b = np.asarray(a), np.asarray(b)
  return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b)


def _graft(folded: list, empty: list, own: list) -> list | None:
  """A point's folded leaves: `folded` where its empty accumulator's leaves
  (`own`) equal the first point's (`empty`), its own (hyperparameters) elsewhere."""
  if len(own) != len(empty):
    return None
  return [f if _equal(e, o) else o for f, e, o in zip(folded, empty, own)]


def _fold_once(scorer: scorers.Scorer, hparams: Sequence[Mapping[str, Any]], features,
               labels, kernel, bias) -> list | None:
  """Each point's state from one fold over the data, or None where it cannot be.

  Possible when the fold reads the data in one pass and `update` neither
  reads nor changes what sets the points apart (static fields, or leaves
  that differ between their empty accumulators), checked on a probe batch:
  each point's `update` of it equals the first point's with that point's own
  hyperparameters put back. Then the data is folded once, and each point's
  accumulator is that one with its own hyperparameters.
  """
  f = scorer.fold
  if not f.reads_data or len(hparams) < 2 or fold.passes_of(
      f, f.init(kernel, bias, **hparams[0])) != 1:
    return None
  try:
    inits = [jax.tree.flatten(f.init(kernel, bias, **h)) for h in hparams]
    empty = inits[0][0]
    probe = (features[:_PROBE_ROWS], None if labels is None else labels[:_PROBE_ROWS])
    probed = jax.tree.leaves(f.update(jax.tree.unflatten(inits[0][1], empty), *probe))
    for own, treedef in inits[1:]:
      want = _graft(probed, empty, own)
      got = jax.tree.leaves(f.update(jax.tree.unflatten(treedef, own), *probe))
      if want is None or len(got) != len(want) or not all(map(_equal, got, want)):
        return None
  except (ValueError, TypeError):  # bad settings or data: `fit` names the problem
    return None
  # The one fold over the data, not finalized: each point grafts its own
  # hyperparameters onto the folded accumulator.
  acc = jax.tree.unflatten(inits[0][1], empty)
  folded = jax.tree.leaves(fold.accumulate(f, acc, [(features, labels)],
                                           check=fold.batch_check(f, kernel, bias),
                                           across_processes=False))
  return [f.finalize(jax.tree.unflatten(treedef, _graft(folded, empty, own)))
          for own, treedef in inits]


def fit_grid(method: str, hparams: Sequence[Mapping[str, Any]], train_features,
             train_labels, kernel, bias) -> list:
  """The registry's fitted state at each grid point.

  Points that share the data's statistics (LINe's class-mean contributions,
  DICE's mean, KNN's bank) are folded once and finalized each (`_fold_once`);
  the others are `scorers.get(method).fit` one by one.

  Args:
    method: a registered scorer's name.
    hparams: resolved hyperparameters of each point (`resolve`).
    train_features: `[n, features]`; train_labels: `[n]`; kernel, bias: head.
  """
  scorer = scorers.get(method)
  unknown = sorted({name for h in hparams for name in h} - set(scorer.defaults))
  if unknown:
    raise ValueError(f"unknown hyperparameter(s) {', '.join(unknown)} for scorer "
                     f"{method!r}; valid: {', '.join(scorer.defaults) or 'none'}")
  states = _fold_once(scorer, hparams, train_features, train_labels, kernel, bias)
  if states is None:
    states = [scorer.fit(train_features, train_labels, kernel, bias, **h) for h in hparams]
  return states


def stack(score_fn: Callable, states: Sequence[Any], features: jax.ShapeDtypeStruct
          ) -> tuple[Any, Any] | None:
  """`(stacked, in_axes)` of `states`, or None where they do not stack.

  They stack when their leaves agree in shape and dtype (ViM's D sizes its
  arrays: it does not) and their static fields agree or change nothing in
  what `score_fn` computes on `features` (the same lowered program; LINe's
  states record p_w and p_a, which only describe them). A leaf equal at
  every point (the head, KNN's bank) is kept once and not mapped.

  Returns:
    `stacked`: a state whose varying leaves gain a leading grid axis;
    `in_axes`: the same structure with 0 at those leaves and None at the
    shared ones, for `grid_scores`.
  """
  flat = [jax.tree.flatten(s) for s in states]
  leaves0, treedef0 = flat[0]
  for leaves, _ in flat[1:]:
    if len(leaves) != len(leaves0) or any(
        np.shape(a) != np.shape(b) or jnp.result_type(a) != jnp.result_type(b)
        for a, b in zip(leaves, leaves0)):
      return None
  distinct = {}
  for state, (_, treedef) in zip(states, flat):
    distinct.setdefault(treedef, state)
  if len(distinct) > 1:
    lower = getattr(score_fn, "lower", None) or jax.jit(score_fn).lower
    want = lower(states[0], features).as_text()
    if any(lower(state, features).as_text() != want for state in list(distinct.values())[1:]):
      return None
  columns = list(zip(*(leaves for leaves, _ in flat)))
  if not columns:
    return None
  shared = [all(x is column[0] or _equal(x, column[0]) for x in column[1:])
            for column in columns]
  if all(shared):  # equal states (ViM's D capped alike): map the smallest leaf
    shared[int(np.argmin([np.size(column[0]) for column in columns]))] = False
  stacked = [column[0] if same else jnp.stack(column) for column, same in zip(columns, shared)]
  return (jax.tree.unflatten(treedef0, stacked),
          jax.tree.unflatten(treedef0, [None if same else 0 for same in shared]))


def vmapped_grid(method: str, points: Sequence[Mapping[str, Any]], train_features,
                 train_labels, kernel, bias) -> tuple[Callable, Any, Any] | None:
  """`(score_fn, stacked, in_axes)` of `method`'s grid, or None (loop only).

  `score_fn` is the registry's own `score`, and `grid_scores(score_fn,
  stacked, features, in_axes)` scores every point. Points are resolved
  (`resolve`) and fitted (`fit_grid`) first.
  """
  scorer = scorers.get(method)
  hparams = [h for h, _ in resolve(points, train_features)]
  states = fit_grid(method, hparams, train_features, train_labels, kernel, bias)
  probe = jax.ShapeDtypeStruct((CHUNK, np.shape(train_features)[1]), jnp.float32)
  stacked = stack(scorer.score, states, probe)
  return None if stacked is None else (scorer.score, *stacked)


@functools.partial(jax.jit, static_argnums=(0, 3))
def grid_scores(score_fn: Callable, states: Any, features: jax.Array, in_axes: Any = 0
                ) -> jax.Array:
  """`[grid, n]` scores of every grid point: one compiled computation.

  Args:
    score_fn: a registered scorer's `score(state, [b, features]) -> [b]`.
    states: its states stacked along a leading grid axis (`stack`).
    features: `[n, features]`, scored in chunks of `CHUNK` under `lax.map`.
    in_axes: vmap axes of `states` (hashable: 0, or `stack`'s in_axes).
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


def _score_states(scorer: scorers.Scorer, states: Sequence[Any], val: np.ndarray) -> np.ndarray:
  return np.stack([scorer.score_all(state, val) for state in states])


def loop_grid(method: str, hparams: Sequence[Mapping[str, Any]], train_features,
              train_labels, kernel, bias, val_features: np.ndarray) -> np.ndarray:
  """`[grid, n]` scores by the registry's `fit` / `score`, one point at a time.

  `hparams` are resolved (`resolve`): what `fit` takes.
  """
  scorer = scorers.get(method)
  return _score_states(scorer, [
      scorer.fit(train_features, train_labels, kernel, bias, **h) for h in hparams], val_features)


def tune_method(method: str, train_features, train_labels, kernel, bias,
                val_id: np.ndarray, val_ood: np.ndarray, *,
                grid: Mapping[str, Sequence] | None = None, check: bool = True,
                rtol: float = 1e-4) -> dict[str, Any]:
  """Scores `method`'s grid vmapped (and by a loop); picks the best point.

  Args:
    method: scorer name with a grid in `GRIDS` (or pass `grid`).
    train_features: `[n, features]`; train_labels: `[n]`; kernel, bias: head.
    val_id: `[n_id, features]` ID validation; val_ood: `[n_ood, features]`.
    grid: `{hyperparameter: values}`; defaults to `GRIDS[method]`.
    check: also run the Python loop of fresh registry fits and assert it
      agrees with the vmapped grid.
    rtol: relative tolerance of that check (atol = rtol).

  Returns:
    `{"best": hyperparameters that paste into fit, "best_percentiles":
    {"<name>_percentile": p} for each of them resolved from a percentile,
    "metrics": metrics of the best, "grid_size" (points tried), "skipped"
    (points this model cannot take, `feasible`), "vmapped_s",
    "vmapped_compile_s" (None: not stackable), "loop_s" (None: not run),
    "grid": [{"hparams", "percentiles", "metrics"}, ...]}`.
  """
  scorer = scorers.get(method)
  points, skipped = feasible(method, grid_points(GRIDS[method] if grid is None else grid),
                             kernel, bias)
  if not points:
    raise ValueError(f"no point of {method}'s grid works on this model: {skipped[0]['why']}")
  resolved = resolve(points, train_features)
  hparams = [h for h, _ in resolved]
  val = np.concatenate([val_id, val_ood]).astype(np.float32)
  result: dict[str, Any] = {"grid_size": len(points), "skipped": skipped, "vmapped_s": None,
                            "vmapped_compile_s": None, "loop_s": None}
  states = fit_grid(method, hparams, train_features, train_labels, kernel, bias)
  chunk = jax.ShapeDtypeStruct((min(CHUNK, val.shape[0]), val.shape[1]), jnp.float32)
  stacked = stack(scorer.score, states, chunk)
  scores = None
  if stacked is not None:
    start = time.perf_counter()
    jax.block_until_ready(grid_scores(scorer.score, stacked[0], val, stacked[1]))
    result["vmapped_compile_s"] = time.perf_counter() - start
    start = time.perf_counter()  # Second call: the compiled computation alone.
    scores = np.asarray(jax.block_until_ready(
        grid_scores(scorer.score, stacked[0], val, stacked[1])), np.float64)
    result["vmapped_s"] = time.perf_counter() - start
  if check or scores is None:
    start = time.perf_counter()
    if scores is None and not check:
      looped = _score_states(scorer, states, val)
    else:
      looped = loop_grid(method, hparams, train_features, train_labels, kernel, bias, val)
    result["loop_s"] = time.perf_counter() - start
    if scores is not None:
      np.testing.assert_allclose(scores, looped, rtol=rtol, atol=rtol,
                                 err_msg=f"{method}: vmapped grid != registry fit / score")
    else:
      scores = looped
  n_id = val_id.shape[0]
  rows = [metrics_lib.ood_metrics(s[:n_id], s[n_id:]) for s in scores]
  best = max(range(len(points)), key=lambda i: (rows[i]["auroc"], -rows[i]["fpr95"]))
  result.update(best=hparams[best], best_percentiles=resolved[best][1], metrics=rows[best],
                grid=[{"hparams": h, "percentiles": pc, "metrics": r}
                      for (h, pc), r in zip(resolved, rows)])
  return result


@dataclasses.dataclass(frozen=True)
class Config:
  """What a tuning run computes.

  Attributes:
    scorers: names of scorers with a grid; empty: every one.
    checkpoint: a line_jax checkpoint folder (`models.save_checkpoint`,
      `features.Backbone.save`).
    dataset: 'fashion_mnist', 'tfds:NAME' or a folder (`data.open_source`).
    val_size: training images held out as ID validation, by the subset
      rule (`data.hold_out`); the others are the fitting set.
    ood_size: validation OOD images.
    check: also score every grid by a Python loop of fresh registry fits,
      asserted equal to the vmapped grid.
    batch_size: images per network call.
    skip_bad_images: leave out the training images that cannot be decoded
      (listed in each result's "skipped_images") instead of stopping.
    network: the network instead of `checkpoint` (`runs.Network`: a line_jax
      checkpoint, or a PyTorch state_dict of any architecture the import
      supports); None: `checkpoint`.
  """

  scorers: tuple[str, ...] = ()
  checkpoint: str = models.DEFAULT_CHECKPOINT
  dataset: str = "fashion_mnist"
  val_size: int = 5000
  ood_size: int = 2000
  check: bool = True
  batch_size: int = features.IMAGES_PER_CALL
  skip_bad_images: bool = False
  network: Network | None = None


def run(config: Config = Config(), workdir: str | os.PathLike | None = None, *,
        results_file: str | os.PathLike | None = None,
        runtime: Runtime = Runtime()) -> dict[str, dict]:
  """Tunes each scorer on features of `config.dataset`'s training split.

  `val_size` images of the training split, held out by the subset rule
  (`data.hold_out`), are the ID validation set, the rest the fit set;
  `data.validation_ood` (through the backbone's preprocessing) the OOD one.

  Args:
    config: what to tune.
    workdir: gets `tune.json` and `table.md` (None: nothing); refused where
      it holds other files.
    results_file: gets the results as JSON (None: nothing); refused where
      it is a file tune did not write.
    runtime: decoding threads, the feature cache, progress output.

  Returns:
    `{scorer: tune_method's result}`.
  """
  names = list(config.scorers or GRIDS)
  for name in names:
    if name not in GRIDS:
      raise ValueError(f"no grid for {name!r}; tunable: {', '.join(GRIDS)}")
  check_positive(batch_size=config.batch_size, ood_size=config.ood_size)
  network = network_of(config.checkpoint, config.network)
  if workdir is not None:
    check_out(workdir, OWN_FILES, marks={"tune.json": is_results})
  if results_file is not None:
    check_results_file(results_file)
  check_cache(runtime)
  backbone = network.backbone()
  kernel, bias = backbone.head_params()
  with contextlib.ExitStack() as stack:
    folder = runtime.cache_dir or stack.enter_context(tempfile.TemporaryDirectory())
    train_source = open_dataset(config.dataset, "train", backbone.num_classes,
                                checkpoint=network.checkpoint)
    if not 0 < config.val_size < len(train_source):
      raise ValueError(f"--val-size must lie in [1, {len(train_source)}), "
                       f"got {config.val_size}")

    def features_of(source, name):
      return backbone.read(source, cache_dir=folder, batch_size=config.batch_size,
                           workers=runtime.workers, description=f"{name}: {source!r}",
                           progress=f"features: {name}" if runtime.progress else False,
                           skip_bad_images=config.skip_bad_images)

    # Features of the whole split (the cache entry fit and evaluate share), split here.
    train = features_of(train_source, "train")
    val_ood = np.asarray(features_of(
        data.ArraySource(data.validation_ood(config.ood_size)), "validation OOD").features)
    feats, labels = np.asarray(train.features), np.asarray(train.labels)
  # Feature row i is the i-th image kept: the hold-out is taken over those.
  kept = np.delete(np.arange(len(train_source)), [s.index for s in train.skipped])
  held, rest = data.hold_out(data.Subset(train_source, kept), config.val_size)
  out = {}
  fit_x, fit_y, val_id = feats[rest.indices], labels[rest.indices], feats[held.indices]
  skipped = skipped_records(train_source, train.skipped)
  report_skipped({"train": skipped})
  for name in names:
    out[name] = tune_method(name, fit_x, fit_y, kernel, bias, val_id, val_ood,
                            check=config.check)
    if config.skip_bad_images:
      out[name]["skipped_images"] = skipped
    if runtime.progress:
      print(f"tuned {_row(name, out[name])}", file=sys.stderr, flush=True)
  if workdir is not None:
    os.makedirs(workdir, exist_ok=True)
    write_results(out, os.path.join(workdir, "tune.json"))
    write_text(os.path.join(workdir, "table.md"), format_table(out))
  if results_file is not None:
    write_results(out, results_file, unique=True)
  return out


def is_results(value: Any) -> bool:
  """Whether a JSON value is what `write_results` writes: `{scorer: {"best", "grid", ...}}`."""
  return isinstance(value, dict) and bool(value) and all(
      isinstance(r, dict) and {"best", "grid"} <= set(r) for r in value.values())


def check_results_file(path: str | os.PathLike) -> None:
  """Refuses a results path that holds anything but tune's own results."""
  path = os.fspath(path)
  if not os.path.lexists(path):
    return
  try:
    with open(path) as f:
      ours = is_results(json.load(f))
  except (OSError, ValueError):  # A folder, unreadable, not JSON.
    ours = False
  if not ours:
    raise ValueError(f"--out {path} exists and is not a results file tune wrote; it "
                     "replaces only its own: choose another path or move it away")


def write_results(results: Mapping[str, Mapping[str, Any]], path: str | os.PathLike, *,
                  unique: bool = False) -> None:
  """`run`'s results as JSON (atomically; `unique`: a fresh temporary name,
  for a folder of the user's)."""
  write_json(path, results, sort_keys=False, unique=unique)


def _row(method: str, r: Mapping[str, Any]) -> str:
  def secs(x):
    return "-" if x is None else f"{x:.2f}"
  best = ", ".join(f"{k}={v!r}" for k, v in r["best"].items())
  if r.get("best_percentiles"):
    best += " (" + ", ".join(f"{k}={v!r}" for k, v in r["best_percentiles"].items()) + ")"
  return (f"| {method} | {best} | {100 * r['metrics']['fpr95']:.2f} | "
          f"{100 * r['metrics']['auroc']:.2f} | {r['grid_size']} | {secs(r['vmapped_s'])} | "
          f"{secs(r['vmapped_compile_s'])} | {secs(r['loop_s'])} |")


def format_table(results: Mapping[str, Mapping[str, Any]]) -> str:
  """Markdown: best point, its validation FPR95 / AUROC (%), and the times;
  then the best points as `python -m line_jax.fit` / `evaluate` flags."""
  lines = ["| method | best | val FPR95 | val AUROC | grid | vmapped s | "
           "first call s (compile) | loop s |", "|---|---|---|---|---|---|---|---|"]
  lines += [_row(m, r) for m, r in results.items()]
  lines += ["", "As flags of python -m line_jax.fit and evaluate:", "",
            " ".join(hparam_flags(m, r["best"]) for m, r in results.items())]
  return "\n".join(lines) + "\n"


def hparam_flags(method: str, hparams: Mapping[str, Any]) -> str:
  """`--hparam METHOD.NAME=VALUE` for each hyperparameter (JSON values)."""
  return " ".join(f"--hparam {method}.{name}={json.dumps(value)}"
                  for name, value in hparams.items())
