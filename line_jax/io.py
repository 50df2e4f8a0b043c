"""Saving and loading fitted detectors: `line_jax.save` / `line_jax.load`.

    line_jax.save("fits/line", state)           # any registered scorer's state
    state = line_jax.load("fits/line")          # no target needed
    scores = line_jax.scorers.get("line").score(state, features)

A saved state is a folder: `state/` holds the array leaves (orbax
`StandardCheckpointer`, no pickle) and `state.json` its structure, the class
of every `flax.struct.dataclass` node (by module and name, only from
`line_jax`) and its static fields (hyperparameters such as KNN's `k`). So a
load rebuilds the exact class, keeps the hyperparameters, and scores
identically. Array leaves keep their dtype (float64 ones included).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

FORMAT = "line_jax.state/1"
_META = "state.json"
_ARRAYS = "state"


def _describe(node: Any, leaves: dict) -> dict:
  """The JSON structure of a dataclass node; its array leaves go to `leaves`."""
  if not dataclasses.is_dataclass(node):
    raise TypeError(f"cannot save a {type(node).__name__}: line_jax.save takes a "
                    "fitted scorer state (a flax.struct.dataclass)")
  cls = type(node)
  if not cls.__module__.startswith("line_jax."):
    raise TypeError(f"cannot save {cls.__module__}.{cls.__qualname__}: only line_jax "
                    "states are loadable by class name")
  fields, static = {}, {}
  for field in dataclasses.fields(node):
    value = getattr(node, field.name)
    if not field.metadata.get("pytree_node", True):
      static[field.name] = value
    elif dataclasses.is_dataclass(value):
      sub: dict = {}
      fields[field.name] = _describe(value, sub)
      leaves[field.name] = sub
    elif value is None:
      fields[field.name] = None
    else:
      leaves[field.name] = np.asarray(value)
      fields[field.name] = "array"
  return {"class": f"{cls.__module__}:{cls.__qualname__}", "static": static,
          "fields": fields}


def _class(spec: dict, path: str) -> type:
  """The class a spec names, after checking it is a line_jax dataclass."""
  module, _, name = str(spec.get("class")).partition(":")
  if not module.startswith("line_jax."):
    raise ValueError(f"{path}: refuses to build {spec.get('class')!r}, not a line_jax class")
  try:
    cls = getattr(importlib.import_module(module), name)
  except (ImportError, AttributeError) as e:
    raise ValueError(f"{path}: unknown state class {spec['class']!r}") from e
  if not dataclasses.is_dataclass(cls):
    raise ValueError(f"{path}: {spec['class']!r} is not a state class")
  for sub in spec["fields"].values():
    if isinstance(sub, dict):
      _class(sub, path)
  return cls


def _build(spec: dict, leaves: dict, path: str) -> Any:
  cls = _class(spec, path)
  values = {}
  for field, kind in spec["fields"].items():
    if kind is None:
      values[field] = None
    elif kind == "array":
      values[field] = leaves[field]
    else:
      values[field] = _build(kind, leaves[field], path)
  return cls(**values, **spec["static"])


def save(path: str | os.PathLike, state: Any) -> None:
  """Writes a fitted state to the folder `path` (replaced if it exists).

  Args:
    path: the folder to write.
    state: the state of any registered scorer (or `line.LineState`).

  Raises:
    TypeError: for anything but a line_jax state, or static fields that are
      not JSON values.
  """
  path = os.path.abspath(os.fspath(path))
  leaves: dict = {}
  meta = {"format": FORMAT, "state": _describe(state, leaves)}
  try:
    text = json.dumps(meta, indent=2, sort_keys=True)
  except TypeError as e:
    raise TypeError(f"a static field of {type(state).__name__} is not a JSON value: {e}") from e
  tmp = path + ".tmp"
  # On multi-host every process calls `save` with the same state; process 0
  # alone touches the files, orbax's save is collective.
  primary = jax.process_index() == 0
  if primary:
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
  _sync("line_jax.save:" + path)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(tmp, _ARRAYS), leaves)
  checkpointer.wait_until_finished()
  checkpointer.close()
  if primary:
    with open(os.path.join(tmp, _META), "w") as f:
      f.write(text + "\n")
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)  # A reader sees no folder or a whole one.
  _sync("line_jax.saved:" + path)


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def load(path: str | os.PathLike) -> Any:
  """The state `save` wrote to `path`, of its own class, ready to score.

  Raises:
    ValueError: naming the problem when `path` is missing, is not a saved
      state (a foreign folder), or is corrupt or truncated.
  """
  path = os.path.abspath(os.fspath(path))
  meta_path, arrays = os.path.join(path, _META), os.path.join(path, _ARRAYS)
  if not os.path.isdir(path):
    raise ValueError(f"{path} does not exist")
  if not os.path.isfile(meta_path):
    raise ValueError(f"{path} is not a saved line_jax state (no {_META}); "
                     "states are written by line_jax.save")
  try:
    with open(meta_path) as f:
      meta = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"{meta_path}: corrupt: {e}") from e
  if not isinstance(meta, dict) or meta.get("format") != FORMAT:
    raise ValueError(f"{meta_path}: not a {FORMAT} file")
  _class(meta["state"], path)  # Refuse a foreign class before reading any array.
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
  return _build(meta["state"], leaves or {}, path)
