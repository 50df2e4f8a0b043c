"""Saving and loading fitted detectors: `line_jax.save` / `line_jax.load`.

    line_jax.save("fits/line", state)           # any registered scorer's state
    state = line_jax.load("fits/line")          # no target needed
    scores = line_jax.scorers.get("line").score(state, features)

A saved state is a folder: `state/` holds the array leaves (orbax
`StandardCheckpointer`, no pickle) and `state.json` its structure: the
format version, the registered name of the scorer that made it, the class
of every `flax.struct.dataclass` node (by name, among the scorers' state
classes, never imported from a path the file gives) and its static fields
(hyperparameters such as KNN's `k`). So a load rebuilds the exact class,
keeps the hyperparameters, and scores identically, wherever line_jax keeps
its modules. Array leaves keep their dtype (float64 ones included).

`state.json` also holds the SHA-256 of every file under `state/` and a
digest of its own structure and hyperparameters, which `load` checks before
reading an array: flipped or truncated bytes are an error naming the file,
never a state that scores garbage.

States written before the scorer's name was recorded (`line_jax.state/1`,
classes named by module path) still load: their paths are read from a fixed
table, never imported.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from line_jax import distributed
from line_jax import scorers

FORMAT = "line_jax.state/2"
FORMAT_V1 = "line_jax.state/1"
_META = "state.json"
_ARRAYS = "state"
# The folder a save writes before it is renamed into place, and its mark.
_TMP_SUFFIX = ".line_jax-saving"
_TMP_MARK = ".written-by-line_jax-save"


def _state_classes() -> dict[str, type]:
  """Every class a saved state may hold, by name: the scorers' state types
  and the line_jax dataclasses they derive from."""
  classes = {}
  for name in scorers.names():
    for cls in scorers.get(name).state_type.__mro__:
      if dataclasses.is_dataclass(cls) and cls.__module__.startswith("line_jax."):
        classes[cls.__name__] = cls
  return classes


# Format 1 named classes by module path; these are the paths it wrote.
_V1_PATHS = {
    "line_jax.line._fit:LineState": "LineState",
    **{f"line_jax.scorers._{module}:{cls}": cls for module, cls in (
        ("common", "HeadState"), ("shaping", "ShapingState"), ("dice", "DiceState"),
        ("fdbd", "FdbdState"), ("gen", "GenState"), ("klm", "KlmState"),
        ("knn", "KnnState"), ("mahalanobis", "MahalanobisState"), ("nci", "NciState"),
        ("nnguide", "NnguideState"), ("react", "ReactState"),
        ("react_dice", "ReactDiceState"), ("rmds", "RmdsState"), ("she", "SheState"),
        ("vim", "VimState"))},
}


def _checksums(folder: str) -> dict[str, str]:
  """`{path relative to folder: SHA-256}` of every file under `folder`."""
  sums = {}
  for root, _, files in os.walk(folder):
    for name in files:
      path = os.path.join(root, name)
      digest = hashlib.sha256()
      with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
          digest.update(block)
      sums[os.path.relpath(path, folder).replace(os.sep, "/")] = digest.hexdigest()
  return sums


def _digest(meta: dict) -> str:
  """SHA-256 of the structure, scorer and hyperparameters `state.json` holds."""
  described = {key: meta.get(key) for key in ("format", "scorer", "state")}
  return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


def _verify(arrays: str, expected: dict[str, str]) -> None:
  """Raises ValueError naming each file of `arrays` that differs from `expected`."""
  found = _checksums(arrays)
  changed = sorted(p for p in expected.keys() & found.keys() if expected[p] != found[p])
  missing, extra = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
  problems = ([f"{p} changed (checksum mismatch)" for p in changed]
              + [f"{p} missing" for p in missing] + [f"{p} not written by save" for p in extra])
  if problems:
    raise ValueError(f"{arrays}: corrupt or truncated state: " + "; ".join(problems))


def _describe(node: Any, leaves: dict, classes: dict[str, type]) -> dict:
  """The JSON structure of a dataclass node; its array leaves go to `leaves`."""
  if not dataclasses.is_dataclass(node):
    raise TypeError(f"cannot save a {type(node).__name__}: line_jax.save takes a "
                    "fitted scorer state (a flax.struct.dataclass)")
  cls = type(node)
  if classes.get(cls.__name__) is not cls:
    raise TypeError(f"cannot save {cls.__module__}.{cls.__qualname__}: only line_jax "
                    "scorers' states are loadable by class name")
  fields, static = {}, {}
  for field in dataclasses.fields(node):
    value = getattr(node, field.name)
    if not field.metadata.get("pytree_node", True):
      static[field.name] = value
    elif dataclasses.is_dataclass(value):
      sub: dict = {}
      fields[field.name] = _describe(value, sub, classes)
      leaves[field.name] = sub
    elif value is None:
      fields[field.name] = None
    else:
      leaves[field.name] = np.asarray(value)
      fields[field.name] = "array"
  return {"class": cls.__name__, "static": static, "fields": fields}


def _class(spec: dict, path: str, classes: dict[str, type], v1: bool) -> type:
  """The class a spec names, looked up (never imported) among `classes`."""
  name = spec.get("class")
  if v1:
    if not str(name).startswith("line_jax."):
      raise ValueError(f"{path}: refuses to build {name!r}, not a line_jax class")
    name = _V1_PATHS.get(name, name)
  cls = classes.get(name)
  if cls is None:
    raise ValueError(f"{path}: unknown state class {spec.get('class')!r}")
  for sub in spec["fields"].values():
    if isinstance(sub, dict):
      _class(sub, path, classes, v1)
  return cls


def _build(spec: dict, leaves: dict, path: str, classes: dict[str, type], v1: bool) -> Any:
  cls = _class(spec, path, classes, v1)
  values = {}
  for field, kind in spec["fields"].items():
    if kind is None:
      values[field] = None
    elif kind == "array":
      values[field] = leaves[field]
    else:
      values[field] = _build(kind, leaves[field], path, classes, v1)
  return cls(**values, **spec["static"])


def save(path: str | os.PathLike, state: Any) -> None:
  """Writes a fitted state to the folder `path` (replacing a state saved there).

  Args:
    path: the folder to write; where it exists it must hold a saved state
      (any other folder, or a file, is left alone and refused).
    state: the state of any registered scorer (or `line.LineState`).

  Raises:
    TypeError: for anything but a line_jax state, or static fields that are
      not JSON values.
    ValueError: where `path` exists and is not a saved state.
  """
  path = os.path.abspath(os.fspath(path))
  if os.path.lexists(path):
    if not os.path.isfile(os.path.join(path, _META)):
      raise ValueError(f"{path} exists and is not a saved line_jax state: line_jax.save "
                       "replaces only a state it wrote; choose a new folder")
    foreign = sorted(set(os.listdir(path)) - {_META, _ARRAYS})
    if foreign:
      raise ValueError(f"{path} holds {', '.join(foreign)}, which line_jax.save did not "
                       "write; it replaces only a state folder holding nothing else")
  leaves: dict = {}
  try:
    scorer = scorers.name_of(state)
  except TypeError:
    scorer = None  # A base class (a format-1 HeadState): any scorer of that class.
  meta = {"format": FORMAT, "scorer": scorer,
          "state": _describe(state, leaves, _state_classes())}
  try:
    json.dumps(meta)  # Checked before any file is written.
  except TypeError as e:
    raise TypeError(f"a static field of {type(state).__name__} is not a JSON value: {e}") from e
  tmp = path + _TMP_SUFFIX
  # On multi-host every process calls `save` with the same state; process 0
  # alone touches the files, orbax's save is collective.
  primary = distributed.is_primary()
  # An interrupted save's leftovers are replaced, and only those; process 0
  # decides and every process raises alike (none waits at a barrier alone).
  foreign = primary and os.path.lexists(tmp) and not _own_leftover(tmp)
  if not distributed.everyone(not foreign):
    raise ValueError(f"{tmp} exists and was not written by line_jax.save; "
                     f"move it away to save to {path}")
  if primary:
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    open(os.path.join(tmp, _TMP_MARK), "w").close()
  distributed.barrier("line_jax.save:" + path)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(tmp, _ARRAYS), leaves)
  checkpointer.wait_until_finished()
  checkpointer.close()
  if primary:
    meta["checksums"] = _checksums(os.path.join(tmp, _ARRAYS))
    meta["digest"] = _digest(meta)
    with open(os.path.join(tmp, _META), "w") as f:
      f.write(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    os.remove(os.path.join(tmp, _TMP_MARK))
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)  # A reader sees no folder or a whole one.
  distributed.barrier("line_jax.saved:" + path)


def _own_leftover(tmp: str) -> bool:
  """Whether an interrupted save left `tmp`, killed at any point: it holds its
  mark, or nothing (killed before the mark), or only what a save writes
  there (killed between removing the mark and the rename). Anything else
  there may be a user's and is never removed."""
  if not os.path.isdir(tmp) or os.path.islink(tmp):
    return False
  names = set(os.listdir(tmp))
  return _TMP_MARK in names or names <= {_ARRAYS, _META}


