"""Train an in-distribution classifier with optax, saved as an orbax checkpoint.

    variables, metrics = train.train(train.TrainConfig(epochs=5), images, labels)
    train.run(train.TrainConfig(dataset="path/to/imagefolder", image_size=32), "ckpt/")

What `python -m line_jax.train` runs, on any data set every CLI names
(`line_jax.data.open_source`), read into memory once; the test split, where
there is one, is scored at the end. Normalisation: the published statistics
of a known set (`line_jax.data.MEAN_STD`), else the training images'. AdamW
with warmup and cosine decay reached 92.5 % on Fashion-MNIST with
`resnet_small` in 5 epochs (a GPU trial); a seed fixes every bit. The
checkpoint's config records the class names where the data set has them
(a folder's class subfolders, Fashion-MNIST's), which the other CLIs check a
folder's against; with `skip_bad_images`, images that cannot be decoded are
left out and listed there ("skipped_images").
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from line_jax import _progress
from line_jax import data
from line_jax import features
from line_jax import layout
from line_jax import models
from line_jax.data import MEAN_STD
from line_jax.models import get_model
from line_jax.runs._shared import check_out
from line_jax.runs._shared import check_positive
from line_jax.runs._shared import has_keys
from line_jax.runs._shared import report_skipped
from line_jax.runs._shared import Runtime
from line_jax.runs._shared import skipped_records

# Pixels an image may move in each direction (zero padding, random crop).
MAX_SHIFT = 2
# What `models.save_checkpoint` writes, and the file that shows it did.
OWN_FILES = ("config.json", "variables")
OWN_MARKS = {"config.json": has_keys("model", "num_classes", "input_shape")}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything that determines a run; saved as the checkpoint's config.

  Attributes:
    model: a `line_jax.models` registry name.
    num_classes: outputs of the head.
    dataset: the data set's name (as `--dataset` takes it), recorded in the
      config.
    epochs: passes over the training set.
    batch_size: images per step; the last partial batch of an epoch is
      dropped so every step has one shape (one compilation).
    lr: peak learning rate, reached after the warmup.
    warmup_fraction: share of all steps spent warming up linearly from 0.
    weight_decay: AdamW's decoupled weight decay.
    seed: seeds initialisation, shuffling and augmentation.
    mean: per-channel normalisation mean, in [0, 1] pixel units.
    std: per-channel normalisation standard deviation.
    model_kwargs: further model attributes, e.g. `{"num_filters": 8}`.
    image_size: `run` resizes and center-crops to this square (None: the
      images as stored).
    channels: `run` reads 1 (gray) or 3 (RGB) channels (None: the first
      image's).
    max_examples: `run` reads this many images of each split by the subset
      rule (`data.subset_of`: every class in proportion, evenly spaced).
    skip_bad_images: `run` leaves out the images that cannot be decoded
      (listed in the checkpoint's config) instead of stopping at the first.
  """

  model: str = "resnet_small"
  num_classes: int = 10
  dataset: str = "fashion_mnist"
  epochs: int = 5
  batch_size: int = 128
  lr: float = 3e-3
  warmup_fraction: float = 0.1
  weight_decay: float = 5e-4
  seed: int = 0
  mean: tuple[float, ...] = MEAN_STD["fashion_mnist"][0]
  std: tuple[float, ...] = MEAN_STD["fashion_mnist"][1]
  model_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
  image_size: int | None = None
  channels: int | None = None
  max_examples: int | None = None
  skip_bad_images: bool = False


class TrainState(train_state.TrainState):
  batch_stats: Any


def _as_nhwc(images: np.ndarray) -> np.ndarray:
  """uint8 `[N, H, W]` (grayscale) or `[N, H, W, C]` -> `[N, H, W, C]`."""
  images = np.asarray(images)
  return images[..., None] if images.ndim == 3 else images


def _normalize(images: jax.Array, mean: jax.Array, std: jax.Array):
  return (images.astype(jnp.float32) / 255.0 - mean) / std


def augment(key: jax.Array, images: jax.Array) -> jax.Array:
  """Random horizontal flips and shifts of up to `MAX_SHIFT` pixels.

  Args:
    key: a PRNG key.
    images: `[batch, height, width, channels]` raw pixels (any dtype); the
      border that a shift uncovers is 0, Fashion-MNIST's background.

  Returns:
    `[batch, height, width, channels]`, same dtype.
  """
  batch, height, width, _ = images.shape
  flip_key, shift_key = jax.random.split(key)
  flip = jax.random.bernoulli(flip_key, 0.5, (batch,))
  images = jnp.where(flip[:, None, None, None], images[:, :, ::-1], images)
  pad = MAX_SHIFT
  padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  offsets = jax.random.randint(shift_key, (batch, 2), 0, 2 * pad + 1)

  def crop(image, offset):
    return jax.lax.dynamic_slice(
        image, (offset[0], offset[1], 0), (height, width, image.shape[-1]))

  return jax.vmap(crop)(padded, offsets)


