"""PyTorch checkpoints -> Flax variables, read without executing pickle code.

Flax module names mirror the PyTorch attribute names with "_" for "." (see
`_resnet.py`, `_densenet.py`), so a parameter's PyTorch key follows from its
Flax path; the model's own variable shapes (from `jax.eval_shape`, no
computation) say which keys must be there and with which shapes. torch is
imported inside `read_torch_state_dict` only, so line_jax imports without it.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from line_jax.models._registry import get_model
from line_jax.models._registry import input_shapes

# (Flax collection, leaf) -> PyTorch suffix. Conv and Dense kernels are both
# "kernel"; they differ by rank.
_LEAVES = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}
_SHOWN = 8  # keys listed per problem in an error message


def read_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a PyTorch `state_dict` file with `weights_only=True`.

  Accepts a bare `state_dict` (torchvision) or a dict holding one under
  "state_dict" (the DICE / LINe checkpoints).

  Args:
    path: a file written by `torch.save`.

  Returns:
    PyTorch key -> array; floating tensors as float32.

  Raises:
    FileNotFoundError: no file at `path`.
    ValueError: the file is corrupt or truncated, or holds no state_dict.
  """
  import torch  # pylint: disable=g-import-not-at-top

  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except FileNotFoundError:
    raise
  except Exception as e:  # torch raises several types for damaged files.
    raise ValueError(f"cannot read PyTorch checkpoint {path}: {e}") from e
  if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
    obj = obj["state_dict"]
  if not isinstance(obj, Mapping):
    raise ValueError(f"{path} holds a {type(obj).__name__}, not a state_dict")
  state_dict = {}
  for key, value in obj.items():
    if not isinstance(value, torch.Tensor):
      raise ValueError(f"{path}: {key!r} is a {type(value).__name__}, not a "
                       "tensor; is this a state_dict?")
    value = value.detach()
    if value.is_floating_point():
      value = value.to(torch.float32)
    state_dict[key] = value.numpy()
  return state_dict


def variables_from_state_dict(
    model: nn.Module,
    state_dict: Mapping[str, Any],
    input_shape: tuple[int, int, int],
    source: str = "state_dict",
) -> dict[str, Any]:
  """Converts a PyTorch `state_dict` into `model`'s Flax variables.

  Conv weights go OIHW -> HWIO, Linear weights are transposed, BatchNorm
  `weight`/`bias` become `scale`/`bias` and its running statistics
  `batch_stats` `mean`/`var`. `num_batches_tracked` is ignored. Keys may carry
  DataParallel's "module." prefix, and the CIFAR ResNet's `shortcut` and
  `linear` stand for torchvision's `downsample` and `fc`.

  Args:
    model: the Flax module (e.g. from `get_model`).
    state_dict: PyTorch key -> array or CPU tensor.
    input_shape: `[height, width, channels]` of one input (only the channels
      change parameter shapes).
    source: what to call the checkpoint in error messages (e.g. its path).

  Returns:
    `{"params": ..., "batch_stats": ...}` of float32 arrays.

  Raises:
    ValueError: keys missing or unexpected, or shapes that differ (a
      checkpoint of another architecture or number of classes).
  """
  shapes = jax.eval_shape(
      model.init, jax.random.key(0),
      jax.ShapeDtypeStruct((1, *input_shape), jnp.float32))
  expected = flax.traverse_util.flatten_dict(shapes)
  # Natural order (layer.2 before layer.10) keeps error messages readable.
  path_of = dict(sorted(((_torch_key(p), p) for p in expected),
                        key=lambda item: _natural(item[0])))

  given = {}
  for key, value in state_dict.items():
    if key.endswith("num_batches_tracked"):
      continue
    given.setdefault(_canonical(key), []).append((key, value))
  problems = []  # all of them at once: one message says what is wrong
  duplicates = [k for pairs in given.values() if len(pairs) > 1
                for k, _ in pairs]
  if duplicates:
    problems.append(f"keys naming the same parameter {_listing(duplicates)}")
  missing = [k for k in path_of if k not in given]
  if missing:
    problems.append(f"missing keys {_listing(missing)}")
  unexpected = sorted((k for c, pairs in given.items() if c not in path_of
                       for k, _ in pairs), key=_natural)
  if unexpected:
    problems.append(f"unexpected keys {_listing(unexpected)}")

  flat, mismatches = {}, []
  for key, path in path_of.items():
    if key not in given:
      continue
    original, value = given[key][0]
    value = np.asarray(value, dtype=np.float32)
    want = _torch_shape(expected[path].shape)
    if value.shape != want:
      mismatches.append(f"{original} has shape {tuple(value.shape)}, the "
                        f"model needs {want}")
      continue
    flat[path] = jnp.asarray(_to_flax_layout(value))
  if mismatches:
    problems.append(f"shape mismatches {_listing(mismatches, '; ')}")
  if problems:
    num_classes = getattr(model, "num_classes", "?")
    raise ValueError(
        f"{source} does not fit {type(model).__name__}(num_classes="
        f"{num_classes}) (a checkpoint of another architecture or number of "
        "classes?): " + "; ".join(problems))
  return flax.traverse_util.unflatten_dict(flat)


