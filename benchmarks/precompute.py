"""Precompute: LINe's class-mean contributions from training images.

* "torch_official_batch1": as the official code, one image at a time:
  forward through the whole network, backward from the true class's logit
  (parameters require gradients, so autograd walks the whole network as it
  does there), `h * dlogit_y/dh` copied to the host, float64 class means.
* "line_jax": batched, jitted feature extraction, then the closed form
  `line_jax.line.update_sums` (`h * W[y]`, float64 sums) per batch; with more
  than one local device each batch is sharded over a 'batch' mesh
  (`NamedSharding`), the variables replicated. Images start on the host
  for both, and the clock runs until the means are on the host.

Both run the same network (`benchmarks.backbones`) on the same images; the
official style sees only the first `official_images` (it is slow), and
the two results are compared on them (`max_rel_diff`). Times extrapolate
to ImageNet's training set (1,281,167 images) at the measured rate of this
model and image size.
"""

from __future__ import annotations

import time

import jax
import numpy as np

from benchmarks import backbones
from benchmarks import timing

IMAGENET_TRAIN = 1_281_167


def _mesh_shardings():
  """(batch sharding, replicated sharding), or (None, None) on one device."""
  devices = jax.local_devices()
  if len(devices) == 1:
    return None, None
  from jax.sharding import Mesh, NamedSharding, PartitionSpec
  mesh = Mesh(np.array(devices), ("batch",))
  return NamedSharding(mesh, PartitionSpec("batch")), NamedSharding(mesh, PartitionSpec())


def features_fn(bb: backbones.Backbone):
  """The jitted `(variables, images) -> features` of `bb`: build once, reuse."""
  model = bb.model
  return jax.jit(lambda variables, x: model.apply(variables, x)[1])


def line_jax_contributions(bb: backbones.Backbone, features_of, images: np.ndarray,
                           labels: np.ndarray, batch: int) -> np.ndarray:
  """`[classes, features]` float64 class means, batched and jitted."""
  from line_jax import line
  split, replicated = _mesh_shardings()
  variables = jax.device_put(bb.variables, replicated) if replicated else bb.variables
  kernel = jax.device_put(bb.kernel, replicated) if replicated else jax.device_put(bb.kernel)
  acc = line.init_sums(bb.num_classes, bb.kernel.shape[0])
  for start in range(0, len(images), batch):
    x = images[start:start + batch]
    x = jax.device_put(x, split) if split and len(x) % jax.local_device_count() == 0 else x
    acc = line.update_sums(acc, features_of(variables, x), labels[start:start + batch], kernel)
  counts = np.asarray(acc.counts)
  if counts.all():
    return np.asarray(line.finalize_sums(acc))
  # A short run (warm-up, the official subset) may miss classes: means of those seen.
  return np.asarray(acc.sums) / np.maximum(counts, 1)[:, None]


def official_contributions(bb: backbones.Backbone, images: np.ndarray,
                           labels: np.ndarray) -> np.ndarray:
  """`[classes, features]` float64 class means, one forward + backward per image."""
  import torch
  device = "cuda" if torch.cuda.is_available() else "cpu"
  net = bb.net.to(device, memory_format=torch.channels_last).eval()
  shap_log = np.zeros((len(images), bb.kernel.shape[0]), np.float64)
  for i in range(len(images)):
    x = torch.from_numpy(images[i:i + 1].transpose(0, 3, 1, 2)).to(device)
    x = x.contiguous(memory_format=torch.channels_last)
    net.zero_grad()
    logits, features = net(x)
    features.retain_grad()
    logits[0, int(labels[i])].backward()
    shap_log[i] = (features * features.grad)[0].detach().cpu().numpy()
  means = np.zeros((bb.num_classes, shap_log.shape[1]), np.float64)
  for c in np.unique(labels):
    means[c] = shap_log[labels == c].mean(0)
  return means


def measure(name: str, images: int, batch: int, *, official_images: int = 16,
            repeats: int = 1, with_torch: bool = True) -> list[dict]:
  """Images/s of the precompute in both styles, extrapolated to ImageNet.

  Args:
    name: a key of `backbones.SPECS`.
    images: training images for line_jax (a multiple of `batch` is best).
    batch: line_jax's batch.
    official_images: images for the official style (its rate is per image).
    repeats: timed passes of line_jax (median), after one warm-up batch.
    with_torch: also measure the official style.

  Returns:
    `what="precompute"` records: model, image_size, classes, features,
    images, batch, implementation, samples_per_s, seconds (for `images`),
    imagenet_seconds; on the official record also `max_rel_diff` between
    the two results on its images.
  """
  bb = backbones.build(name)
  x = bb.images(images, seed=2)
  labels = (np.arange(images) % bb.num_classes).astype(np.int32)
  # Warm-up: compiles the full and (if any) the last partial batch's shapes.
  features_of = features_fn(bb)
  line_jax_contributions(bb, features_of, x[:batch], labels[:batch], batch)
  if images % batch:
    line_jax_contributions(bb, features_of, x[:images % batch], labels[:images % batch], batch)
  seconds = timing.median_seconds(lambda: line_jax_contributions(bb, features_of, x, labels, batch),
                                  repeats=repeats, warmup=0, sync=lambda _: None)
  base = dict(what="precompute", model=name, image_size=bb.image_size, classes=bb.num_classes,
              features=bb.kernel.shape[0], dtype="float32")
  rate = images / seconds
  records = [dict(base, implementation="line_jax", images=images, batch=batch,
                  devices=jax.local_device_count(), samples_per_s=rate, seconds=seconds,
                  imagenet_seconds=IMAGENET_TRAIN / rate)]
  if with_torch:
    n = min(official_images, images)
    official_contributions(bb, x[:2], labels[:2])  # warm-up: allocator, kernels
    start = time.perf_counter()
    want = official_contributions(bb, x[:n], labels[:n])
    seconds = time.perf_counter() - start
    got = line_jax_contributions(bb, features_of, x[:n], labels[:n], batch)
    seen = np.unique(labels[:n])
    scale = np.abs(want[seen]).max()
    rate = n / seconds
    records.append(dict(base, implementation="torch_official_batch1", images=n, batch=1,
                        devices=1, samples_per_s=rate, seconds=seconds,
                        imagenet_seconds=IMAGENET_TRAIN / rate,
                        max_rel_diff=float(np.abs(got[seen] - want[seen]).max() / scale)))
  return records
