"""Resumable fit of every scorer on a training set: `python -m line_jax.fit`.

    python -m line_jax.fit --out fits/fmnist            # all scorers, defaults
    python -m line_jax.fit --out DIR --scorers line,energy --batch-size 512

streams the training set (default: Fashion-MNIST's 60,000 training images
from Debian's files) through a trained checkpoint (default: the committed
`checkpoints/fashion_mnist_resnet_small`), jitted, batch by batch (sharded over
every local device when `--batch-size` divides evenly over them), and writes
each fitted scorer state to `DIR/<scorer>` (orbax) with `DIR/<scorer>.json`
(its class, static fields and hyperparameters); `load_state(DIR, name)`
restores it.

What is accumulated per batch:

* `line`: the float64 contribution sums (`line.init_sums/update_sums`);
* `mahalanobis`: the float64 class means and pooled scatter (Chan merge);
* `msp`, `maxlogit`, `energy`, `gradnorm`, `ash_*`, `scale`: nothing (they
  keep the head);
* `react`, `dice`, `knn`, `vim` (ReAct and ViM read the data twice, KNN keeps
  rows, DICE takes exact percentiles): the features, written to the
  memory-mapped `DIR/features.npy`, `[n, features]` float32; at the end their
  `fit_from_batches` reads it back in the same batches. Exact and simple; the
  file costs 4 bytes per feature and sample.

Resuming: every `--save-every` batches the running statistics and the batch
index go to an orbax `CheckpointManager` in `DIR/progress` (atomic: a step is
visible only once fully written), after the feature rows before it are
flushed. Killed at any moment (even SIGKILL) and started again with the same
arguments, the run restarts from the last saved batch; batches after it are
recomputed, identically, so the states are bit-identical to an uninterrupted
run. The arguments are kept in `DIR/args.json`; other arguments on a resume
are refused.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import tqdm

from line_jax import _checkpoint
from line_jax import features as features_lib
from line_jax import line
from line_jax import scorers
from line_jax import sharding
from line_jax.scorers import _mahalanobis

DEFAULT_CHECKPOINT = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    "checkpoints", "fashion_mnist_resnet_small")
ARGS_FILE = "args.json"
FEATURES_FILE = "features.npy"
PROGRESS_DIR = "progress"
# Scorers whose fit reads no training data, only the head (and, for ASH and
# SCALE, a per-sample percentile that is a hyperparameter).
_HEAD_ONLY = frozenset({"msp", "maxlogit", "energy", "gradnorm", "ash_p", "ash_b",
                        "ash_s", "scale"})
# Scorers with a streaming state kept in the progress checkpoint.
_STREAMED = frozenset({"line", "mahalanobis"})
# Every fitted-state class, by name: `load_state` builds only these.
_STATE_TYPES = {
    cls.__name__: cls for cls in (
        line.LineState, scorers.HeadState, scorers.DiceState, scorers.KnnState,
        scorers.MahalanobisState, scorers.ReactState, scorers.ShapingState,
        scorers.VimState)
}


def load_dataset(name: str) -> tuple[np.ndarray, np.ndarray]:
  """Training images and labels, uint8 `[N, H, W(, C)]` and integer `[N]`.

  Args:
    name: "fashion_mnist" (Debian's IDX files) or a folder holding
      `images.npy` and `labels.npy` (read without pickle).
  """
  if name == "fashion_mnist":
    from line_jax.data import read_fashion_mnist  # pylint: disable=g-import-not-at-top
    return read_fashion_mnist("train")
  if not os.path.isdir(name):
    raise ValueError(
        f"--dataset {name!r} is neither 'fashion_mnist' nor a folder holding "
        "images.npy and labels.npy")
  arrays = []
  for file in ("images.npy", "labels.npy"):
    path = os.path.join(name, file)
    if not os.path.isfile(path):
      raise ValueError(f"{path} not found: --dataset needs images.npy and labels.npy")
    try:
      arrays.append(np.load(path, allow_pickle=False, mmap_mode="r"))
    except ValueError as e:
      raise ValueError(f"{path} is not a plain .npy array readable without "
                       f"pickle: {e}") from e
  return arrays[0], arrays[1]


def check_images(images, labels, input_shape: Sequence[int], num_classes: int):
  """Checks the training set against the model; returns NHWC images.

  Raises:
    ValueError: naming the problem: not uint8, a shape other than the
      model's input, labels of another count, not integers, out of range.
  """
  h, w, c = input_shape
  expected = f"[N, {h}, {w}, {c}]" + (f" or [N, {h}, {w}]" if c == 1 else "")
  if images.dtype != np.uint8:
    raise ValueError(f"images have dtype {images.dtype}; the model needs uint8 "
                     f"pixels in [0, 255], {expected}")
  shape = tuple(images.shape)
  if c == 1 and images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4 or tuple(images.shape[1:]) != (h, w, c):
    raise ValueError(f"images have shape {shape}; the model needs {expected}")
  if labels.shape != images.shape[:1]:
    raise ValueError(f"labels have shape {tuple(labels.shape)} but there are "
                     f"{images.shape[0]} images")
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f"labels must lie in [0, {num_classes}), got "
                     f"[{labels.min()}, {labels.max()}]")
  return images


def _parse_hparams(specs: Sequence[str], names: Sequence[str]) -> dict[str, dict]:
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


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True, help="output folder (resumed if present)")
  parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
  parser.add_argument("--dataset", default="fashion_mnist",
                      help="'fashion_mnist' or a folder with images.npy, labels.npy")
  parser.add_argument("--scorers", default=",".join(scorers.names()),
                      help="comma-separated scorer names (default: all)")
  parser.add_argument("--hparam", action="append", default=[],
                      help="SCORER.NAME=VALUE (JSON value), repeatable")
  parser.add_argument("--batch-size", type=int, default=256)
  parser.add_argument("--save-every", type=int, default=20,
                      help="save progress every N batches")
  parser.add_argument("--max-examples", type=int, default=None,
                      help="use only the first N training examples")
  return parser


def _resolve(args: argparse.Namespace) -> dict[str, Any]:
  """The arguments as stored in args.json (paths absolute, names checked)."""
  names = [n.strip() for n in args.scorers.split(",") if n.strip()]
  for name in names:
    scorers.get(name)  # Unknown names fail here, listing the valid ones.
  if not names or len(set(names)) != len(names):
    raise ValueError(f"--scorers must list distinct scorers, got {args.scorers!r}")
  for flag, value in (("--batch-size", args.batch_size), ("--save-every", args.save_every),
                      ("--max-examples", args.max_examples)):
    if value is not None and value < 1:
      raise ValueError(f"{flag} must be at least 1, got {value}")
  dataset = args.dataset if args.dataset == "fashion_mnist" else os.path.abspath(args.dataset)
  return dict(checkpoint=os.path.abspath(args.checkpoint), dataset=dataset,
              scorers=names, hparams=_parse_hparams(args.hparam, names),
              batch_size=args.batch_size, save_every=args.save_every,
              max_examples=args.max_examples)


def _claim(out: str, config: dict[str, Any]) -> None:
  """Writes args.json, or checks that a resumed run has the same arguments."""
  path = os.path.join(out, ARGS_FILE)
  if os.path.exists(path):
    with open(path) as f:
      stored = json.load(f)
    if stored != config:
      diff = [f"{k}: {stored.get(k)!r} -> {config.get(k)!r}"
              for k in sorted(set(stored) | set(config)) if stored.get(k) != config.get(k)]
      raise ValueError(
          f"{out} holds a run started with other arguments ({'; '.join(diff)}); "
          "run again with the same arguments to resume, or choose another --out")
    return
  os.makedirs(out, exist_ok=True)
  _write_json(path, config)


def _write_json(path: str, value: Any) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(value, f, indent=2, sort_keys=True)
    f.write("\n")
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)  # Atomic: a reader sees the old file or the whole new one.


def _features_memmap(out: str, shape: tuple[int, int], fresh: bool) -> np.memmap:
  path = os.path.join(out, FEATURES_FILE)
  if fresh or not os.path.isfile(path):
    tmp = path + ".tmp"
    np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape).flush()
    os.replace(tmp, path)
  array = np.lib.format.open_memmap(path, mode="r+")
  if array.shape != shape or array.dtype != np.float32:
    raise ValueError(f"{path} has {array.dtype} {array.shape}, expected float32 {shape}")
  return array


def _initial_stats(names: Sequence[str], num_classes: int, num_features: int) -> dict:
  stats: dict[str, Any] = {}
  if "line" in names:
    acc = line.init_sums(num_classes, num_features)
    stats["line"] = {"sums": acc.sums, "counts": acc.counts}
  if "mahalanobis" in names:
    acc = _mahalanobis.init_moments(num_classes, num_features)
    stats["mahalanobis"] = {"counts": acc.counts, "means": acc.means, "scatter": acc.scatter}
  return jax.tree.map(np.asarray, stats)


def _update_stats(stats: dict, features: jax.Array, labels: np.ndarray, kernel) -> dict:
  if "line" in stats:
    acc = line.update_sums(line.ContributionSums(**stats["line"]), features, labels, kernel)
    stats["line"] = {"sums": acc.sums, "counts": acc.counts}
  if "mahalanobis" in stats:
    acc = _mahalanobis.update_moments(_mahalanobis.ClassMoments(**stats["mahalanobis"]),
                                      features, labels)
    stats["mahalanobis"] = {"counts": acc.counts, "means": acc.means, "scatter": acc.scatter}
  return stats


def _mesh_for(batch_size: int):
  """All local devices when the batch splits evenly over them, else None."""
  count = jax.device_count()
  return sharding.batch_mesh() if count > 1 and batch_size % count == 0 else None


class _MemmapBatches:
  """Re-iterable `(features, labels)` batches read back from features.npy."""

  def __init__(self, features: np.ndarray, labels: np.ndarray, batch_size: int):
    self._features, self._labels, self._batch_size = features, labels, batch_size

  def __iter__(self):
    for start in range(0, self._labels.shape[0], self._batch_size):
      stop = start + self._batch_size
      yield np.asarray(self._features[start:stop]), self._labels[start:stop]


def run(config: dict[str, Any], out: str) -> dict[str, Any]:
  """Streams, checkpoints, resumes and fits; see the module docstring.

  Args:
    config: resolved arguments (`_resolve`).
    out: output folder.

  Returns:
    `{scorer name: fitted state}`.
  """
  out = os.path.abspath(out)
  model, variables, model_config = _checkpoint.load_model(config["checkpoint"])
  if "mean" not in model_config or "std" not in model_config:
    raise ValueError(f"{config['checkpoint']}/config.json has no 'mean' and 'std': "
                     "the normalisation the model was trained with is unknown")
  mean, std = model_config["mean"], model_config["std"]
  images, labels = load_dataset(config["dataset"])
  if config["max_examples"] is not None:
    images, labels = images[: config["max_examples"]], labels[: config["max_examples"]]
  num_classes = int(model_config["num_classes"])
  images = check_images(images, labels, model_config["input_shape"], num_classes)
  labels = np.asarray(labels, np.int32)
  if images.shape[0] == 0:
    raise ValueError("the training set holds no image")
  _claim(out, config)

  names, batch_size = config["scorers"], config["batch_size"]
  kernel = variables["params"]["fc"]["kernel"]
  bias = variables["params"]["fc"]["bias"]
  num_features = kernel.shape[0]
  num_batches = -(-images.shape[0] // batch_size)

  manager = ocp.CheckpointManager(
      os.path.join(out, PROGRESS_DIR),
      options=ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False))
  stats = _initial_stats(names, num_classes, num_features)
  start = manager.latest_step() or 0
  if start:
    with jax.enable_x64(True):  # The float64 / int64 sums restore as such.
      restored = manager.restore(start, args=ocp.args.StandardRestore(
          {"batch": np.zeros((), np.int64), "stats": stats}))
    stats = jax.tree.map(np.asarray, restored["stats"])
    if int(restored["batch"]) != start:
      raise ValueError(f"{out}/{PROGRESS_DIR} step {start} holds batch {restored['batch']}")
  needs_features = any(n not in _HEAD_ONLY | _STREAMED for n in names)
  bank = (_features_memmap(out, (images.shape[0], num_features), fresh=start == 0)
          if needs_features else None)

  bar = tqdm.tqdm(total=images.shape[0], initial=min(start * batch_size, images.shape[0]),
                  unit="img", desc="features", file=sys.stderr, dynamic_ncols=True)
  # Batches of `batch_size` from the resume point, data parallel over the
  # local devices (features.extract pads the last batch: one compilation).
  extracted = features_lib.iter_extract(
      model, variables, images[start * batch_size:], mean=mean, std=std,
      batch_size=batch_size, mesh=_mesh_for(batch_size), progress=False)
  for b, (_, features) in zip(range(start, num_batches), extracted):
    lo, hi = b * batch_size, min((b + 1) * batch_size, images.shape[0])
    stats = _update_stats(stats, features, labels[lo:hi], kernel)
    if bank is not None:
      bank[lo:hi] = np.asarray(features)
    bar.update(hi - lo)
    if (b + 1) % config["save_every"] == 0 or b + 1 == num_batches:
      if bank is not None:
        bank.flush()  # The rows a saved step vouches for are on disk first.
      manager.save(b + 1, args=ocp.args.StandardSave(
          {"batch": np.asarray(b + 1, np.int64), "stats": jax.tree.map(np.asarray, stats)}))
  bar.close()
  manager.wait_until_finished()
  manager.close()

  states = {}
  for name in names:
    hparams = config["hparams"].get(name, {})
    states[name] = _fit_one(name, hparams, stats, bank, labels, kernel, bias, batch_size)
    save_state(out, name, states[name], hparams)
  return states


def _fit_one(name, hparams, stats, bank, labels, kernel, bias, batch_size):
  scorer = scorers.get(name)
  if name == "line":
    with jax.enable_x64(True):
      contrib = line.finalize_sums(line.ContributionSums(
          **jax.tree.map(jnp.asarray, stats["line"])))
    full = {**scorer.defaults, **hparams}
    return line.fit_from_contributions(contrib, kernel, bias, **full)
  if name == "mahalanobis":
    with jax.enable_x64(True):
      acc = _mahalanobis.ClassMoments(**jax.tree.map(jnp.asarray, stats["mahalanobis"]))
    return _mahalanobis.from_moments(acc)
  if name in _HEAD_ONLY:
    return scorer.fit_from_batches([], kernel, bias, **hparams)
  return scorer.fit_from_batches(_MemmapBatches(bank, labels, batch_size), kernel, bias,
                                 **hparams)


def save_state(out: str, name: str, state: Any, hparams: dict | None = None) -> None:
  """Writes `state` to `out/<name>` (orbax) and `out/<name>.json` (static fields).

  Args:
    out: output folder.
    name: scorer name; the file names.
    state: a `flax.struct.dataclass` scorer state.
    hparams: recorded in the JSON for people.
  """
  leaves, static = {}, {}
  for field in dataclasses.fields(state):
    value = getattr(state, field.name)
    if field.metadata.get("pytree_node", True):
      leaves[field.name] = np.asarray(value)
    else:
      static[field.name] = value
  out = os.path.abspath(out)
  _write_json(os.path.join(out, name + ".json"), {
      "scorer": name, "state": type(state).__name__, "static": static,
      "hparams": hparams or {}})
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(out, name), leaves, force=True)
  checkpointer.wait_until_finished()
  checkpointer.close()


def load_state(out: str | os.PathLike, name: str) -> Any:
  """Restores the state `python -m line_jax.fit --out OUT` wrote for `name`.

  Args:
    out: the `--out` folder.
    name: a scorer name, e.g. "line".

  Returns:
    The fitted state (e.g. `line.LineState`), ready for the scorer's `score`.

  Raises:
    ValueError: if the state is missing, unfinished, corrupt or of an
      unknown class.
  """
  out = os.path.abspath(os.fspath(out))
  meta_path, path = os.path.join(out, name + ".json"), os.path.join(out, name)
  if not os.path.isfile(meta_path) or not os.path.isdir(path):
    raise ValueError(f"{out} holds no fitted state {name!r} (run python -m "
                     "line_jax.fit to the end first)")
  with open(meta_path) as f:
    meta = json.load(f)
  cls = _STATE_TYPES.get(meta.get("state"))
  if cls is None:
    raise ValueError(f"{meta_path}: unknown state class {meta.get('state')!r}")
  checkpointer = ocp.StandardCheckpointer()
  try:
    saved = checkpointer.metadata(path).item_metadata
    target = {k: jax.ShapeDtypeStruct(tuple(v.shape), v.dtype) for k, v in saved.items()}
    with jax.enable_x64(True):  # Keep any float64 leaf float64.
      leaves = checkpointer.restore(path, target)
  except Exception as e:  # orbax/tensorstore raise many types on bad files.
    raise ValueError(f"{path}: corrupt or truncated state: {type(e).__name__}: {e}") from e
  finally:
    checkpointer.close()
  return cls(**leaves, **meta["static"])


def main(argv: Sequence[str] | None = None) -> None:
  args = _parser().parse_args(argv)
  try:
    config = _resolve(args)
    run(config, args.out)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(2) from e
  print(f"wrote {', '.join(config['scorers'])} to {os.path.abspath(args.out)}")


if __name__ == "__main__":
  main()
