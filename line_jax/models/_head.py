"""Any classifier -> `apply(variables, x) -> (logits, features)`, and its head.

line_jax's own models return `(logits, features)`. Any other network gives
them through its head: the final Dense layer, named by its path ("fc",
"head/fc", "layers/3" for an NNX list). Its input is the features and its
output the logits, the same logits the scorers recompute as
`features @ kernel + bias` from `head_params`.

* Flax Linen: an interceptor (`nn.intercept_methods`) on the head's
  `__call__` sows its input and output into a private collection, so capture
  goes through Flax's own variable plumbing (and through lifted transforms
  such as `nn.remat`), with no tracer kept in Python state.
* Flax NNX: the module is split into a static graph and a state pytree; the
  head's instance gets a recording subclass inside the traced call only.
* A plain function `apply(variables, x) -> (logits, features)` is used as is.

Features are an inference-mode pass: `apply_kwargs` (e.g. `{"train": False}`)
go to every call, and a model set to train (an NNX module not `eval()`-ed,
`train=True`) is refused before any batch runs, since its features would
change with the batch (dropout, batch statistics).

`feature_apply` returns a hashable callable, so `jax.jit` can take it as a
static argument and callers with the same model share one compilation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import inspect
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import numpy as np

# Private collection the Linen interceptor sows the head's input and output into.
_CAPTURE = "line_jax_head"
# Call arguments that set a network's mode: their training value.
_TRAINING = {"train": True, "training": True, "deterministic": False,
             "use_running_average": False}
# The NNX attributes `nnx.Module.eval()` sets True on every submodule that has them.
_EVAL_ATTRS = ("deterministic", "use_running_average")
# Where an error lists a network's layers in training mode, the first few make the point.
_SHOWN = 6


def _nnx():
  from flax import nnx  # pylint: disable=g-import-not-at-top
  return nnx


def _is_nnx(model: Any) -> bool:
  return isinstance(model, _nnx().Module)


def head_path(head: str | tuple[str | int, ...]) -> tuple[str, ...]:
  """`"head/fc"` (or `("head", "fc")`) -> `("head", "fc")`."""
  parts = tuple(str(p) for p in head) if isinstance(head, tuple) else tuple(
      str(head).strip("/").split("/"))
  if not parts or not all(parts):
    raise ValueError(f"head must name a submodule, e.g. 'fc' or 'head/fc', got {head!r}")
  return parts


def _name(path: tuple) -> str:
  return "/".join(str(p) for p in path)


# --- what the network holds: Dense-like layers ------------------------------------------------


def _linen_params(variables: Any) -> Mapping:
  if not isinstance(variables, Mapping):
    raise TypeError(
        f"variables must be a Flax Linen variables dict ({{'params': ...}}) or an NNX "
        f"module, got {type(variables).__name__}")
  params = variables.get("params", variables)
  return params if isinstance(params, Mapping) else {}


def _linen_dense_layers(params: Mapping, prefix: tuple = ()) -> dict[str, tuple]:
  """`{path: kernel shape}` of every submodule holding a 2-D `kernel`."""
  found = {}
  for key, value in params.items():
    if not isinstance(value, Mapping):
      continue
    kernel = value.get("kernel")
    if kernel is not None and not isinstance(kernel, Mapping) and np.ndim(kernel) == 2:
      found[_name((*prefix, key))] = tuple(np.shape(kernel))
    found.update(_linen_dense_layers(value, (*prefix, key)))
  return found


def _value(variable: Any) -> Any:
  """An NNX Variable's array (`get_value`; `.value` is deprecated), else itself."""
  get = getattr(variable, "get_value", None)
  return get() if callable(get) else variable


def _nnx_kernel(module: Any):
  value = _value(getattr(module, "kernel", None))
  return value if value is not None and np.ndim(value) == 2 else None


def _nnx_dense_layers(model: Any) -> dict[str, tuple]:
  nnx = _nnx()
  found = {}
  for path, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Module) and path and _nnx_kernel(node) is not None:
      found[_name(path)] = tuple(np.shape(_nnx_kernel(node)))
  return dict(sorted(found.items()))


