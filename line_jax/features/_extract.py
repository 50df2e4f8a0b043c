"""Pooled penultimate features of a whole image set, batch by batch.

The scorers need `(logits, features)` for tens of thousands of images. Any of
these models gives them (`line_jax.models.feature_apply`):

* a Flax Linen module returning `(logits, features)`, as every model of
  `line_jax.models` does: `extract(model, variables, images, ...)`;
* any other Linen module, with `head=` naming its final Dense layer: that
  layer's input `[batch, features]` becomes the features and its output the
  logits: `extract(model, variables, images, head="head/fc", ...)`, and
  `line_jax.models.head_params(variables, head="head/fc")` is the
  `(kernel, bias)` the scorers take;
* a Flax NNX module (in eval mode), returning `(logits, features)` or with
  `head=` naming its final `nnx.Linear` ("fc", "layers/3"); it holds its own
  variables, so pass `variables=None`: `extract(model, None, images, ...)`;
* a function `apply(variables, x) -> (logits, features)`, e.g. a wrapper
  around a module that returns a dict.

A model that returns anything else is an error that names what it returned.
`extract` runs the model over uint8 images in fixed-size batches:

* normalisation runs on the device inside the jitted apply, so only uint8
  pixels cross to it (4x less than float32);
* the apply is jitted once at module level with the model static, so every
  caller with the same model and batch shape shares one compilation; the last
  batch is padded to the full size (and the padding dropped) so a set of any
  length compiles once;
* the next batch is dispatched before the previous one is copied back, so
  host-to-device copies overlap with compute;
* on the CPU the network runs over a few images at a time within each call
  (`layout.Layout.images_per_pass`), so its activations stay in cache;
* with a `mesh` each batch is split over its 'batch' axis (data parallel) and
  the variables are replicated.

`iter_extract` yields the batches instead of stacking them;
`iter_extract_batches` runs the same loop over a stream of batches, such as
`line_jax.data.image_batches` decoding images from disk, for sets whose
images do not fit in memory (`Backbone.stream` makes it the re-iterable
`(features, labels)` stream `Scorer.fit_from_batches` takes).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from line_jax import _progress
from line_jax import layout
from line_jax import models

BATCH_AXIS = "batch"
# Images per network call, the default of every extraction and run.
IMAGES_PER_CALL = 256


def network_outputs(forward: Callable[[Any, jax.Array], tuple[jax.Array, jax.Array]],
                    variables: Any, images: jax.Array, mean: jax.Array, std: jax.Array,
                    per_pass: int | None = None) -> tuple[jax.Array, jax.Array]:
  """`(logits, features)` of uint8 `images` `[b, H, W, C]`, float32 `[b, classes]`
  and `[b, features]`, in passes of `per_pass` images (a divisor of b; None:
  one pass). Traceable: `_apply` jits it alone, `line_jax.detector` with a
  scorer after it."""
  x = (images.astype(jnp.float32) / 255.0 - mean) / std
  logits, features = forward_in_passes(forward, variables, x, per_pass)
  return logits.astype(jnp.float32), features.astype(jnp.float32)


def forward_in_passes(forward: Callable[[Any, jax.Array], Any], variables: Any, x: jax.Array,
                      per_pass: int | None = None) -> Any:
  """`forward(variables, x)` over `x` `[b, ...]` in sequential passes of
  `per_pass` images (a divisor of b; None: one pass); traceable."""
  batch = x.shape[0]  # An int, or symbolic in an export (a multiple of `per_pass` there).
  if per_pass is None or (isinstance(batch, int) and per_pass >= batch):
    return forward(variables, x)
  # Sequential passes: each one's activations stay in cache (`layout`).
  passes = x.reshape(batch // per_pass, per_pass, *x.shape[1:])
  return jax.tree_util.tree_map(lambda a: a.reshape(batch, *a.shape[2:]), jax.lax.map(
      lambda images: forward(variables, images), passes))


# `forward` is hashable (`models.feature_apply`): one compilation per model and shape.
_apply = layout.network_jit(network_outputs, static_argnums=(0, 5))


def _with_dtype(model: Any, dtype) -> Any:
  if dtype is None:
    return model
  if not isinstance(model, nn.Module) or not hasattr(model, "dtype"):
    raise ValueError(f"{type(model).__name__} has no dtype attribute to set")
  # Parameters stay float32; the model computes in `dtype` and returns float32
  # features and logits.
  return model.clone(dtype=dtype)


def _as_images(images):
  """A list or tuple of `[H, W, C]` arrays stacked to `[N, H, W, C]`; else `images`.

  Anything else is left as it is (a memmap stays mapped).
  """
  if not isinstance(images, (list, tuple)):
    return images
  shapes = [np.shape(x) for x in images]
  if not shapes:
    raise ValueError(f"images is an empty {type(images).__name__}: no image to extract "
                     "features from")
  if len(set(shapes)) != 1 or len(shapes[0]) != 3:
    seen = sorted(set(shapes))
    raise ValueError(
        f"images is a {type(images).__name__} of {len(shapes)} arrays of shape "
        f"{seen[0] if len(seen) == 1 else seen[:4]}: expected uint8 [N, H, W, C], or a "
        "list of [H, W, C] arrays of one shape (resize them to one, e.g. with "
        "line_jax.data.resize_center_crop)")
  return np.stack([np.asarray(x) for x in images])


def _check_images(images, channels: int) -> tuple[int, int]:
  shape = tuple(getattr(images, "shape", ()))
  if len(shape) != 4:
    one = "; one image? add a batch axis: x[None]" if len(shape) == 3 else ""
    raise ValueError(f"images must be [N, H, W, C], got shape {shape}{one}")
  if np.asarray(images[:0]).dtype != np.uint8:
    raise ValueError(f"images must be uint8 pixels, got {np.asarray(images[:0]).dtype}")
  if channels != shape[3]:
    # [N, C, H, W] from a PyTorch pipeline: name the fix, not only the clash.
    nchw = (f"; shape {shape} looks like NCHW (channels first), but line_jax takes NHWC: "
            "transpose with x.transpose(0, 2, 3, 1)") if shape[1] == channels else ""
    raise ValueError(f"images have {shape[3]} channels but mean/std have {channels}{nchw}")
  return shape[0], shape[3]


def _batch_size(n: int, batch_size: int, mesh: Mesh | None) -> int:
  devices = 1 if mesh is None else mesh.shape[BATCH_AXIS]
  # Never larger than the (rounded-up) set: a 300-image set is one batch.
  size = min(batch_size, n)
  return -(-size // devices) * devices


def iter_extract(
    model: Any,
    variables: Any,
    images,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = IMAGES_PER_CALL,
    mesh: Mesh | None = None,
    dtype=None,
    progress: bool | str = True,
    head: str | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Yields `(logits, features)` per batch, in order, as float32 NumPy.

  Args:
    model: a Linen module returning `(logits, features)` (every
      `line_jax.models` network), any Linen or NNX module with `head`, an NNX
      module returning `(logits, features)`, or a function
      `apply(variables, x) -> (logits, features)`; see the module docstring.
    variables: its variables (`{"params": ..., "batch_stats": ...}`); None
      for an NNX module.
    images: uint8 `[N, H, W, C]` (any array with slicing, e.g. a memmap),
      or a list of uint8 `[H, W, C]` arrays of one shape (stacked).
    mean: `[C]` per-channel mean in [0, 1] pixel units.
    std: `[C]` per-channel standard deviation.
    batch_size: images per device call; rounded up to a multiple of the
      mesh's 'batch' axis.
    mesh: optional `jax.sharding.Mesh` with a 'batch' axis; each batch is
      sharded over it, the variables replicated.
    dtype: compute dtype (e.g. `jnp.bfloat16`), set on the model; None keeps
      the model's own.
    progress: show a tqdm bar (rate and ETA); a string is its label.
    head: path of the model's final Dense layer ("fc", "head/fc"), whose input
      becomes the features and output the logits; None: the model returns
      `(logits, features)` itself.

  Yields:
    `([b, classes], [b, features])`; the last batch holds the remainder.

  Raises:
    ValueError: bad images, mesh or batch size; a `head` that is no Dense
      layer of the model (the message lists those there are); a model that
      returns something other than `(logits, features)` without `head`.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  _check_mesh(mesh)
  images = _as_images(images)
  n, _ = _check_images(images, len(mean))
  if n == 0:
    return
  size = _batch_size(n, batch_size, mesh)
  slices = ((images[start:start + size],) for start in range(0, n, size))
  yield from _stream(model, variables, slices, mean=mean, std=std, size=size, mesh=mesh,
                     dtype=dtype, progress=progress, total=n, head=head)


def iter_extract_batches(
    model: Any,
    variables: Any,
    batches: Iterable[tuple[Any, ...]],
    *,
    mean: Sequence[float],
    std: Sequence[float],
    mesh: Mesh | None = None,
    dtype=None,
    progress: bool | str = True,
    total: int | None = None,
    head: str | None = None,
    batch_size: int | None = None,
) -> Iterator[tuple[Any, ...]]:
  """Runs the model over a stream of batches, e.g. `line_jax.data.image_batches`.

  Every batch is padded to `batch_size` (None: an `ImageBatches`'s own,
  else the size of the first), rounded up to the mesh's 'batch' axis, so a stream whose last batch is
  partial compiles once, and a stream resumed at any batch computes the
  bits an uninterrupted one does; the next batch is dispatched before the
  previous one is copied back, while the pipeline's threads decode the ones
  after it.

  Args:
    model, variables, mean, std, mesh, dtype, head: as in `iter_extract`.
    batches: tuples `(images, *rest)`: uint8 `[b, H, W, C]` images (NumPy)
      followed by anything, e.g. `(images, labels)` from the pipeline, or
      `(images, labels, position)` to know where a resumed stream stands.
    progress: a tqdm bar; a string is its label.
    total: images in the stream, for the bar's ETA; None shows only the rate.

  Yields:
    `(logits, features, *rest)` per batch, in order: float32 NumPy
    `[b, classes]` and `[b, features]`, then `rest` unchanged.

  Raises:
    ValueError: if a batch is not uint8 `[b, H, W, C]` with as many channels
      as `mean`, or is larger than the first.
  """
  _check_mesh(mesh)
  if batch_size is None and hasattr(batches, "batch_size") and hasattr(batches, "num_records"):
    # An `ImageBatches` knows its size up front; its first batch may be
    # shorter (images dropped by `skip_bad_images`) and must not fix it.
    batch_size = max(1, min(batches.batch_size, batches.num_records))
  size = None if batch_size is None else _batch_size(batch_size, batch_size, mesh)
  yield from _stream(model, variables, batches, mean=mean, std=std, size=size, mesh=mesh,
                     dtype=dtype, progress=progress, total=total, head=head)


def _check_mesh(mesh: Mesh | None) -> None:
  if mesh is not None and BATCH_AXIS not in mesh.shape:
    raise ValueError(f"mesh needs a {BATCH_AXIS!r} axis, got axes {tuple(mesh.shape)}")


def _stream(model, variables, batches, *, mean, std, size, mesh, dtype, progress, total,
            head):
  """The shared loop: pad, dispatch, fetch one behind; see `iter_extract_batches`."""
  forward, variables = models.feature_apply(_with_dtype(model, dtype), variables, head=head)
  channels = len(mean)
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  devices = 1
  if mesh is None:
    put = jax.device_put
  else:
    devices = mesh.shape[BATCH_AXIS]
    variables = jax.device_put(variables, NamedSharding(mesh, P()))
    mean, std = (jax.device_put(a, NamedSharding(mesh, P())) for a in (mean, std))
    put = functools.partial(jax.device_put, device=NamedSharding(mesh, P(BATCH_AXIS)))

  label = progress if isinstance(progress, str) else "features"
  bar = _progress.bar(total, label, unit="img", enabled=bool(progress))
  pending, per_pass = None, None
  try:
    for item in batches:
      batch, rest = np.asarray(_as_images(item[0])), tuple(item[1:])
      valid, _ = _check_images(batch, channels)
      if size is None:  # The first batch fixes the one compiled shape.
        size = -(-max(valid, 1) // devices) * devices
      if valid > size:
        raise ValueError(f"a batch of {valid} images follows batches of {size}: a stream's "
                         "first batch must be its largest")
      if valid < size:  # Pad so every batch has one shape: one compilation.
        batch = np.concatenate(
            [batch, np.zeros((size - valid, *batch.shape[1:]), np.uint8)])
      if per_pass is None:  # Sharded batches (a mesh) run in one pass.
        per_pass = size if mesh is not None else layout.default().images_per_pass(
            size, *batch.shape[1:3])
      out = _apply(forward, variables, put(batch), mean, std, per_pass)
      if pending is not None:
        yield _fetch(*pending, bar)
      pending = (out, valid, rest)
    if pending is not None:
      yield _fetch(*pending, bar)
  finally:
    bar.close()


def _fetch(out, valid: int, rest: tuple, bar) -> tuple[Any, ...]:
  logits, features = (np.asarray(a)[:valid] for a in out)
  bar.update(valid)
  return (logits, features, *rest)


def extract(model: Any, variables: Any, images, *, mean: Sequence[float],
            std: Sequence[float], batch_size: int = IMAGES_PER_CALL, mesh: Mesh | None = None,
            dtype=None, progress: bool | str = True,
            head: str | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Logits and pooled features of every image; arguments as `iter_extract`.

      logits, feats = extract(model, variables, images, mean=(0.286,),
                              std=(0.353,), head="Dense_1")
      kernel, bias = line_jax.models.head_params(variables, head="Dense_1")

  Returns:
    `(logits, features)`: float32 NumPy `[N, classes]` and `[N, features]`.
  """
  parts = list(iter_extract(model, variables, images, mean=mean, std=std,
                            batch_size=batch_size, mesh=mesh, dtype=dtype,
                            progress=progress, head=head))
  if not parts:
    raise ValueError("images is empty: no image to extract features from")
  return (np.concatenate([p[0] for p in parts]),
          np.concatenate([p[1] for p in parts]))