def load(path: str | os.PathLike) -> Any:
  """The state `save` wrote to `path`, of its own class, ready to score.

  Raises:
    ValueError: naming the problem when `path` is missing, a file, not a
      saved state (a foreign folder), or corrupt or truncated (a file whose
      checksum differs from the one `save` recorded is named).
  """
  path = os.path.abspath(os.fspath(path))
  meta_path, arrays = os.path.join(path, _META), os.path.join(path, _ARRAYS)
  if not os.path.lexists(path):
    raise ValueError(f"{path} does not exist")
  if not os.path.isdir(path):
    raise ValueError(f"{path} is a file, not a saved line_jax state: a state is the "
                     f"folder line_jax.save wrote (holding {_META} and {_ARRAYS}/)")
  if not os.path.isfile(meta_path):
    raise ValueError(f"{path} is not a saved line_jax state (no {_META}); "
                     "states are written by line_jax.save")
  try:
    with open(meta_path) as f:
      meta = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"{meta_path}: corrupt: {e}") from e
  if not isinstance(meta, dict) or meta.get("format") not in (FORMAT, FORMAT_V1):
    raise ValueError(f"{meta_path}: not a {FORMAT} file (nor a {FORMAT_V1} one)")
  v1, classes = meta["format"] == FORMAT_V1, _state_classes()
  cls = _class(meta["state"], path, classes, v1)  # Refused before any array is read.
  if meta.get("scorer") is not None:
    if scorers.get(meta["scorer"]).state_type is not cls:
      raise ValueError(f"{meta_path}: its {cls.__name__} is not a state of scorer "
                       f"{meta['scorer']!r}")
  if "checksums" in meta:  # States saved before checksums were recorded load unchecked.
    if not isinstance(meta["checksums"], dict) or meta.get("digest") != _digest(meta):
      raise ValueError(f"{meta_path}: corrupt: its structure or hyperparameters differ "
                       "from those save recorded (digest mismatch)")
    _verify(arrays, meta["checksums"])
  checkpointer = ocp.StandardCheckpointer()
  try:
    saved = checkpointer.metadata(arrays).item_metadata
    target = jax.tree.map(lambda v: jax.ShapeDtypeStruct(tuple(v.shape), v.dtype), saved)
    with jax.enable_x64(True):  # float64 / int64 leaves restore as such.
      leaves = checkpointer.restore(arrays, target)
  except Exception as e:  # orbax/tensorstore raise many types on bad files.
    raise ValueError(f"{arrays}: corrupt or truncated state: {type(e).__name__}: {e}") from e
  finally:
    checkpointer.close()
  return _build(meta["state"], leaves or {}, path, classes, v1)