def dense_layers(model_or_variables: Any) -> dict[str, tuple[int, int]]:
  """The Dense-like submodules a head can be: `{"head/fc": (features, classes)}`.

  Args:
    model_or_variables: Linen variables (`{"params": ...}`) or an NNX module.
  """
  if _is_nnx(model_or_variables):
    return _nnx_dense_layers(model_or_variables)
  return _linen_dense_layers(_linen_params(model_or_variables))


def _listing(layers: Mapping[str, tuple]) -> str:
  if not layers:
    return "it has no Dense-like submodule (one with a 2-D kernel)"
  shown = ", ".join(f"{k!r} {v[0]}x{v[1]}" for k, v in layers.items())
  return f"its Dense-like submodules (kernel features x classes): {shown}"


def unknown_head(head, layers: Mapping[str, tuple], what: str = "the model") -> ValueError:
  """The error for a head name that names no Dense-like submodule."""
  return ValueError(f"no Dense layer {_name(head_path(head))!r} in {what}; {_listing(layers)}")


# --- the head's parameters --------------------------------------------------------------------


def head_params(model_or_variables: Any, head: str = "fc") -> tuple[jax.Array, jax.Array | None]:
  """The `(kernel, bias)` of a network's final Dense layer, as scorers take them.

  Args:
    model_or_variables: Flax Linen variables (`{"params": ...}`, or the
      params themselves), or a Flax NNX module.
    head: path of the Dense layer, "/"-separated: "fc", "head/fc",
      "classifier", "layers/3" (an NNX list's fourth entry).

  Returns:
    `(kernel, bias)`: `[features, classes]` (Flax layout) and `[classes]`,
    or None where the layer has no bias.

  Raises:
    ValueError: `head` is not a Dense-like submodule; the message lists the
      ones there are.
  """
  path = head_path(head)
  if _is_nnx(model_or_variables):
    module = _nnx_submodule(model_or_variables, path)
    kernel = None if module is None else _nnx_kernel(module)
    if kernel is None:
      raise unknown_head(head, _nnx_dense_layers(model_or_variables),
                         type(model_or_variables).__name__)
    return kernel, _value(getattr(module, "bias", None))
  params = _linen_params(model_or_variables)
  node = params
  for part in path:
    node = node.get(part) if isinstance(node, Mapping) else None
  kernel = node.get("kernel") if isinstance(node, Mapping) else None
  if kernel is None or isinstance(kernel, Mapping) or np.ndim(kernel) != 2:
    raise unknown_head(head, _linen_dense_layers(params), "the variables")
  return kernel, node.get("bias")


def _nnx_submodule(model: Any, path: tuple[str, ...]):
  node = model
  for part in path:
    try:
      node = node[int(part)] if part.isdigit() else getattr(node, part)
    except (AttributeError, IndexError, KeyError, TypeError):
      return None
  return node if isinstance(node, _nnx().Module) else None


# --- the forward pass -------------------------------------------------------------------------


def _describe(out: Any) -> str:
  if hasattr(out, "shape"):
    return f"a single array of shape {tuple(out.shape)}"
  if isinstance(out, Mapping):
    return f"a {type(out).__name__} with keys {sorted(map(str, out))}"
  if isinstance(out, (tuple, list)):
    inner = ", ".join(
        f"shape {tuple(o.shape)}" if hasattr(o, "shape") else type(o).__name__ for o in out)
    return f"a {type(out).__name__} of {len(out)} ({inner})"
  return f"a {type(out).__name__}"


def _pair(out: Any, what: str, hint: Callable[[], str]) -> tuple[jax.Array, jax.Array]:
  """Checks `out` is `(logits [b, classes], features [b, features])`.

  `hint()` (called only on failure) says what to do instead.
  """
  ok = (isinstance(out, (tuple, list)) and len(out) == 2
        and all(hasattr(o, "shape") and len(o.shape) == 2 for o in out)
        and out[0].shape[0] == out[1].shape[0])
  if not ok:
    raise ValueError(
        f"{what} returned {_describe(out)}, not (logits [batch, classes], features "
        f"[batch, features]); {hint()}")
  return out[0], out[1]


