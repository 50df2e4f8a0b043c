"""From images to decisions: a network, a scorer, its fit and a threshold.

    backbone = features.Backbone.from_torch("resnet18.pth", "resnet18")
    det = Detector.fit(backbone, data.open_source("train_folder"), scorer="line")
    det = det.calibrate(held_out_id_images, tpr=0.95)     # the deployment threshold
    out = det.predict(images)          # uint8 [n, H, W, C] -> score, is_ood, pred
    det.save("det/"); det = Detector.load("det/")
    det.export("exported/")            # StableHLO; line_jax.export.load needs no model code

`predict` is one jitted function per model, scorer and bucket: the network,
the scorer and the decision run together on the device, and batches are
padded to `_buckets.bucket` sizes, so a stream of sizes compiles a handful of
times. Every registered scorer works in it (LINe is the default).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
import datetime
import functools
import json
import os
import platform
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from line_jax import _buckets
from line_jax import _progress
from line_jax import _exported
from line_jax import _json
from line_jax import calibration as calibration_lib
from line_jax import features as features_lib
from line_jax import io
from line_jax import layout as layout_lib
from line_jax import models
from line_jax import scorers
from line_jax.features import _extract
from line_jax._exported import Decisions

FORMAT = "line_jax.detector/1"
DETECTOR_FILE = "detector.json"
NETWORK_DIR = "network"
STATE_DIR = "state"
# What `export` lowers for by default: where jax can lower from any machine.
EXPORT_PLATFORMS = ("cpu", "cuda", "tpu")
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")  # What jax.export lowers for.


@dataclasses.dataclass(frozen=True, eq=False)
class Detector:
  """A backbone, a fitted scorer and (once calibrated) a threshold.

  A pytree: its leaves are the network's variables and the scorer's state
  (`jax.device_put`, `jit`, `decide` inside your own `jit`); the network's
  code, normalisation, scorer name and calibration are static.

  Attributes:
    backbone: the network, its variables, normalisation and preprocessing.
    scorer: the registered scorer's name.
    state: its fitted state (`scorers.get(scorer).fit`).
    calibration: the threshold and what it achieved (`calibrate`); None
      before calibration, when `predict` refuses and `scores` still works.
  """

  backbone: features_lib.Backbone
  scorer: str
  state: Any
  calibration: calibration_lib.Calibration | None = None

  def __post_init__(self):
    scorers.get(self.scorer)  # Unknown names fail here, listing the valid ones.
    owner = scorers.name_of(self.state)
    if owner != self.scorer:
      raise TypeError(f"state is {owner!r}'s, not scorer {self.scorer!r}'s")

  # --- fitting ---------------------------------------------------------------------------

  @classmethod
  def fit(cls, backbone: features_lib.Backbone, source: Sequence, *, scorer: str = "line",
          hparams: Mapping[str, Any] | None = None,
          batch_size: int = features_lib.IMAGES_PER_CALL, workers: int | None = None,
          progress: bool | str = False) -> "Detector":
    """Fits `scorer` on `backbone`'s features of `source` (a `line_jax.data`
    source of labelled records: a folder, `open_source(...)`), streamed
    through the grain pipeline in constant memory."""
    kernel, bias = backbone.head_params()
    batches = backbone.batches(source, max(1, min(batch_size, len(source))), workers=workers)
    stream = backbone.stream(batches, progress=progress)
    state = scorers.get(scorer).fit_from_batches(stream, kernel, bias, **dict(hparams or {}))
    return cls(backbone, scorer, state)

  @classmethod
  def fit_features(cls, backbone: features_lib.Backbone, features, labels, *,
                   scorer: str = "line", **hparams) -> "Detector":
    """Fits `scorer` on features `[n, m]` and labels `[n]` you extracted."""
    kernel, bias = backbone.head_params()
    return cls(backbone, scorer, scorers.get(scorer).fit(features, labels, kernel, bias,
                                                          **hparams))

  # --- scoring and deciding --------------------------------------------------------------

  @property
  def threshold(self) -> float | None:
    return None if self.calibration is None else self.calibration.threshold

  def scores(self, images, *, batch_size: int = features_lib.IMAGES_PER_CALL) -> np.ndarray:
    """`[n]` float32 scores of uint8 `images` `[n, H, W, C]` (NaN: a bad input)."""
    return self._decide(images, -np.inf, batch_size).score

  def predict(self, images, *, batch_size: int = features_lib.IMAGES_PER_CALL) -> Decisions:
    """`Decisions(score, is_ood, pred)` of uint8 `images` `[n, H, W, C]`.

    Raises:
      ValueError: before `calibrate` (no threshold), or for images that are
        not uint8 `[n, H, W, C]` at the network's input shape.
    """
    if self.calibration is None:
      raise ValueError("this detector has no threshold: calibrate it on held-out "
                       "in-distribution images first (Detector.calibrate), or use scores()")
    return self._decide(images, self.threshold, batch_size)

  def predict_source(self, source: Sequence, *, batch_size: int = features_lib.IMAGES_PER_CALL,
                     workers: int | None = None, skip_bad_images: bool = False,
                     progress: bool | str = False, threshold: float | None = None):
    """`(Decisions, skipped)` of a `line_jax.data` source's images, decoded
    and preprocessed by the grain pipeline; `skipped` lists the images that
    could not be decoded (with `skip_bad_images`; else the first one raises)."""
    threshold = self.threshold if threshold is None else threshold
    if threshold is None:
      raise ValueError("this detector has no threshold: calibrate it first")
    batches = self.backbone.batches(source, max(1, min(batch_size, len(source))),
                                    workers=workers, skip_bad_images=skip_bad_images)
    parts = []
    label = progress if isinstance(progress, str) else "images"
    with _progress.counting(len(source), label, enabled=bool(progress)) as on_batch:
      for images, _ in batches:
        parts.append(self._decide(images, threshold, batch_size))
        on_batch(len(images))
    skipped = tuple(batches.skipped) if skip_bad_images else ()
    if not parts:
      return Decisions(np.zeros(0, np.float32), np.zeros(0, bool), np.zeros(0, np.int32)), skipped
    return Decisions(*(np.concatenate(column) for column in zip(*parts))), skipped

  def decide(self, images, *, layout: layout_lib.Layout | None = None) -> Decisions:
    """`Decisions` of uint8 `images` `[b, H, W, C]` as JAX arrays, traceable:
    for your own `jit` / `vmap`, where a `Detector` is a pytree
    (`jax.jit(lambda det, x: det.decide(x))(det, images)`); no padding."""
    if self.calibration is None:
      raise ValueError("this detector has no threshold: calibrate it first")
    forward, variables = self._forward()
    mean, std = (jnp.asarray(v, jnp.float32) for v in (self.backbone.mean, self.backbone.std))
    return Decisions(*_decide_body(forward, scorers.get(self.scorer).score_fn, None,
                                   layout_lib.resolve(layout), variables, self.state,
                                   jnp.float32(self.threshold), mean, std, images))

  def _decide(self, images, threshold: float, batch_size: int) -> Decisions:
    images = self._checked_images(images)
    forward, variables = self._forward()
    mean, std = (jnp.asarray(v, jnp.float32) for v in (self.backbone.mean, self.backbone.std))
    layout = layout_lib.default()
    score_fn = scorers.get(self.scorer).score_fn
    pending = []
    for start in range(0, images.shape[0], batch_size):
      n = min(batch_size, images.shape[0] - start)
      # Zero images: their outputs are dropped below.
      chunk = _buckets.pad_images(images[start:start + batch_size])
      per_pass = layout.images_per_pass(chunk.shape[0], *chunk.shape[1:3])
      # Dispatched before any is fetched: the device works while the host pads the next.
      pending.append((n, _decide_jit(forward, score_fn, per_pass, layout, variables,
                                     self.state, jnp.float32(threshold), mean, std, chunk)))
    columns = [[np.asarray(out[i])[:n] for n, out in pending] for i in range(3)]
    if not pending:
      return Decisions(np.zeros(0, np.float32), np.zeros(0, bool), np.zeros(0, np.int32))
    return Decisions(*(np.concatenate(c) for c in columns))

  def _checked_images(self, images) -> np.ndarray:
    images = np.asarray(_extract._as_images(images))  # pylint: disable=protected-access
    _extract._check_images(images, len(self.backbone.mean))  # pylint: disable=protected-access
    if self.backbone.preprocess is not None and self.backbone.preprocess.image_size:
      want = self.backbone.input_shape
      if images.shape[1:] != want:
        raise ValueError(f"images must be [n, {want[0]}, {want[1]}, {want[2]}] for this "
                         f"network, got {images.shape}; resize them "
                         "(line_jax.data.resize_center_crop) or use predict_source")
    return images

  def _forward(self):
    b = self.backbone
    return models.feature_apply(b.model, b.variables, head=b.head,
                                apply_kwargs=b.apply_kwargs or None)

  # --- calibration -----------------------------------------------------------------------

  def calibrate(self, id_images, *, tpr: float = 0.95, ood_images=None, fpr: float | None = None,
                confidence: float = 0.95, batch_size: int = features_lib.IMAGES_PER_CALL,
                progress: bool | str = False) -> "Detector":
    """This detector with a threshold set on held-out ID data.

    Args:
      id_images: uint8 `[n, H, W, C]`, or a `line_jax.data` source, of
        in-distribution inputs the scorer was not fitted on.
      tpr: the share of ID inputs to keep (the field's FPR95 convention: 0.95).
      ood_images: validation OOD inputs (as `id_images`); with `fpr`, the
        threshold keeps at most that share of them instead.
      fpr: the share of OOD inputs to let through (needs `ood_images`).
      confidence: of the reported interval (`calibration.Calibration`).

    Raises:
      ValueError: too few calibration inputs for the rate
        (`calibration.MIN_TAIL`), a NaN score (a bad input), `fpr` without
        `ood_images`.
    """
    if (fpr is None) != (ood_images is None):
      raise ValueError("calibrating at an FPR needs both fpr= and ood_images=")
    id_scores = self._scores_of(id_images, batch_size, progress)
    if fpr is None:
      cal = calibration_lib.at_tpr(id_scores, tpr, confidence=confidence)
    else:
      cal = calibration_lib.at_fpr(id_scores, self._scores_of(ood_images, batch_size, progress),
                                   fpr, confidence=confidence)
    return dataclasses.replace(self, calibration=cal)

  def _scores_of(self, images, batch_size: int, progress) -> np.ndarray:
    if isinstance(images, np.ndarray) or isinstance(images, jax.Array):
      return self.scores(images, batch_size=batch_size)
    decisions, _ = self.predict_source(images, batch_size=batch_size, progress=progress,
                                       threshold=-np.inf)
    return decisions.score

  # --- folders -----------------------------------------------------------------------------

  def save(self, path: str | os.PathLike) -> None:
    """Writes the detector as one folder: `network/` (a line_jax checkpoint),
    `state/` (`line_jax.save`), `detector.json` (scorer, calibration).

    Raises:
      ValueError: an existing folder, or a network of your own (not a
        registered line_jax model; `export` works for any network).
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path):
      raise ValueError(f"{path} already exists; choose a new folder")
    self.backbone.save(os.path.join(path, NETWORK_DIR))
    io.save(os.path.join(path, STATE_DIR), self.state)
    record = {"format": FORMAT, "scorer": self.scorer,
              "calibration": None if self.calibration is None else self.calibration.to_json()}
    with open(os.path.join(path, DETECTOR_FILE), "w") as f:
      json.dump(record, f, indent=2)
      f.write("\n")

  @classmethod
  def load(cls, path: str | os.PathLike) -> "Detector":
    """The detector `save` wrote to `path`."""
    path = os.fspath(path)
    record = _json.read_object(os.path.join(path, DETECTOR_FILE), format=FORMAT,
                               missing=f"{path} is not a saved line_jax detector")
    cal = record.get("calibration")
    return cls(features_lib.Backbone.from_checkpoint(os.path.join(path, NETWORK_DIR)),
               record["scorer"], io.load(os.path.join(path, STATE_DIR)),
               None if cal is None else calibration_lib.Calibration.from_json(cal))

  def export(self, path: str | os.PathLike, *,
             platforms: Sequence[str] = EXPORT_PLATFORMS, **record: Any) -> None:
    """Writes the detector as StableHLO with a symbolic batch size, its weights
    and a manifest (`line_jax._exported`): `line_jax.export.load(path)` runs
    it with jax and numpy alone. `record` adds keys to the manifest.

    Two functions: one for batches that are a multiple of
    `_buckets.SMALLEST` (on a CPU its network runs a few images per pass,
    as `predict`'s does), one for any batch in one pass (`load` calls it
    below 8 images, where padding to 8 would cost 8 networks' time). Both
    score with the accelerator layout (batch-major logits); scores agree
    with `predict`'s to float32 precision.

    Raises:
      ValueError: an existing folder, no calibration, or a platform jax
        cannot lower this detector for (the message names it).
    """
    if self.calibration is None:
      raise ValueError("calibrate the detector before exporting it: the export carries "
                       "its threshold")
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path):
      raise ValueError(f"{path} already exists; choose a new folder")
    unknown = sorted(set(platforms) - set(PLATFORMS))
    if unknown or not platforms:
      raise ValueError(f"cannot export for platforms {', '.join(unknown) or '(none)'}: "
                       f"choose among {', '.join(PLATFORMS)}")
    forward, variables = self._forward()
    leaves, treedef = jax.tree.flatten((variables, self.state))
    leaves = [np.asarray(x, jax.dtypes.canonicalize_dtype(np.asarray(x).dtype)) for x in leaves]
    score_fn = scorers.get(self.scorer).score_fn

    height, width, channels = self.backbone.input_shape
    # On a CPU the network runs a few images per pass (as `predict` does there);
    # on an accelerator the whole batch at once. Batches are bucketed, so a
    # multiple of `_buckets.SMALLEST`, which such a pass divides.
    cpu_pass = layout_lib.CPU.images_per_pass(_buckets.SMALLEST, height, width)

    def decide(weights, mean, std, threshold, images):
      variables, state = jax.tree.unflatten(treedef, weights)

      def run(per_pass, images):
        return _decide_body(forward, score_fn, per_pass, layout_lib.ACCELERATOR, variables,
                            state, threshold, mean, std, images)
      return jax.lax.platform_dependent(images, cpu=functools.partial(run, cpu_pass),
                                        default=functools.partial(run, None))

    def decide_small(weights, mean, std, threshold, images):  # One pass: a few images.
      variables, state = jax.tree.unflatten(treedef, weights)
      return _decide_body(forward, score_fn, None, layout_lib.ACCELERATOR, variables, state,
                          threshold, mean, std, images)

    def lowered(fn, batch):
      channels_arg = jax.ShapeDtypeStruct((channels,), jnp.float32)
      args = ([jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves], channels_arg,
              channels_arg, jax.ShapeDtypeStruct((), jnp.float32),
              jax.ShapeDtypeStruct((batch, height, width, channels), jnp.uint8))
      try:
        return jax.export.export(jax.jit(fn), platforms=tuple(platforms))(*args).serialize()
      except Exception as e:  # jax raises many types for what it cannot lower.
        raise ValueError(f"jax cannot export scorer {self.scorer!r} for platforms "
                         f"{', '.join(platforms)}: {type(e).__name__}: {e}") from e

    functions = {
        _exported.FUNCTION: lowered(
            decide, jax.export.symbolic_shape(f"{_buckets.SMALLEST}*groups")[0]),
        _exported.SMALL_FUNCTION: lowered(decide_small, jax.export.symbolic_shape("n")[0])}
    os.makedirs(path)
    for name, serialized in functions.items():
      with open(os.path.join(path, name), "wb") as f:
        f.write(serialized)
    np.savez(os.path.join(path, _exported.WEIGHTS),
             **{_exported.weight_name(i): x for i, x in enumerate(leaves)})
    with open(os.path.join(path, _exported.MANIFEST), "w") as f:
      json.dump(self._manifest(len(leaves), tuple(platforms), record), f, indent=2)
      f.write("\n")

  def _manifest(self, weights: int, platforms, record: Mapping[str, Any]) -> dict[str, Any]:
    import flax  # pylint: disable=g-import-not-at-top
    import line_jax  # pylint: disable=g-import-not-at-top
    p = self.backbone.preprocess
    height, width, channels = self.backbone.input_shape
    return {
        "format": _exported.FORMAT, "scorer": self.scorer, "threshold": self.threshold,
        "calibration": self.calibration.to_json(), "weights": weights,
        "input": {"height": height, "width": width, "channels": channels,
                  "resize_size": p.resize_size or p.image_size, "dtype": "uint8",
                  "mean": list(self.backbone.mean), "std": list(self.backbone.std),
                  "decode": "Pillow, converted to RGB / L, resized (shorter side) and "
                            "center-cropped as torchvision's eval transforms"},
        "outputs": {"score": "float32 [n], higher = more in-distribution, NaN for a bad input",
                    "is_ood": "bool [n], score below threshold or NaN",
                    "pred": "int32 [n], the classifier's class"},
        "batch": "symbolic: any size", "platforms": list(platforms),
        "network": dict(self.backbone.config or {"model": repr(self.backbone.model)[:200]}),
        "versions": {"line_jax": line_jax.__version__, "jax": jax.__version__,
                     "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else None,
                     "flax": flax.__version__, "numpy": np.__version__,
                     "python": platform.python_version(),
                     "serialization": jax.export.maximum_supported_calling_convention_version
                     if hasattr(jax.export, "maximum_supported_calling_convention_version")
                     else None},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **dict(record),
    }


