"""Input pipeline throughput: JPEG files to uint8 batches, and to features.

On the same folder of JPEGs, in the same run, images/s of:

* `line_jax`: `line_jax.data.image_batches` (grain, decoding threads) over
  an `ImageFolderSource`, to uint8 batches;
* `torch DataLoader`: PyTorch's `DataLoader` with the same number of worker
  processes over the same files, with torchvision's PIL transforms
  (`pil_loader`, `Grayscale`, `Resize`, `CenterCrop`, restated with Pillow
  so that torchvision need not be installed) and its default collation;
* `line_jax old loader`: `benchmarks.legacy_loaders.load_image_folder`, the
  single-threaded loader that decodes a whole folder into one array;
* `line_jax fast_decode`: the pipeline with `Preprocess(fast_decode=True)`
  (`PIL.Image.draft`: faster, pixels not torchvision's), for reference;
* `line_jax features`: the pipeline feeding `features.iter_extract_batches`
  through the committed Fashion-MNIST checkpoint (28x28 grayscale), and the
  same network on the same images already decoded in memory, which bounds it.

Each setting is timed over the whole folder (worker start-up included, as an
epoch pays it), `rounds` times, the implementations taking turns, and the
median rate is reported, with the median CPU time per image (all threads and
worker processes), which a busy neighbour on a shared machine moves far less
than the wall clock. Files are in the page cache (just written, or read
by a warm-up pass), so this measures decoding, not the disk.

The default folder is made here: 3,000 500x375 (and some 375x500) JPEGs,
random crops of scikit-image's and scikit-learn's bundled photographs at a
random scale, flipped and brightness-jittered, in 10 class folders. The real
CIFAR-10 JPEGs (32x32) in `../shared/data/cifar10/test` are measured
too where they exist.

    python -m benchmarks.input_pipeline [--folder DIR] [--out benchmarks/results]

writes `DIR/<device>/input_pipeline.{json,md,png}` (about 8 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import resource
import statistics
import sys
import tempfile
import time

import numpy as np
import PIL.Image

if __package__ in (None, ""):  # `python benchmarks/input_pipeline.py`
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks import legacy_loaders  # pylint: disable=wrong-import-position
from benchmarks import report  # pylint: disable=wrong-import-position
from benchmarks import timing  # pylint: disable=wrong-import-position
from line_jax import data  # pylint: disable=wrong-import-position

ROOT = pathlib.Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / "line_jax" / "checkpoints" / "fashion_mnist_resnet_small"
CIFAR_JPEGS = ROOT.parent / "shared" / "data" / "cifar10" / "test"
# (label, Preprocess): the embedded checkpoint's input, and ImageNet's.
SETTINGS = {
    "28 px gray": data.Preprocess(28, 28, 1),
    "224 px RGB": data.Preprocess(224, 256, 3),
}


def _photos() -> list[np.ndarray]:
  """The bundled photographs, RGB, shorter side about 600 px at most."""
  from skimage import data as skdata  # pylint: disable=g-import-not-at-top
  from sklearn.datasets import load_sample_images  # pylint: disable=g-import-not-at-top
  images = [skdata.astronaut(), skdata.chelsea(), skdata.coffee(), skdata.rocket(),
            skdata.hubble_deep_field(), skdata.immunohistochemistry(), skdata.retina(),
            skdata.stereo_motorcycle()[0], *load_sample_images().images]
  images += [np.repeat(f()[..., None], 3, axis=-1) for f in (skdata.brick, skdata.gravel)]
  out = []
  for image in images:
    pil = PIL.Image.fromarray(image).convert("RGB")
    scale = min(1.0, 600 / min(pil.size))
    out.append(pil.resize((round(pil.width * scale), round(pil.height * scale)),
                          PIL.Image.BILINEAR))
  return out


def make_jpeg_folder(root: str | os.PathLike, count: int, *, size=(375, 500),
                     classes: int = 10, seed: int = 0) -> pathlib.Path:
  """Writes `count` JPEGs of `size` (H, W) into `root/class_<k>/` folders.

  Every fourth image is portrait (W x H). Class k holds crops of photograph
  k (of 12), so the classes differ, as in a real set.

  Returns:
    `root` as a path.
  """
  root = pathlib.Path(root)
  rng = np.random.default_rng(seed)
  photos = _photos()
  for i in range(count):
    label = i % classes
    h, w = size if i % 4 else size[::-1]
    photo = photos[label % len(photos)]
    scale = max(h / photo.height, w / photo.width) * rng.uniform(1.0, 1.5)
    pil = photo.resize((max(w, round(photo.width * scale)), max(h, round(photo.height * scale))),
                       PIL.Image.BILINEAR)
    top = rng.integers(0, pil.height - h + 1)
    left = rng.integers(0, pil.width - w + 1)
    pil = pil.crop((left, top, left + w, top + h))
    if rng.random() < 0.5:
      pil = pil.transpose(PIL.Image.FLIP_LEFT_RIGHT)
    pixels = np.asarray(pil, np.float32) * rng.uniform(0.8, 1.2)
    folder = root / f"class_{label}"
    folder.mkdir(parents=True, exist_ok=True)
    PIL.Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
        folder / f"{i:05d}.jpg", quality=90)
  return root


def torchvision_transform(path: str, pre: data.Preprocess) -> np.ndarray:
  """torchvision's `pil_loader` + `Grayscale` + `Resize` + `CenterCrop`, in Pillow.

  What a PyTorch user's `ImageFolder(root, transform)` runs per image
  (torchvision 0.28, transforms/functional.py and _functional_pil.py).
  """
  with open(path, "rb") as f:
    img = PIL.Image.open(f).convert("RGB")
  if pre.channels == 1:
    img = img.convert("L")
  # np.array copies, as torchvision's PILToTensor does (collation wants
  # writable arrays).
  if pre.image_size is None:
    return np.array(img)
  size, crop = pre.resize_size or pre.image_size, pre.image_size
  w, h = img.size
  if min(w, h) != size:
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    img = img.resize((new_w, new_h), PIL.Image.BILINEAR)
  w, h = img.size
  top, left = int(round((h - crop) / 2.0)), int(round((w - crop) / 2.0))
  return np.array(img.crop((left, top, left + crop, top + crop)))


class TorchFolder:
  """A map-style PyTorch dataset over the same files and transforms."""

  def __init__(self, source: data.ImageFolderSource, pre: data.Preprocess):
    self.paths, self.labels, self.pre = source.paths, source.labels, pre

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int):
    return torchvision_transform(self.paths[index], self.pre), int(self.labels[index])


def run_line_jax(source, pre: data.Preprocess, *, workers: int, batch_size: int) -> int:
  """One pass of the grain pipeline; returns the number of images."""
  count = 0
  for images, _ in data.image_batches(source, pre, batch_size=batch_size, workers=workers):
    count += images.shape[0]
  return count


def run_torch(source, pre: data.Preprocess, *, workers: int, batch_size: int) -> int:
  """One pass of a PyTorch `DataLoader` (worker processes forked per pass)."""
  import torch  # pylint: disable=g-import-not-at-top
  loader = torch.utils.data.DataLoader(TorchFolder(source, pre), batch_size=batch_size,
                                       shuffle=False, num_workers=workers)
  count = 0
  for images, _ in loader:
    count += images.shape[0]
  return count


def run_old(source, pre: data.Preprocess, **_) -> int:
  """The single-threaded `load_image_folder` over the same folder."""
  images = legacy_loaders.load_image_folder(source.root, pre.image_size, resize_size=pre.resize_size,
                                  grayscale=pre.channels == 1)
  return images.shape[0]


def load_checkpoint():
  """The committed Fashion-MNIST model (`models.load_checkpoint`)."""
  from line_jax import models  # pylint: disable=g-import-not-at-top
  model, variables, config = models.load_checkpoint(CHECKPOINT)
  return model, variables, config["mean"], config["std"]


def run_features(source, pre: data.Preprocess, *, workers: int, batch_size: int,
                 net) -> int:
  """One pass from JPEG files to pooled features through the checkpoint."""
  from line_jax import features  # pylint: disable=g-import-not-at-top
  model, variables, mean, std = net
  batches = data.image_batches(source, pre, batch_size=batch_size, workers=workers)
  count = 0
  for _, feats, _ in features.iter_extract_batches(model, variables, batches, mean=mean,
                                                   std=std, progress=False):
    count += feats.shape[0]
  return count


def run_features_in_memory(images: np.ndarray, *, batch_size: int, net) -> int:
  """The same network on images already decoded: the bound on `run_features`."""
  from line_jax import features  # pylint: disable=g-import-not-at-top
  model, variables, mean, std = net
  return features.extract(model, variables, images, mean=mean, std=std,
                          batch_size=batch_size, progress=False)[1].shape[0]


def _cpu_seconds() -> float:
  # This process's threads and its reaped children (DataLoader workers are
  # joined at the end of each pass, so their time is counted too).
  own, children = (resource.getrusage(who) for who in
                   (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
  return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def measure(cases: list[dict], rounds: int) -> list[dict]:
  """Times every case `rounds` times, case after case in each round.

  Args:
    cases: dicts with a `run` (no arguments, returns images done) and
      descriptive fields, copied into the records.
    rounds: passes of each case.

  Returns:
    One record per case: its fields, `images`, `images_per_s` (median of
    wall-clock rates), `rates` (every round's) and `cpu_ms_per_image`
    (median CPU time, all threads and worker processes): on a shared
    machine the wall clock depends on the neighbours' load, CPU time much
    less.
  """
  rates = [[] for _ in cases]
  cpu = [[] for _ in cases]
  counts = [0] * len(cases)
  for _ in range(rounds):
    for i, case in enumerate(cases):
      cpu_start, start = _cpu_seconds(), time.perf_counter()
      counts[i] = case["run"]()
      rates[i].append(counts[i] / (time.perf_counter() - start))
      cpu[i].append(1e3 * (_cpu_seconds() - cpu_start) / counts[i])
  return [{**{k: v for k, v in case.items() if k != "run"}, "images": n,
           "images_per_s": statistics.median(r), "rates": r,
           "cpu_ms_per_image": statistics.median(c)}
          for case, n, r, c in zip(cases, counts, rates, cpu)]


def pipeline_cases(source, folder_name: str, settings: dict, workers_list, batch_size: int,
                   *, old: bool = True, fast: bool = True) -> list[dict]:
  """Cases (a)-(c) for one folder: line_jax, PyTorch and the old loader."""
  cases = []
  for setting, pre in settings.items():
    kw = dict(folder=folder_name, setting=setting, batch=batch_size)
    for w in workers_list:
      run = dict(workers=w, batch_size=batch_size)
      cases.append({"path": "line_jax", "workers": w, **kw,
                    "run": lambda p=pre, r=run: run_line_jax(source, p, **r)})
      cases.append({"path": "torch DataLoader", "workers": w, **kw,
                    "run": lambda p=pre, r=run: run_torch(source, p, **r)})
    if fast:
      w = max(workers_list)
      fast_pre = data.Preprocess(pre.image_size, pre.resize_size, pre.channels, True)
      cases.append({"path": "line_jax fast_decode", "workers": w, **kw,
                    "run": lambda p=fast_pre, w=w: run_line_jax(source, p, workers=w,
                                                                batch_size=batch_size)})
    if old:
      cases.append({"path": "line_jax old loader", "workers": 1, **kw,
                    "run": lambda p=pre: run_old(source, p)})
  return cases


def feature_cases(source, folder_name: str, workers: int, batch_size: int) -> list[dict]:
  """Case (d): JPEGs to features through the checkpoint, and its bound."""
  net = load_checkpoint()
  pre = SETTINGS["28 px gray"]
  # Compile once, untimed: the same batch shape as the timed passes.
  warm = data.ArraySource(np.zeros((batch_size, 28, 28, 1), np.uint8))
  run_features(warm, data.Preprocess(channels=1), workers=1, batch_size=batch_size, net=net)
  decoded = np.concatenate([b for b, _ in data.image_batches(source, pre,
                                                             batch_size=batch_size)])
  kw = dict(folder=folder_name, setting="28 px gray", batch=batch_size, workers=workers)
  return [
      {"path": "line_jax features", **kw,
       "run": lambda: run_features(source, pre, workers=workers, batch_size=batch_size,
                                   net=net)},
      {"path": "model alone, decoded in memory", **kw,
       "run": lambda: run_features_in_memory(decoded, batch_size=batch_size, net=net)},
  ]


NOTES = """\
`workers` are decoding threads for line_jax and worker processes for PyTorch
(plus, for both, the main thread or process that batches). `CPU ms/image` is
the CPU time of every thread and worker process per image: with a load
average above the CPU count (other jobs on a shared machine) the wall-clock
rates say more about the neighbours than about the loaders, and this column
says what each loader costs. `line_jax fast_decode` trades torchvision's
exact pixels for speed (`Preprocess(fast_decode=True)`, opt-in). `model
alone` runs the same network on the same images already decoded in memory:
the bound on `line_jax features`, where decoding and the network share the
CPUs.\
"""


def cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return "unknown CPU"


def table(records: list[dict]) -> str:
  """Markdown: one row per case, with its ratio to PyTorch's same setting."""
  torch_rate = {(r["folder"], r["setting"], r["workers"]): r["images_per_s"]
                for r in records if r["path"] == "torch DataLoader"}
  lines = ["| folder | setting | path | workers | images | images/s | rounds (images/s) "
           "| vs torch, same workers | CPU ms/image |", "|---|---|---|---|---|---|---|---|---|"]
  for r in records:
    ref = torch_rate.get((r["folder"], r["setting"], r["workers"]))
    ratio = "-" if ref is None or r["path"] == "torch DataLoader" else (
        f"{r['images_per_s'] / ref:.2f}x")
    rounds = ", ".join(f"{x:,.0f}" for x in r["rates"])
    lines.append(f"| {r['folder']} | {r['setting']} | {r['path']} | {r['workers']} | "
                 f"{r['images']:,} | {r['images_per_s']:,.0f} | {rounds} | {ratio} | "
                 f"{r['cpu_ms_per_image']:.2f} |")
  return "\n".join(lines)


def chart(records: list[dict], path: str, title: str) -> None:
  """Horizontal bars of images/s, one group per folder and setting."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  import matplotlib.ticker  # pylint: disable=g-import-not-at-top
  labels = [f"{r['folder']}, {r['setting']}: {r['path']} ({r['workers']}w)" for r in records]
  rates = [r["images_per_s"] for r in records]
  colours = ["tab:red" if r["path"].startswith("torch") else
             "tab:gray" if "old" in r["path"] or "alone" in r["path"] else
             "tab:cyan" if "fast" in r["path"] else "tab:blue" for r in records]
  fig, ax = plt.subplots(figsize=(10, 0.32 * len(records) + 1.2))
  ax.barh(range(len(records)), rates, color=colours)
  ax.set_yticks(range(len(records)), labels, fontsize=7)
  ax.invert_yaxis()
  ax.set_xscale("log")
  ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
  ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
  ax.set_xlabel("images/s (log scale)")
  ax.set_title(title, fontsize=9)
  for i, rate in enumerate(rates):
    ax.text(rate, i, f" {rate:,.0f}", va="center", fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--folder", help="an existing JPEG folder (default: make one)")
  parser.add_argument("--images", type=int, default=3000, help="images in the made folder")
  parser.add_argument("--cifar", default=str(CIFAR_JPEGS),
                      help="CIFAR-10 JPEG folder, measured where it exists ('' to skip)")
  parser.add_argument("--batch-size", type=int, default=256)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--workers", default="1,cpu",
                      help="comma-separated worker counts; 'cpu' is os.cpu_count()")
  parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
  args = parser.parse_args(argv)
  workers = sorted({(os.cpu_count() or 1) if w == "cpu" else int(w)
                    for w in args.workers.split(",")})
  start, load_before = time.perf_counter(), os.getloadavg()
  with tempfile.TemporaryDirectory() as tmp:
    folder = args.folder or make_jpeg_folder(tmp, args.images)
    source = data.ImageFolderSource(folder)
    name = "made JPEGs 500x375" if not args.folder else os.path.basename(os.fspath(folder))
    print(f"{len(source)} images in {folder}", file=sys.stderr)
    # PyTorch forks its workers: time it before JAX starts its own threads
    # (the feature cases initialise the backend).
    cases = pipeline_cases(source, name, SETTINGS, workers, args.batch_size)
    if args.cifar and os.path.isdir(args.cifar):
      cifar = data.ImageFolderSource(args.cifar)
      cases += pipeline_cases(cifar, "CIFAR-10 test JPEGs 32x32",
                              {"32 px RGB": data.Preprocess(channels=3)}, workers,
                              args.batch_size, old=False, fast=False)
    records = measure(cases, args.rounds)
    records += measure(feature_cases(source, name, max(workers), args.batch_size), args.rounds)
  env = timing.environment()
  env["cpu"] = cpu_name()
  # Other people's jobs on a shared machine slow every wall-clock figure.
  load = [round(max(a, b), 1) for a, b in zip(load_before, os.getloadavg())]
  payload = {"environment": env, "records": records,
             "settings": {"batch_size": args.batch_size, "rounds": args.rounds,
                          "workers": workers, "images": len(source)},
             "load_average_1_5_15_min": load,
             "seconds": time.perf_counter() - start}
  command = "python -m benchmarks.input_pipeline"
  title = "Input pipeline: JPEG files to uint8 batches and to features"
  out = report.write_table(
      args.out, "input_pipeline", payload, title=title, command=command,
      footer=(f"{env['cpu']} ({env['threads']['cpu_count']} CPUs, {env['backend']} backend), "
              f"batch {args.batch_size}, median of {args.rounds} passes over every file, "
              f"{payload['seconds']:.0f} s, load average up to {load[0]} "
              f"(1 min) / {load[1]} (5 min) on {env['threads']['cpu_count']} CPUs"),
      table=table(records) + "\n\n" + NOTES)
  chart(records, os.path.join(out, "input_pipeline.png"), f"{title}\n{env['cpu']}")
  print(table(records))
  return 0


if __name__ == "__main__":
  sys.exit(main())