def _captured(calls: Any, head: tuple, what: str, layers: Callable[[], Mapping]) -> tuple:
  """`(logits, features)` from the head's recorded `(input, output)` calls."""
  if not calls:
    raise ValueError(f"{what} never called {_name(head)!r} in its forward pass; "
                     f"{_listing(layers())}")
  if len(calls) > 1:
    raise ValueError(f"{what} called its head {_name(head)!r} {len(calls)} times in "
                     "one forward pass; name the layer called once, last")
  features, logits = calls[0]
  if len(features.shape) != 2:
    raise ValueError(
        f"the input of {_name(head)!r} has shape {tuple(features.shape)}, not [batch, "
        "features]: name the Dense layer that takes the pooled features")
  return logits, features


class _LinenApply(NamedTuple):
  module: nn.Module
  head: tuple[str, ...] | None
  kwargs: tuple[tuple[str, Any], ...] = ()

  def __call__(self, variables, x):
    what = type(self.module).__name__
    options = dict(self.kwargs)
    if self.head is None:
      return _pair(self.module.apply(variables, x, **options), what, lambda: (
          "pass head='<name of its final Dense layer>' to take that layer's input as the "
          f"features ({_listing(dense_layers(variables))})"))
    head = self.head

    def interceptor(next_fun, args, kwargs, context):
      y = next_fun(*args, **kwargs)
      if context.method_name == "__call__" and context.module.path == head:
        inputs = args[0] if args else next(iter(kwargs.values()))
        context.module.sow(_CAPTURE, "io", (inputs, y))
      return y

    with nn.intercept_methods(interceptor):
      out, state = self.module.apply(variables, x, mutable=[_CAPTURE], **options)
    del out  # The logits are the head's output (the model's, when it is last).
    node = state.get(_CAPTURE, {})
    for part in head:
      node = node.get(part, {})
    return _captured(node.get("io", ()), head, what, lambda: dense_layers(variables))


class _NnxApply(NamedTuple):
  graphdef: Any
  head: tuple[str, ...] | None
  name: str
  kwargs: tuple[tuple[str, Any], ...] = ()

  def __call__(self, state, x):
    model = _nnx().merge(self.graphdef, state)
    options = dict(self.kwargs)
    if self.head is None:
      return _pair(model(x, **options), self.name, lambda: (
          "pass head='<path of its final Linear>' to take that layer's input as the "
          f"features ({_listing(_nnx_dense_layers(model))})"))
    module = _nnx_submodule(model, self.head)
    if module is None:
      raise unknown_head(self.head, _nnx_dense_layers(model), self.name)
    seen = []
    cls = type(module)

    def call(self_, *args, **kwargs):
      y = cls.__call__(self_, *args, **kwargs)
      seen.append((args[0] if args else next(iter(kwargs.values())), y))
      return y

    # On the merged copy inside this trace only: the caller's module is untouched.
    module.__class__ = type(cls.__name__, (cls,), {"__call__": call})
    model(x, **options)
    return _captured(seen, self.head, self.name, lambda: _nnx_dense_layers(model))


class _FunctionApply(NamedTuple):
  fn: Callable[..., Any]
  kwargs: tuple[tuple[str, Any], ...] = ()

  def __call__(self, variables, x):
    what = getattr(self.fn, "__name__", type(self.fn).__name__)
    return _pair(self.fn(variables, x, **dict(self.kwargs)), what, lambda: (
        "a function must return (logits, features); for a Flax module, pass the module "
        "itself with head='<name of its final Dense layer>'"))


# --- inference mode and call arguments, checked once before any batch ---------------------------


