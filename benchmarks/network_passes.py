"""A network call over a batch in one pass, or in a few images per pass, against PyTorch.

The extraction loop (`line_jax.features`) calls the network once per batch
of `IMAGES_PER_CALL` images. On the CPU, one pass of DenseNet-BC-100 over
256 CIFAR images keeps activations of 256 images alive, far beyond the
cache; passes over a few images at a time (`lax.map` within the one compiled
call, `layout.Layout.images_per_pass`) keep them in cache. For each network,
with the same random weights in both frameworks and the same uint8 images:

* "one_pass": the call in one pass, compiled with XLA's default options;
* "passes": the same in the layout's passes, XLA's default options;
* "tuned": the call the extraction loop makes: the layout's passes, compiled
  with `layout.Layout.network_compiler_options` (on the CPU, convolutions on
  XLA's own kernels rather than YNNPACK's);
* "torch": the PyTorch network in `inference_mode`, channels_last, on the
  same normalised images (normalisation timed in both).

Each is timed in turns (`timing.interleaved_rates`), images/s; ratios are
against PyTorch and between the steps, in the same process.

    python -m benchmarks.network_passes [--smoke] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

if __package__ in (None, ""):  # `python benchmarks/network_passes.py`
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks import report  # pylint: disable=wrong-import-position
from benchmarks import timing  # pylint: disable=wrong-import-position
from line_jax import layout  # pylint: disable=wrong-import-position
from line_jax import models  # pylint: disable=wrong-import-position
from line_jax.features import _extract  # pylint: disable=wrong-import-position

# name -> (torch builder, classes, image side, batch): the networks of the
# paper's CIFAR setting, OpenOOD's CIFAR-10 and the ImageNet one, each at
# the batch its evaluation runs (ResNet-50's is what fits a CPU's memory).
NETWORKS = {
    "densenet100": ("densenet100", 10, 32, 256),
    "resnet18_cifar": ("resnet18_cifar", 10, 32, 256),
    "resnet50": ("resnet50", 1000, 224, 32),
}
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _torch_net(builder: str, classes: int, side: int):
  from benchmarks import torch_models
  net = (torch_models.TorchDenseNetBC(classes) if builder == "densenet100"
         else getattr(torch_models, builder)(classes))
  return torch_models.randomise(net, min(side, 64), seed=0)


def measure(name: str, *, batch: int | None = None, rounds: int = 3) -> dict:
  """images/s of one network: one pass, the layout's passes, PyTorch."""
  import torch

  builder, classes, side, default_batch = NETWORKS[name]
  batch = batch or default_batch
  net = _torch_net(builder, classes, side).to(memory_format=torch.channels_last)
  model = models.get_model(name, classes)
  variables = models.variables_from_state_dict(
      model, {k: v.numpy() for k, v in net.state_dict().items()}, (side, side, 3))
  forward, variables = models.feature_apply(model, variables)
  images = np.random.default_rng(1).integers(0, 256, (batch, side, side, 3), np.uint8)
  x, mean, std = (jax.device_put(a) for a in (images, jnp.asarray(MEAN), jnp.asarray(STD)))
  per_pass = layout.CPU.images_per_pass(batch, side, side)

  plain = jax.jit(_extract.network_outputs, static_argnums=(0, 5))  # XLA's defaults.

  def ours(apply, passes):
    return lambda: jax.block_until_ready(apply(forward, variables, x, mean, std, passes))

  t_images = torch.from_numpy(images).permute(0, 3, 1, 2)
  t_mean, t_std = (torch.tensor(v).view(1, 3, 1, 1) for v in (MEAN, STD))

  def theirs():
    with torch.inference_mode():
      xs = ((t_images.float() / 255 - t_mean) / t_std).contiguous(
          memory_format=torch.channels_last)
      return net(xs)

  one, passes, tuned, torch_rate = timing.interleaved_rates(
      [ours(plain, None), ours(plain, per_pass), ours(_extract._apply, per_pass), theirs],
      batch, repeats=2, rounds=rounds)
  features_one = np.asarray(plain(forward, variables, x, mean, std, None)[1])
  features_tuned = np.asarray(_extract._apply(forward, variables, x, mean, std, per_pass)[1])
  return {"model": name, "image_size": side, "batch": batch, "images_per_pass": per_pass,
          "compiler_options": layout.default().network_compiler_options(),
          "one_pass_images_per_s": one, "passes_images_per_s": passes,
          "tuned_images_per_s": tuned, "torch_images_per_s": torch_rate,
          "passes_vs_one_pass": passes / one, "tuned_vs_passes": tuned / passes,
          "passes_vs_torch": passes / torch_rate, "one_pass_vs_torch": one / torch_rate,
          "tuned_vs_torch": tuned / torch_rate,
          "max_feature_difference": float(np.abs(features_one - features_tuned).max()),
          "torch_threads": torch.get_num_threads()}


def table(records: list[dict]) -> str:
  lines = ["| network | batch | images per pass | PyTorch img/s | one pass img/s | passes img/s "
           "| passes + options img/s | passes / one pass | options / passes "
           "| line_jax / PyTorch |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in records:
    lines.append(f"| {r['model']} ({r['image_size']}x{r['image_size']}) | {r['batch']} | "
                 f"{r['images_per_pass']} | {r['torch_images_per_s']:.1f} | "
                 f"{r['one_pass_images_per_s']:.1f} | {r['passes_images_per_s']:.1f} | "
                 f"{r['tuned_images_per_s']:.1f} | {r['passes_vs_one_pass']:.2f}x | "
                 f"{r['tuned_vs_passes']:.2f}x | {r['tuned_vs_torch']:.2f}x |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--smoke", action="store_true", help="tiny batches, one round")
  parser.add_argument("--out", default=None, help="write <out>/<device>/network_passes.*")
  args = parser.parse_args(argv)
  records = []
  for name in NETWORKS:
    batch = {"resnet50": 2}.get(name, 8) if args.smoke else None
    records.append(measure(name, batch=batch, rounds=1 if args.smoke else 3))
    print(table(records[-1:]), end="", flush=True)
  if args.out:
    environment = timing.environment()
    folder = os.path.join(args.out, report.device_slug(environment))
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "network_passes.json"), "w") as f:
      json.dump({"environment": environment, "records": records}, f, indent=2)
    with open(os.path.join(folder, "network_passes.md"), "w") as f:
      f.write("# A network call: one pass, passes of a few images, and the network "
              "compiler options (CPU)\n\n"
              f"Options: `{records[0]['compiler_options']}` (XLA's defaults in the "
              "first two columns); images/s in turns in one process.\n\n" + table(records))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