# Built once at module level: every caller (and every test) shares the
# compilation, keyed on the model held in `state.apply_fn`.
@layout.network_jit
def train_step(state: TrainState, images: jax.Array, labels: jax.Array,
               key: jax.Array, mean: jax.Array, std: jax.Array):
  """One AdamW step on an augmented batch.

  Args:
    state: parameters, BatchNorm statistics and optimiser state.
    images: uint8 `[batch, height, width, channels]`.
    labels: int `[batch]`.
    key: augmentation key for this step.
    mean: `[channels]` normalisation mean; std: `[channels]`.

  Returns:
    `(state, loss)`: the updated state and the scalar batch loss before it.
  """
  x = _normalize(augment(key, images), mean, std)

  def loss_fn(params):
    (logits, _), updates = state.apply_fn(
        {"params": params, "batch_stats": state.batch_stats}, x, train=True,
        mutable=["batch_stats"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return loss.mean(), updates

  (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  state = state.apply_gradients(grads=grads,
                                batch_stats=updates["batch_stats"])
  return state, loss


def accuracy(model: nn.Module, variables: Any, images: np.ndarray,
             labels: np.ndarray, mean: Sequence[float], std: Sequence[float],
             batch_size: int = 512) -> float:
  """Top-1 accuracy with BatchNorm's running statistics.

  Args:
    model: the Flax module.
    variables: its `{"params", "batch_stats"}`.
    images: uint8 `[N, height, width]` or `[N, height, width, channels]`.
    labels: int `[N]`.
    mean, std: per-channel normalisation, as in `TrainConfig`.
    batch_size: images per forward pass; the last batch is padded (and
      masked) so every pass has one shape.

  Returns:
    The fraction of `labels` predicted correctly.
  """
  images, labels = _as_nhwc(images), np.asarray(labels, np.int32)
  if len(labels) == 0:
    raise ValueError("cannot evaluate on an empty set")
  # The shared batched forward pass (padded last batch, one compilation).
  logits, _ = features.extract(model, variables, images, mean=mean, std=std,
                               batch_size=min(batch_size, len(labels)), progress=False)
  return float(np.mean(np.argmax(logits, axis=-1) == labels))


def create_state(config: TrainConfig, input_shape: Sequence[int],
                 total_steps: int) -> TrainState:
  """Initialises the model (from `config.seed`) and AdamW with its schedule."""
  model = get_model(config.model, config.num_classes, **config.model_kwargs)
  init_key = jax.random.fold_in(jax.random.key(config.seed), 0)
  variables = model.init(init_key, jnp.zeros((1, *input_shape), jnp.float32))
  warmup = max(1, round(config.warmup_fraction * total_steps))
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, config.lr, warmup, max(total_steps, warmup + 1))
  tx = optax.adamw(schedule, weight_decay=config.weight_decay)
  return TrainState.create(apply_fn=model.apply, params=variables["params"],
                           batch_stats=variables["batch_stats"], tx=tx)


def train(config: TrainConfig, train_images: np.ndarray,
          train_labels: np.ndarray, test_images: np.ndarray | None = None,
          test_labels: np.ndarray | None = None, *,
          max_steps: int | None = None, progress: bool = True,
          on_images: Callable[[int], None] | None = None):
  """Trains a classifier from scratch.

  Args:
    config: the run's settings.
    train_images: uint8 `[N, height, width]` or `[N, height, width, channels]`.
    train_labels: int `[N]` in `[0, config.num_classes)`.
    test_images, test_labels: evaluated once at the end; None skips it.
    max_steps: stop after this many steps (tests, smoke runs); the schedule
      still spans `config.epochs`.
    progress: report images trained on, with rate and ETA (a bar on a
      terminal, plain lines in a log).
    on_images: called with the images of each step instead (then `progress`
      is ignored).

  Returns:
    `(variables, metrics)`: `{"params", "batch_stats"}` as NumPy arrays, and
    a dict with `losses` (one float per step), `final_loss`, `steps` and,
    if test data was given, `test_accuracy`.
  """
  images = _as_nhwc(train_images)
  labels = np.asarray(train_labels, np.int32)
  if len(images) != len(labels):
    raise ValueError(f"{len(images)} images but {len(labels)} labels")
  if labels.size and (labels.min() < 0 or labels.max() >= config.num_classes):
    raise ValueError(f"labels must lie in [0, {config.num_classes})")
  steps_per_epoch = len(labels) // config.batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"{len(labels)} training images is less than one batch "
                     f"of {config.batch_size}")
  total_steps = steps_per_epoch * config.epochs
  num_steps = total_steps if max_steps is None else min(max_steps, total_steps)
  state = create_state(config, images.shape[1:], total_steps)
  mean = jnp.asarray(config.mean, jnp.float32)
  std = jnp.asarray(config.std, jnp.float32)
  rng = np.random.default_rng(config.seed)
  aug_key = jax.random.fold_in(jax.random.key(config.seed), 1)
  # Losses stay on the device until the end: reading one each step would
  # make the host wait for the device every step.
  losses = []
  with _progress.counting(num_steps * config.batch_size, "train", unit="img",
                          enabled=progress and on_images is None) as bar:
    on_images = on_images or bar
    step = 0
    while step < num_steps:
      order = rng.permutation(len(labels))
      for i in range(steps_per_epoch):
        if step == num_steps:
          break
        idx = order[i * config.batch_size:(i + 1) * config.batch_size]
        state, loss = train_step(state, images[idx], labels[idx],
                                 jax.random.fold_in(aug_key, step), mean, std)
        losses.append(loss)
        step += 1
        on_images(config.batch_size)
  variables = jax.device_get({"params": state.params,
                              "batch_stats": state.batch_stats})
  losses = [float(x) for x in jax.device_get(losses)]
  metrics = {"losses": losses, "final_loss": losses[-1], "steps": num_steps}
  if test_images is not None:
    model = get_model(config.model, config.num_classes, **config.model_kwargs)
    metrics["test_accuracy"] = accuracy(model, variables, test_images,
                                        test_labels, config.mean, config.std)
  return variables, metrics


def checkpoint_config(config: TrainConfig, input_shape: Sequence[int],
                      metrics: dict[str, Any],
                      classes: Sequence[str] | None = None) -> dict[str, Any]:
  """The JSON dict saved beside the weights: settings plus results, and the
  class names (label `i` at `i`) where they are known."""
  record = dataclasses.asdict(config)
  record["input_shape"] = [int(d) for d in input_shape]
  record["mean"], record["std"] = list(config.mean), list(config.std)
  record.update({k: v for k, v in metrics.items() if k != "losses"})
  if classes is not None:
    record["classes"] = [str(c) for c in classes]
  return record


def read_images(source, *, image_size: int | None = None, channels: int | None = None,
                workers: int | None = None, quiet: bool = True, desc: str = "read",
                skip_bad_images: bool = False, skipped: list | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
  """A source's images and labels in memory: uint8 `[N, H, W, C]`, int32 `[N]`.

  Args:
    source: a random-access source (`line_jax.data`, `data.open_source`), or
      a `data.Subset` of one (`data.subset_of`).
    image_size: resize the shorter side and center-crop to this square
      (torchvision's Resize + CenterCrop); None keeps the images as they are
      (they must then share one size).
    channels: 1 (grayscale) or 3 (RGB); None is the first image's.
    workers: decoding threads of the grain pipeline.
    quiet: no progress output.
    desc: what the progress output calls this read.
    skip_bad_images: leave out the images that cannot be decoded (`N` is
      then those kept) instead of stopping at the first.
    skipped: a list that gets the `data.SkippedImage`s left out.

  Raises:
    ValueError: for an empty source, images of several sizes and no
      `image_size`, or, without `skip_bad_images`, an image that cannot be
      decoded (`data.BadImageError`, naming it).
  """
  n = len(source)
  if n == 0:
    raise ValueError(f"{source!r} holds no image")
  if channels is None:
    channels = _first_channels(source, skip_bad_images)
  whole, rows = ((source.source, source.indices) if isinstance(source, data.Subset)
                 else (source, slice(None)))
  images = getattr(whole, "images", None)
  if images is not None and image_size is None and _channels(images[0]) == channels:
    # Pixels already in memory (or memory-mapped), in the right mode.
    return _as_nhwc(np.asarray(images[rows])), np.asarray(whole.labels[rows], np.int32)
  batches = data.image_batches(source, data.Preprocess(image_size=image_size, channels=channels),
                               batch_size=256, workers=workers, skip_bad_images=skip_bad_images)
  parts, labels = [], []
  with _progress.counting(n, desc, enabled=not quiet) as on_batch:
    try:
      for batch_images, batch_labels in batches:  # Shorter where images were left out.
        parts.append(np.asarray(batch_images))
        labels.append(np.asarray(batch_labels))
        on_batch(len(batch_labels))
    except ValueError as e:
      if image_size is None and "shape" in str(e) and not isinstance(e, data.BadImageError):
        raise ValueError(f"the images of {source!r} differ in size; pass --image-size "
                         "to resize and crop them to one") from e
      raise
  if skipped is not None:
    skipped.extend(batches.skipped)
  if not parts:
    raise ValueError(f"no image of {source!r} could be decoded")
  return np.concatenate(parts), np.concatenate(labels).astype(np.int32)


def _first_channels(source, skip_bad_images: bool) -> int:
  """`_channels` of the first record that opens (with `skip_bad_images`) or of the first."""
  for index in range(len(source)):
    image = source[index][0]
    try:
      return _channels(image)
    except (OSError, SyntaxError, ValueError) as e:  # What Pillow raises on a bad file.
      if not skip_bad_images:
        raise data.BadImageError(
            f"cannot decode image file {os.fspath(image)}: {e}; {data.SKIP_HINT}") from e
  raise ValueError(f"no image of {source!r} could be decoded")


def _channels(image) -> int:
  """1 or 3: the mode a record's image (pixels or a file) converts to."""
  if isinstance(image, (str, os.PathLike)):
    import PIL.Image  # pylint: disable=g-import-not-at-top
    with PIL.Image.open(image) as pil:
      return 1 if pil.mode in ("1", "L", "I", "I;16", "F") else 3
  image = np.asarray(image)
  return 1 if image.ndim == 2 or image.shape[-1] == 1 else 3


def has_split(spec: str, split: str) -> bool:
  """Whether `spec` names a `split` of its own: a folder needs `SPLIT/` in it.

  (`open_source` reads the whole folder for any split of a folder without
  one, which would test on the training images.)
  """
  if os.path.isdir(spec):
    return os.path.isdir(os.path.join(spec, split))
  return True


def mean_std(spec: str, images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Per-channel normalisation: `MEAN_STD`'s for a known set, else `images`'.

  Args:
    spec: the data set's name: 'fashion_mnist' and 'tfds:NAME' with NAME in
      `MEAN_STD` use the published values.
    images: uint8 `[N, H, W, C]` training images.

  Returns:
    `(mean, std)` in [0, 1] pixel units, `C` values each (rounded to 4
    decimals, as the published ones are).
  """
  name = spec.removeprefix("tfds:")
  if not os.path.isdir(spec) and name in MEAN_STD:
    return MEAN_STD[name]
  total = np.zeros(images.shape[-1]), np.zeros(images.shape[-1])
  for start in range(0, len(images), 4096):  # float64 sums without a float copy of it all
    chunk = images[start:start + 4096].reshape(-1, images.shape[-1]).astype(np.float64) / 255
    total = total[0] + chunk.sum(0), total[1] + (chunk * chunk).sum(0)
  count = images.size // images.shape[-1]
  mean = total[0] / count
  std = np.sqrt(np.maximum(total[1] / count - mean * mean, 0.0))
  if np.any(std == 0):
    raise ValueError(f"the training images of {spec!r} are constant in a channel")
  return tuple(round(float(m), 4) for m in mean), tuple(round(float(v), 4) for v in std)


def load_dataset(spec: str, *, image_size: int | None = None, channels: int | None = None,
                 limit: int | None = None, workers: int | None = None, quiet: bool = True,
                 skip_bad_images: bool = False, found: dict | None = None):
  """`(train_images, train_labels, test_images, test_labels)` of `spec`.

  `spec` is a data set name as every CLI takes it (`data.open_source`);
  the test pair is None where `spec` has no test split (`has_split`).
  Images are uint8 `[N, H, W, C]` (`read_images`); `limit` takes that many
  of each split by the one subset rule (`data.subset_of`), not the first.
  `skip_bad_images` leaves out the images that cannot be decoded; `found`,
  a dict, gets what reading learned: "classes" (the class names, where the
  data set names them) and "skipped" (`{split: [{"index", "path", "error"},
  ...]}`, the images left out, by index in the split).
  """
  kwargs = dict(image_size=image_size, channels=channels, workers=workers, quiet=quiet,
                skip_bad_images=skip_bad_images)
  found = {} if found is None else found
  source = data.open_source(spec, "train")
  found["classes"] = class_names(spec, source)
  known = data.known_labels(source)  # Folders and arrays know them before decoding.
  if known is not None:
    _check_labelled(spec, known)
  train_source, dropped = data.subset_of(source, limit), []
  train_x, train_y = read_images(train_source, desc="read train", skipped=dropped, **kwargs)
  found["skipped"] = {"train": skipped_records(train_source, dropped)}
  _check_labelled(spec, train_y)
  if known is not None and np.unique(train_y).size < np.unique(known).size:
    # Fewer images than classes: the model would not know (or count) the others.
    raise ValueError(f"--max-examples {limit} keeps {np.unique(train_y).size} of the "
                     f"{np.unique(known).size} classes of {spec!r}; use at least "
                     f"{np.unique(known).size}")
  if not has_split(spec, "test"):
    return train_x, train_y, None, None
  kwargs["channels"] = train_x.shape[-1]
  test_source, dropped = data.subset_of(data.open_source(spec, "test"), limit), []
  test_x, test_y = read_images(test_source, desc="read test", skipped=dropped, **kwargs)
  found["skipped"]["test"] = skipped_records(test_source, dropped)
  return train_x, train_y, test_x, test_y


def class_names(spec: str, source) -> tuple[str, ...] | None:
  """The class names of data set `spec` (its training `source`), label `i` at
  `i`: a folder's class subfolders, Fashion-MNIST's; None where unknown."""
  if spec == "fashion_mnist":
    return tuple(data.FASHION_MNIST_CLASSES)
  return getattr(source, "classes", None) or None


def _check_labelled(spec: str, labels: np.ndarray) -> None:
  if labels.size and labels.min() < 0:
    raise ValueError(f"dataset {spec!r} has no labels: training needs class subfolders "
                     "(or labels.npy)")


def run(config: TrainConfig, workdir: str | os.PathLike, *,
        runtime: Runtime = Runtime()) -> dict[str, Any]:
  """Reads `config.dataset`, trains, and saves the checkpoint to `workdir`.

  `config.num_classes`, `mean` and `std` are replaced by the data set's (its
  largest label + 1; `mean_std`), and `config.dataset` by its absolute path
  where it is a folder.

  Args:
    config: the model and its training settings.
    workdir: the checkpoint folder (`models.save_checkpoint`): new, empty,
      or a checkpoint this run replaces once it is trained (atomically);
      any other content is refused before training.
    runtime: decoding threads and progress output.

  Returns:
    The training metrics (`train`'s), as saved in the checkpoint's config
    (with `skip_bad_images`, "skipped_images": `{split: [{"index", "path",
    "error"}, ...]}`).
  """
  check_out(workdir, OWN_FILES, marks=OWN_MARKS)  # Before training, not after.
  check_positive(epochs=config.epochs, batch_size=config.batch_size,
                 max_examples=config.max_examples, image_size=config.image_size)
  dataset = os.path.abspath(config.dataset) if os.path.isdir(config.dataset) else config.dataset
  found = {}
  train_x, train_y, test_x, test_y = load_dataset(
      dataset, image_size=config.image_size, channels=config.channels,
      limit=config.max_examples, workers=runtime.workers, quiet=not runtime.progress,
      skip_bad_images=config.skip_bad_images, found=found)
  if config.skip_bad_images:
    report_skipped(found["skipped"])  # Now, not after hours of training.
  mean, std = mean_std(dataset, train_x)
  config = dataclasses.replace(config, num_classes=int(np.max(train_y)) + 1, dataset=dataset,
                               mean=tuple(mean), std=tuple(std))
  variables, metrics = train(config, train_x, train_y, test_x, test_y,
                             progress=runtime.progress)
  if config.skip_bad_images:
    metrics["skipped_images"] = found["skipped"]
  classes = found["classes"]
  # A class whose every image was left out is not one the model learnt.
  classes = classes if classes and len(classes) == config.num_classes else None
  save(workdir, variables, checkpoint_config(config, train_x.shape[1:], metrics, classes))
  return metrics


def save(workdir: str | os.PathLike, variables: Any, config: dict[str, Any]) -> None:
  """`models.save_checkpoint` into a fresh folder beside `workdir`, then renamed
  onto it: a reader sees the old checkpoint or the whole new one, never half."""
  workdir = os.path.abspath(os.fspath(workdir))
  parent, name = os.path.split(workdir)
  os.makedirs(parent, exist_ok=True)
  check_out(workdir, OWN_FILES, marks=OWN_MARKS)  # Again: training took a while.
  scratch = tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=parent)
  try:
    new = os.path.join(scratch, "new")
    models.save_checkpoint(new, variables, config)
    if os.path.isdir(workdir) and os.listdir(workdir):
      os.replace(workdir, os.path.join(scratch, "old"))  # Removed below, with the scratch.
    os.replace(new, workdir)  # Onto a missing or empty folder.
  finally:
    shutil.rmtree(scratch, ignore_errors=True)