def _static_kwargs(apply_kwargs: Mapping[str, Any] | None) -> tuple[tuple[str, Any], ...]:
  """`{"train": False}` -> `(("train", False),)`: sorted and hashable, since the
  apply is a static argument of `jax.jit`."""
  if apply_kwargs is None:
    return ()
  if not isinstance(apply_kwargs, Mapping) or not all(isinstance(k, str) for k in apply_kwargs):
    raise TypeError("apply_kwargs must map argument names to values, e.g. {'train': False}; "
                    f"got {apply_kwargs!r}")
  items = tuple(sorted(apply_kwargs.items()))
  try:
    hash(items)
  except TypeError:
    bad = [f"{k}: {type(v).__name__}" for k, v in items if not _hashable(v)]
    raise ValueError("apply_kwargs values are static under jit, so must be hashable "
                     f"(bool, int, str, tuple); got {', '.join(bad)}") from None
  return items


def _hashable(value: Any) -> bool:
  try:
    hash(value)
  except TypeError:
    return False
  return True


def _refuse_training_kwargs(kwargs: Mapping[str, Any], what: str, variables: Any) -> None:
  """A call argument set to its training value (`train=True`) is refused."""
  for name, value in kwargs.items():
    if (name in _TRAINING and isinstance(value, (bool, np.bool_))
        and bool(value) == _TRAINING[name]):
      stats = (" and would update its batch_stats, which extraction holds fixed"
               if isinstance(variables, Mapping) and "batch_stats" in variables else "")
      raise ValueError(
          f"apply_kwargs {name}={value!r} runs {what} in training mode{stats}: features would "
          "change with the batch (batch statistics, dropout); pass apply_kwargs="
          f"{{{name!r}: {not value}}}")


def _suggest(names: list[str]) -> str:
  """`["train"]` -> `"{'train': False}"`: inference values where the name says them."""
  return "{" + ", ".join(
      f"{n!r}: {not _TRAINING[n]}" if n in _TRAINING else f"{n!r}: ..." for n in names) + "}"


def _check_call(fn: Callable, num_args: int, kwargs: Mapping[str, Any], what: str) -> None:
  """Names an argument `fn(*num_args inputs, **kwargs)` would miss or not take.

  Read from the signature, so the error comes before any batch, not as a
  TypeError from inside the traced call.
  """
  try:
    params = list(inspect.signature(fn).parameters.values())
  except (TypeError, ValueError):
    return  # No signature to read (no __call__, a C callable): the call will say.
  kind = inspect.Parameter
  named = [p for p in params if p.kind not in (kind.VAR_POSITIONAL, kind.VAR_KEYWORD)]
  inputs = [p for p in named if p.kind != kind.KEYWORD_ONLY][:num_args]
  missing = [p.name for p in named
             if p not in inputs and p.default is p.empty and p.name not in kwargs]
  if missing:
    names = ", ".join(map(repr, missing))
    raise ValueError(
        f"{what} requires the argument{'s' * (len(missing) > 1)} {names}, which apply_kwargs "
        f"does not give: pass apply_kwargs={_suggest(missing)}")
  if any(p.kind == kind.VAR_KEYWORD for p in params):
    return
  takes = [p.name for p in named if p not in inputs and p.kind != kind.POSITIONAL_ONLY]
  unknown = sorted(set(kwargs) - set(takes))
  if unknown:
    raise ValueError(f"{what} takes no argument {', '.join(map(repr, unknown))} (apply_kwargs); "
                     f"it takes {takes or 'none besides its input'}")


def _training_layers(model: Any) -> list[str]:
  """`["bn1 (BatchNorm: use_running_average=False)", ...]`: what `model.eval()` switches."""
  nnx = _nnx()
  found = []
  for path, node in nnx.iter_graph(model):
    if not isinstance(node, nnx.Module):
      continue
    for attr in _EVAL_ATTRS:
      value = getattr(node, attr, None)  # None: decided at call time.
      if isinstance(value, (bool, np.bool_)) and not value:
        found.append((path, f"{_name(path) or '<root>'} ({type(node).__name__}: {attr}={value})"))
  return [text for _, text in sorted(found, key=lambda f: tuple(map(str, f[0])))]