def _flatten(det: Detector):
  """Leaves: the network's variables and the scorer's state; the rest is static."""
  b = det.backbone
  static = (b.model, b.mean, b.std, b.preprocess, b.head,
            tuple(sorted((b.apply_kwargs or {}).items())),
            json.dumps(b.config, sort_keys=True), det.scorer, det.calibration)
  return (b.variables, det.state), static


def _unflatten(static, children) -> Detector:
  model, mean, std, preprocess, head, kwargs, config, scorer, cal = static
  variables, state = children
  # No checks here: jax unflattens with tracers and placeholders as leaves.
  backbone = object.__new__(features_lib.Backbone)
  for name, value in (("model", model), ("variables", variables), ("mean", mean), ("std", std),
                      ("preprocess", preprocess), ("head", head),
                      ("apply_kwargs", dict(kwargs) or None), ("config", json.loads(config))):
    object.__setattr__(backbone, name, value)
  det = object.__new__(Detector)
  for name, value in (("backbone", backbone), ("scorer", scorer), ("state", state),
                      ("calibration", cal)):
    object.__setattr__(det, name, value)
  return det


jax.tree_util.register_pytree_node(Detector, _flatten, _unflatten)


def _decide_body(forward, score_fn, per_pass, layout, variables, state, threshold, mean, std,
                 images):
  """`(score [b], is_ood [b], pred [b])` of uint8 `images`: network, scorer and
  decision in one computation (no host round trip between them)."""
  logits, features = features_lib.network_outputs(forward, variables, images, mean, std,
                                                  per_pass)
  score = score_fn(state, features, layout=layout).astype(jnp.float32)
  return score, ~(score >= threshold), jnp.argmax(logits, axis=1).astype(jnp.int32)


# One compilation per network, scorer, pass size, layout and bucket.
_decide_jit = layout_lib.network_jit(_decide_body, static_argnums=(0, 1, 2, 3))