def load_torch_checkpoint(
    name: str, path: str | os.PathLike, num_classes: int, **model_kwargs
) -> tuple[nn.Module, dict[str, Any]]:
  """Builds registered model `name` and loads a PyTorch checkpoint into it.

  Args:
    name: a `registry` name: "resnet18", "resnet34", "resnet50", "resnet101",
      "resnet152" (torchvision's `state_dict`s, e.g.
      `torchvision.models.resnet18(weights=...).state_dict()` saved with
      `torch.save`), "densenet100" (DICE / LINe), "resnet18_cifar",
      "resnet_small".
    path: the checkpoint file.
    num_classes: classes of the checkpoint's head.
    **model_kwargs: further model attributes, e.g. `dtype=jnp.bfloat16`.

  Returns:
    `(model, variables)`; `model.apply(variables, x)` gives
    `(logits, features)`.

  Raises:
    ValueError: see `read_torch_state_dict`, `variables_from_state_dict`.
  """
  model = get_model(name, num_classes, **model_kwargs)
  state_dict = read_torch_state_dict(path)
  variables = variables_from_state_dict(model, state_dict, input_shapes[name],
                                        source=os.fspath(path))
  return model, variables


def torch_num_classes(state_dict: Mapping[str, Any], *, head: str = "fc",
                      source: str = "the state_dict") -> int:
  """Classes of a PyTorch state_dict's final linear layer `head` (`fc.weight`
  `[classes, features]`).

  Raises:
    ValueError: naming the keys there are where `head` has no 2-D weight.
  """
  weight = state_dict.get(f"{head}.weight")
  if weight is None:
    weight = state_dict.get(f"module.{head}.weight")  # Saved from DataParallel.
  if weight is None or np.ndim(weight) != 2:
    keys = [k for k in state_dict if k.endswith(".weight")][-_SHOWN:]
    raise ValueError(f"{source} has no 2-D {head}.weight (the head whose rows are the "
                     f"classes); its last weights: {_listing(keys)}")
  return int(np.shape(weight)[0])


def _torch_key(path: tuple[str, ...]) -> str:
  collection, *modules, leaf = path
  return ".".join([m.replace("_", ".") for m in modules]
                  + [_LEAVES[collection, leaf]])


def _canonical(key: str) -> str:
  key = key.removeprefix("module.")
  key = key.replace(".shortcut.", ".downsample.")
  if key.startswith("linear."):
    key = "fc." + key.removeprefix("linear.")
  return key


def _natural(key: str) -> list:
  # re.split with a group alternates text and digits, so the types line up.
  parts = re.split(r"(\d+)", key)
  return [int(part) if i % 2 else part for i, part in enumerate(parts)]


def _torch_shape(flax_shape: tuple[int, ...]) -> tuple[int, ...]:
  if len(flax_shape) == 4:  # HWIO -> OIHW
    return tuple(flax_shape[i] for i in (3, 2, 0, 1))
  return tuple(reversed(flax_shape))  # Dense [in, out] -> [out, in]; 1-D


def _to_flax_layout(value: np.ndarray) -> np.ndarray:
  if value.ndim == 4:
    return value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
  return value.T  # Linear [out, in] -> [in, out]; no-op on 1-D


def _listing(keys: list[str], separator: str = ", ") -> str:
  shown = separator.join(keys[:_SHOWN])
  more = f" and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else ""
  return f"[{shown}{more}]"