def _refuse_nnx_training(model: Any) -> None:
  """An NNX module in training mode is refused, naming its layers in it."""
  layers = _training_layers(model)
  if layers:
    more = f" and {len(layers) - _SHOWN} more" if len(layers) > _SHOWN else ""
    raise ValueError(
        f"{type(model).__name__} is in training mode: {', '.join(layers[:_SHOWN])}{more}. "
        "Dropout would zero features at random and BatchNorm normalise each batch by its own "
        "statistics, so features would change with the batch: call model.eval() first (or "
        "pass a model already in inference mode)")


# The applies `feature_apply` returns: passed to it again, they are taken as they are.
_APPLIES = (_LinenApply, _NnxApply, _FunctionApply)


def feature_apply(model: Any, variables: Any, *, head: str | None = None,
                  apply_kwargs: Mapping[str, Any] | None = None
                  ) -> tuple[Callable[[Any, jax.Array], tuple[jax.Array, jax.Array]], Any]:
  """A network as `apply(variables, x) -> (logits, features)`, hashable.

  Args:
    model: a Flax Linen module that returns `(logits, features)`, or any Linen
      module with `head`; a Flax NNX module (in eval mode: `model.eval()`),
      returning `(logits, features)` or with `head`; a function
      `apply(variables, x) -> (logits, features)`; or an apply this function
      returned, taken as it is.
    variables: the Linen module's or the function's variables; None for an
      NNX module, which holds its own.
    head: path of the final Dense layer ("fc", "head/fc"): its input
      `[batch, features]` becomes the features and its output the logits.
    apply_kwargs: keyword arguments of every call, e.g. `{"train": False}`
      for a Linen module whose `__call__(x, train)` requires it; hashable
      values (they are static under jit).

  Returns:
    `(apply, variables)`: call `apply(variables, x)`. For NNX, `variables` is
    the module's state and `apply` holds its static graph.

  Raises:
    ValueError: a head that names no Dense-like submodule, variables given
      with an NNX module, or `head` with a plain function; a model in
      training mode (an NNX module not `eval()`-ed, `train=True`); a call
      argument the model requires and `apply_kwargs` lacks, or one it does
      not take.
    TypeError: a model of none of these kinds.
  """
  if isinstance(model, _APPLIES):
    if head is not None or apply_kwargs:
      raise ValueError("model is an apply feature_apply built, its head and apply_kwargs "
                       "already set: pass head=None and no apply_kwargs")
    return model, variables
  path = None if head is None else head_path(head)
  kwargs = _static_kwargs(apply_kwargs)
  given, what = dict(kwargs), type(model).__name__
  if isinstance(model, nn.Module):
    _refuse_training_kwargs(given, what, variables)
    _check_call(getattr(model, "__call__", None), 1, given, what)
    if path is not None:
      layers = dense_layers(variables)
      if _name(path) not in layers:
        raise unknown_head(head, layers, what)
    return _LinenApply(model, path, kwargs), variables
  if _is_nnx(model):
    if variables is not None:
      raise ValueError(f"{what} is an NNX module, which holds its own "
                       "variables: pass variables=None")
    _refuse_nnx_training(model)
    _refuse_training_kwargs(given, what, None)
    _check_call(getattr(model, "__call__", None), 1, given, what)
    if path is not None and _nnx_kernel(_nnx_submodule(model, path)) is None:
      raise unknown_head(head, _nnx_dense_layers(model), what)
    graphdef, state = _nnx().split(model)
    return _NnxApply(graphdef, path, what, kwargs), state
  if callable(model):
    if path is not None:
      raise ValueError("head= needs a Flax module; a plain function must return "
                       "(logits, features) itself")
    name = getattr(model, "__name__", what)
    _refuse_training_kwargs(given, name, variables)
    _check_call(model, 2, given, name)
    return _FunctionApply(model, kwargs), variables
  raise TypeError(
      "model must be a Flax Linen module, a Flax NNX module or a function "
      f"apply(variables, x) -> (logits, features), got {what}")
