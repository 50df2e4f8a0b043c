"""A `Backbone`: a network, its variables, its head and how its inputs are made.

Everything that turns a record of a data set into features travels together:

    backbone = Backbone.from_checkpoint("line_jax/checkpoints/fashion_mnist_resnet_small")
    kernel, bias = backbone.head_params()                 # what the scorers take
    batches = backbone.batches(source, batch_size=256)    # the grain pipeline, preprocessed
    for logits, features, labels in backbone.run(batches):
      ...
    cached = backbone.read(source, cache_dir=cache.default_dir())  # extracted once

`run` is the one extraction loop (jitted once per model and batch shape,
the next batch dispatched before the last is fetched); `stream` is the same
loop as the resumable `Stream` a fit folds; `key` digests everything the
features depend on, for `line_jax.features.cache`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
import dataclasses
import functools
import os
import time
import types
from typing import Any

import numpy as np

from line_jax.features import _extract
from line_jax.features import cache


@dataclasses.dataclass(frozen=True, eq=False)
class Backbone:
  """A network that gives `(logits, features)`, and what it takes.

  Attributes:
    model: a Linen module returning `(logits, features)` (every
      `line_jax.models` network), any Linen or NNX module with `head`, or a
      function `apply(variables, x) -> (logits, features)`.
    variables: its variables (None for an NNX module).
    mean, std: `[C]` normalisation in [0, 1] pixel units.
    preprocess: the `line_jax.data.Preprocess` of its input (crop, resize,
      channels); None for a backbone fed ready uint8 batches only.
    head: path of the final Dense layer ("fc", "head/fc") of a network that
      does not return `(logits, features)` itself; its input is the
      features. None: the network returns them, and its head is "fc".
    apply_kwargs: keyword arguments of every call of the network, e.g.
      `{"train": False}` for a `__call__(x, train)` that requires it
      (`line_jax.models.feature_apply`); None: none.
    config: the line_jax checkpoint config that rebuilds `model` (a
      registered network: `from_checkpoint`, `from_torch` set it), what
      `save` writes; None for a network of your own. Not part of `key`.
  """

  model: Any
  variables: Any
  mean: tuple[float, ...]
  std: tuple[float, ...]
  preprocess: Any = None
  head: str | None = None
  apply_kwargs: Mapping[str, Any] | None = None
  config: Mapping[str, Any] | None = dataclasses.field(default=None, repr=False)

  def __post_init__(self):
    # The same numbers in a list, tuple or array are one normalisation.
    for name in ("mean", "std"):
      object.__setattr__(self, name, tuple(float(x) for x in np.ravel(getattr(self, name))))
    if len(self.mean) != len(self.std):
      raise ValueError(f"mean has {len(self.mean)} channels and std {len(self.std)}")
    if self.apply_kwargs is not None:
      if not isinstance(self.apply_kwargs, Mapping):
        raise TypeError(f"apply_kwargs must be a mapping, e.g. {{'train': False}}, got "
                        f"{type(self.apply_kwargs).__name__}")
      # A read-only copy: the caller's dict changing later must not change `key`'s features.
      object.__setattr__(self, "apply_kwargs",
                         types.MappingProxyType(dict(self.apply_kwargs)) or None)

  @classmethod
  def from_checkpoint(cls, path: str | os.PathLike) -> "Backbone":
    """A line_jax checkpoint folder (`line_jax.models.save_checkpoint`): its
    model, weights, normalisation, input shape and head ("head" in its config)."""
    from line_jax import data  # pylint: disable=g-import-not-at-top
    from line_jax import models  # pylint: disable=g-import-not-at-top
    model, variables, config = models.load_checkpoint(path)
    if "mean" not in config or "std" not in config:
      raise ValueError(f"{path}/config.json has no 'mean' and 'std': "
                       "the normalisation the model was trained with is unknown")
    height, width, channels = config["input_shape"]
    if height != width:
      raise ValueError(f"the model takes {height}x{width} inputs; only square crops are made")
    return cls(model, variables, config["mean"], config["std"],
               data.Preprocess(image_size=height, resize_size=config.get("resize_size"),
                               channels=channels), config.get("head"), config=config)

  @classmethod
  def from_torch(cls, path: str | os.PathLike, arch: str, *,
                 normalization: str | None = None) -> "Backbone":
    """A PyTorch `state_dict` of registered network `arch`
    (`line_jax.models.registry`: torchvision's "resnet18" ... "resnet152",
    DICE's "densenet100", "resnet18_cifar", "resnet_small"), read without
    pickle; its classes are those of the checkpoint's head.

    Args:
      path: the file `torch.save` wrote (a bare state_dict, or one under
        "state_dict").
      arch: the network it holds.
      normalization: a `line_jax.data.MEAN_STD` key; None: what `arch`'s
        published checkpoints were trained with (`TORCH_INPUTS`).

    Inputs are made as torchvision's evaluation transforms make them: an
    ImageNet network's images resized to 256 and center-cropped to 224, a
    CIFAR network's to 32.
    """
    from line_jax import data  # pylint: disable=g-import-not-at-top
    from line_jax import models  # pylint: disable=g-import-not-at-top
    if arch not in TORCH_INPUTS:
      raise ValueError(f"unknown --arch {arch!r}; the PyTorch import supports "
                       f"{', '.join(sorted(TORCH_INPUTS))}")
    default, (size, resize, channels) = TORCH_INPUTS[arch]
    normalization = normalization or default
    if normalization not in data.MEAN_STD:
      raise ValueError(f"unknown normalization {normalization!r}; known: "
                       f"{', '.join(data.MEAN_STD)}")
    state_dict = models.read_torch_state_dict(path)
    num_classes = models.torch_num_classes(state_dict, source=os.fspath(path))
    model = models.get_model(arch, num_classes)
    variables = models.variables_from_state_dict(model, state_dict, models.input_shapes[arch],
                                                 source=os.fspath(path))
    mean, std = data.MEAN_STD[normalization]
    config = {"model": arch, "num_classes": num_classes, "input_shape": [size, size, channels],
              "mean": list(mean), "std": list(std), "normalization": normalization,
              "resize_size": resize, "imported_from": os.path.abspath(os.fspath(path))}
    return cls(model, variables, mean, std, data.Preprocess(size, resize, channels),
               config=config)

  def save(self, path: str | os.PathLike, **record: Any) -> None:
    """Writes this network as a line_jax checkpoint folder (orbax weights and
    `config.json`, `line_jax.models.save_checkpoint`) that `from_checkpoint`
    and every CLI's `--checkpoint` read; `record` adds keys to its config
    (e.g. `classes=[...]`).

    Raises:
      ValueError: for a network of your own (no `config`): save its
        variables with `line_jax.models.save_checkpoint` and a registered
        model name, or export the detector (`line_jax.detector`).
    """
    from line_jax import models  # pylint: disable=g-import-not-at-top
    if self.config is None:
      raise ValueError("this Backbone's network is not a registered line_jax model (no "
                       "config): export it instead (Detector.export), which needs no model code")
    models.save_checkpoint(path, self.variables, {**self.config, **record})

  def head_params(self) -> tuple[Any, Any]:
    """`(kernel [features, classes], bias [classes] or None)` of the network."""
    from line_jax import models  # pylint: disable=g-import-not-at-top
    return models.head_params(self.model if self.variables is None else self.variables,
                              head=self.head or "fc")

  @property
  def input_shape(self) -> tuple[int, int, int]:
    """`(H, W, C)` of the network's input: the preprocessing's crop and channels."""
    if self.preprocess is None:
      raise ValueError("this Backbone has no preprocess, so no input shape")
    p = self.preprocess
    return (p.image_size, p.image_size, p.channels)

  @property
  def num_classes(self) -> int:
    return int(np.shape(self.head_params()[0])[1])

  @functools.cached_property
  def key(self) -> str:
    """The digest of what turns a record into features (`cache`): the
    module's description, every variable, normalisation, head, preprocessing,
    apply kwargs."""
    if self.preprocess is None:
      raise ValueError("this Backbone has no preprocess, so no cache key")
    numbers = [[float(np.float32(x)) for x in v] for v in (self.mean, self.std)]
    p = self.preprocess
    steps = [p.image_size, p.resize_size or p.image_size, p.channels, p.fast_decode]
    parts = [repr(self.model), self.variables, numbers, steps, self.head]
    if self.apply_kwargs:  # Only then, so keys of backbones without them stay as they were.
      # Pairs, not the dict: a pytree's leaves are its values, and the names matter too.
      parts.append([[k, v] for k, v in sorted(self.apply_kwargs.items())])
    return cache.fingerprint(*parts)

  def batches(self, source: Sequence, batch_size: int, *, workers: int | None = None,
              skip_bad_images: bool = False):
    """The grain pipeline over `source`, preprocessed for this network
    (`line_jax.data.image_batches`; `skip_bad_images` drops the images that
    cannot be decoded, listed in its `skipped`)."""
    from line_jax import data  # pylint: disable=g-import-not-at-top
    if self.preprocess is None:
      raise ValueError("this Backbone has no preprocess: it takes ready uint8 batches only")
    return data.image_batches(source, self.preprocess, batch_size=batch_size, workers=workers,
                              skip_bad_images=skip_bad_images)

  def run(self, batches: Iterable[tuple[Any, ...]], *, progress: bool | str = False,
          total: int | None = None, batch_size: int | None = None, mesh=None, dtype=None):
    """`(logits, features, *rest)` of each `(images, *rest)` batch, in order, each
    computed at `batch_size` rows (None: the first batch's) by the one
    extraction loop (`line_jax.features.iter_extract_batches`)."""
    model, variables, head = self.model, self.variables, self.head
    if self.apply_kwargs:
      # The loop builds its apply from (model, variables, head) alone: hand it one
      # built here with the kwargs, which it takes as it is.
      from line_jax import models  # pylint: disable=g-import-not-at-top
      typed = _extract._with_dtype(model, dtype)  # pylint: disable=protected-access
      model, variables = models.feature_apply(typed, variables, head=head,
                                              apply_kwargs=self.apply_kwargs)
      head = dtype = None
    return _extract.iter_extract_batches(
        model, variables, batches, mean=self.mean, std=self.std, mesh=mesh,
        dtype=dtype, progress=progress, total=total, head=head, batch_size=batch_size)

  def stream(self, batches, *, progress: bool | str = False) -> "FeatureStream":
    """This network's features over re-iterable `(images, labels)` batches:
    what `Scorer.fit_from_batches` takes, and over an `ImageBatches`
    pipeline the resumable stream `python -m line_jax.fit` folds."""
    return FeatureStream(self, batches, progress=progress)

  def read(self, source: Sequence, *, cache_dir: str | os.PathLike,
           batch_size: int = _extract.IMAGES_PER_CALL,
           workers: int | None = None, scratch: str | os.PathLike | None = None,
           description: str = "", progress: bool | str = False,
           skip_bad_images: bool = False) -> cache.CachedSet:
    """This network's features of `source`, memory-mapped: from the cache in
    `cache_dir` where it holds them, else through the pipeline and the
    network into it. A source the cache cannot key (a Sequence of your own)
    is extracted into `scratch` (default: `cache_dir`) under a key of this
    call alone. `skip_bad_images` drops the images that cannot be decoded
    (`CachedSet.skipped`), under a key of its own."""
    key, folder = cache.key(self.key, source, skip_bad_images=skip_bad_images), cache_dir
    if key is None:
      key = cache.fingerprint(self.key, [repr(source), os.getpid(), time.time_ns()])
      folder = scratch or cache_dir
    # A set smaller than a batch is one batch of its own size.
    batches = self.batches(source, max(1, min(batch_size, len(source))), workers=workers,
                           skip_bad_images=skip_bad_images)
    return cache.extract(self, batches, len(source),
                         folder=folder, key=key, description=description or repr(source),
                         progress=progress)


# arch -> (default `data.MEAN_STD` key, (crop, resize or None, channels)) of the
# networks `Backbone.from_torch` imports: what their published checkpoints take.
TORCH_INPUTS: dict[str, tuple[str, tuple[int, int | None, int]]] = {
    **{f"resnet{depth}": ("imagenet2012", (224, 256, 3)) for depth in (18, 34, 50, 101, 152)},
    "densenet100": ("cifar_line", (32, None, 3)),
    "resnet18_cifar": ("cifar10", (32, None, 3)),
    "resnet_small": ("fashion_mnist", (28, None, 1)),
}


class FeatureStream:
  """A backbone's features over re-iterable `(images, labels)` batches.

  Iterating gives `(features [b, m], labels [b] or None)` batches, the
  network run afresh on each pass (memory: a few batches, whatever the
  set's size), as `Scorer.fit_from_batches` takes them. Over an
  `ImageBatches` pipeline it is also a resumable `line_jax.resumable.Stream`:
  `batches(position)` yields `(features, labels, position)`, the position
  the pipeline's (grain's), taken as each batch of images is read, so it
  resumes after the last batch whose features were folded.

  Over a pipeline that skips bad images (`skip_bad_images=True`),
  `num_samples` (its records) is an upper bound, `skipped` lists the records
  dropped, and `batches` yields every batch of the pipeline, empty where
  all of its images were dropped; its position also carries the records
  dropped before it, so that a resumed stream's `skipped` is complete. The
  pipeline is then read by this stream alone.
  """

  def __init__(self, backbone: Backbone, batches, *, progress: bool | str = False):
    self._backbone, self._batches, self._progress = backbone, batches, progress
    self.num_samples = getattr(batches, "num_records", None)
    self.num_batches = len(batches) if hasattr(batches, "__len__") else None
    self.stored = None
    self._skips = bool(getattr(batches, "skip_bad_images", False))
    self._resumed = ()  # Records dropped before the position `batches` resumed from.

  @property
  def skipped(self):
    """The `data.SkippedImage`s dropped so far, by index; None where the
    pipeline drops nothing (no `skip_bad_images`)."""
    if not self._skips:
      return None
    return tuple(sorted({s.index: s for s in (*self._resumed,
                                              *self._batches.skipped)}.values()))

  def __iter__(self):
    for _, features, labels in self._backbone.run(self._batches, progress=self._progress,
                                                  total=self.num_samples):
      yield features, None if labels is None else np.asarray(labels)

  def batches(self, position=None):
    if self._skips:
      yield from self._skipping(position)
      return
    iterator = self._batches.iterator(position)
    pulled = ((images, labels, self._batches.position(iterator)) for images, labels in iterator)
    # Every batch at the pipeline's batch size, wherever the stream resumes.
    for _, features, labels, after in self._backbone.run(pulled,
                                                         batch_size=self._batches.batch_size):
      yield features, np.asarray(labels, np.int32), after

  def _skipping(self, position):
    """`batches` over a pipeline that skips bad images: positions
    `{"pipeline": its position, "skipped": [SkippedImage, ...]}`."""
    from line_jax import data  # pylint: disable=g-import-not-at-top
    position = position or {}
    self._resumed = tuple(data.SkippedImage(*s) for s in position.get("skipped", ()))
    pipeline, size = self._batches, self._batches.batch_size
    iterator = pipeline.iterator(position.get("pipeline"))

    def where():  # JSON-able: the SkippedImages are (index, path, error) lists there.
      return {"pipeline": pipeline.position(iterator), "skipped": self.skipped}

    pulled = ((images, labels, where()) for images, labels in iterator)
    done = -(-(position.get("pipeline") or {}).get("next_record", 0) // size)
    for _, features, labels, after in self._backbone.run(pulled, batch_size=size):
      batch = -(-after["pipeline"]["next_record"] // size)
      yield from self._dropped(done, batch - 1, after)
      yield features, np.asarray(labels, np.int32), after
      done = batch
    yield from self._dropped(done, self.num_batches, where())

  def _dropped(self, done: int, stop: int, after):
    """Empty batches for the pipeline's batches `done + 1 ... stop`, whose
    every image was dropped (the pipeline yields none for them)."""
    if stop <= done:
      return
    width = int(np.shape(self._backbone.head_params()[0])[0])
    for batch in range(done + 1, stop + 1):
      record = min(batch * self._batches.batch_size, self.num_samples)
      yield (np.zeros((0, width), np.float32), np.zeros((0,), np.int32),
             {**after, "pipeline": {**after["pipeline"], "next_record": record}})
