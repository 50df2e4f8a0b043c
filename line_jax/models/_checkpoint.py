"""Saving and restoring trained models: orbax weights plus a JSON config.

A checkpoint is a folder holding `variables/` (written by orbax's
`StandardCheckpointer`) and `config.json` (how the model was built and
trained). The config is what lets `load_checkpoint` rebuild the Flax module and an
abstract target of the right shapes, so nothing is unpickled.
"""

from __future__ import annotations

import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from line_jax import _json
from line_jax.models._registry import get_model

# The committed Fashion-MNIST model (package data): every CLI's default.
DEFAULT_CHECKPOINT = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    "checkpoints", "fashion_mnist_resnet_small")
CONFIG_FILE = "config.json"
VARIABLES_DIR = "variables"
# Keys `load_checkpoint` needs to rebuild the module; the rest of the config
# (seed, epochs, accuracy, ...) is a record for people.
REQUIRED_KEYS = ("model", "num_classes", "input_shape")


def save_checkpoint(directory: str | os.PathLike, variables: Any,
               config: dict[str, Any]) -> None:
  """Writes `variables` with orbax and `config` as `config.json`.

  Args:
    directory: folder to create; it must not exist yet, so that a finished
      checkpoint is never half overwritten.
    variables: the Flax variables, e.g. `{"params": ..., "batch_stats": ...}`.
    config: JSON-serialisable dict with at least `model`, `num_classes` and
      `input_shape` (`[height, width, channels]`); optional `model_kwargs`,
      and `classes`: the class names, label `i` at `i`, which the CLIs
      check a labelled image folder against (`data.check_class_names`).

  Raises:
    ValueError: if `config` lacks a required key or `directory` exists.
  """
  missing = [key for key in REQUIRED_KEYS if key not in config]
  if missing:
    raise ValueError(f"config lacks {missing}; it needs {list(REQUIRED_KEYS)}")
  _check_classes("config", config)
  # orbax requires absolute paths.
  directory = os.path.abspath(os.fspath(directory))
  if os.path.exists(directory):
    raise ValueError(f"{directory} already exists; choose a new folder")
  # Serialise first: a config that is not JSON fails before any file is made.
  text = json.dumps(config, indent=2, sort_keys=True)
  os.makedirs(directory)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(directory, VARIABLES_DIR),
                    jax.device_get(variables))
  checkpointer.wait_until_finished()
  checkpointer.close()
  with open(os.path.join(directory, CONFIG_FILE), "w") as f:
    f.write(text + "\n")


def read_checkpoint_config(directory: str | os.PathLike) -> dict[str, Any]:
  """Reads and checks a checkpoint's `config.json`.

  Raises:
    ValueError: naming the path if the file is missing, not JSON, lacks a
      required key, or has `classes` that are not one name per class.
  """
  path = os.path.join(os.path.abspath(os.fspath(directory)), CONFIG_FILE)
  config = _json.read_object(path, missing="not a line_jax checkpoint")
  missing = [key for key in REQUIRED_KEYS if key not in config]
  if missing:
    raise ValueError(f"{path} lacks {missing}")
  _check_classes(path, config)
  return config


def _check_classes(where: str, config: dict[str, Any]) -> None:
  """`classes`, where a config has it: one distinct name per class, in label order."""
  classes = config.get("classes")
  if classes is None:
    return
  if not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)
          and len(set(classes)) == len(classes) == config["num_classes"]):
    raise ValueError(f"{where}: 'classes' must list {config['num_classes']} distinct class "
                     f"names (num_classes), label i at position i; got {classes!r}")


def build_model(config: dict[str, Any]) -> tuple[nn.Module, Any]:
  """Rebuilds the module and the abstract shapes of its variables.

  Returns:
    `(model, abstract)`: `abstract` is a pytree of `jax.ShapeDtypeStruct`, as
    `model.init` would produce, computed without allocating weights.
  """
  model = get_model(config["model"], int(config["num_classes"]),
                    **config.get("model_kwargs", {}))
  shape = (1, *config["input_shape"])
  abstract = jax.eval_shape(model.init, jax.random.key(0),
                            jnp.zeros(shape, jnp.float32))
  return model, abstract


def load_checkpoint(directory: str | os.PathLike) -> tuple[nn.Module, Any, dict]:
  """Restores a checkpoint written by `save_checkpoint`.

  Args:
    directory: the checkpoint folder.

  Returns:
    `(model, variables, config)`: the Flax module, its variables as
    `jax.Array`s, and the dict from `config.json`.

  Raises:
    ValueError: naming the path if the checkpoint is missing, truncated or
      corrupt, or if its weights do not fit the architecture the config
      describes (other model, other number of classes).
  """
  directory = os.path.abspath(os.fspath(directory))
  if not os.path.isdir(directory):
    raise ValueError(f"checkpoint folder {directory} does not exist")
  config = read_checkpoint_config(directory)
  try:
    model, abstract = build_model(config)
  except (TypeError, ValueError) as e:
    raise ValueError(
        f"{directory}: cannot build the model its config describes: {e}"
    ) from e
  path = os.path.join(directory, VARIABLES_DIR)
  if not os.path.isdir(path):
    raise ValueError(f"{path} not found: the checkpoint has no weights")
  checkpointer = ocp.StandardCheckpointer()
  try:
    try:
      saved = checkpointer.metadata(path).item_metadata
    except Exception as e:  # orbax/tensorstore raise many types on bad files.
      raise ValueError(f"{path}: corrupt or truncated checkpoint: "
                       f"{type(e).__name__}: {e}") from e
    # Compare shapes before reading any array, so a config that does not
    # match the weights gets a message that says which leaf differs.
    _check_shapes(path, saved, abstract)
    try:
      variables = checkpointer.restore(path, abstract)
    except Exception as e:  # tensorstore reports a short read as ValueError.
      raise ValueError(f"{path}: corrupt or truncated checkpoint: "
                       f"{type(e).__name__}: {e}") from e
  finally:
    checkpointer.close()
  return model, variables, config


def _check_shapes(path: str, saved: Any, abstract: Any) -> None:
  """Raises ValueError if the saved tree differs from the expected one."""
  saved_leaves = _shapes(saved)
  expected = _shapes(abstract)
  if saved_leaves.keys() != expected.keys():
    extra = sorted(saved_leaves.keys() - expected.keys())[:3]
    lacking = sorted(expected.keys() - saved_leaves.keys())[:3]
    raise ValueError(
        f"{path}: weights do not match the config's architecture "
        f"(unexpected {extra}, missing {lacking})")
  for name, shape in expected.items():
    if saved_leaves[name] != shape:
      raise ValueError(
          f"{path}: {name} has shape {saved_leaves[name]} but the config's "
          f"architecture needs {shape}")


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  leaves = jax.tree_util.tree_leaves_with_path(
      tree, is_leaf=lambda x: hasattr(x, "shape"))
  return {jax.tree_util.keystr(k): tuple(v.shape) for k, v in leaves}
