"""Deployment throughput: uint8 images in, decisions out, line_jax against PyTorch.

For each network that both frameworks hold with identical random weights
(`torch_models`, converted by `line_jax.models.variables_from_state_dict`),
a LINe detector is fitted and calibrated once, then each call below turns
the same uint8 `[n, H, W, 3]` NumPy images into NumPy decisions
`(score, is_ood, pred)`:

* "line_jax_predict": `Detector.predict`, the network, LINe and the
  threshold in one jitted call per bucketed batch size (1, 2, 4, then
  `_buckets.bucket`'s multiples of 8), host transfer and padding included;
* "line_jax_exported": the same detector exported as StableHLO
  (`Detector.export(platforms=("cpu",))`) and called through
  `line_jax.export.load`: padded to the same buckets (a one-pass function
  below 8 images), on a CPU its network in passes of a few images too;
* "torch": `torch.from_numpy` -> float, normalise -> the same network in
  `inference_mode`, channels_last -> `torch_reference.FastTorchLine` (the
  fastest PyTorch LINe we have, grouped by predicted class, as
  `end_to_end`'s "torch_line_fast") on the features -> `score >= threshold`
  and the logits' argmax -> NumPy;
* "torch_1_thread": the same at `torch.set_num_threads(1)`, for context
  only: on a machine other processes share, OpenMP's threads wait for one
  another at every operator, and one thread can beat them.

LINe is fitted with `Detector.fit_features` on the network's features of
random images (resampled with a jitter so that every class has rows; the
labels are round-robin) and calibrated with `Detector.calibrate` on other
random images at a TPR of 95 %: a real threshold, set as in deployment.
PyTorch gets the fitted state's masks and clip and the calibrated
threshold, so both decide with one detector. Before timing, their decisions
on the same images are compared (`what="agreement"` records).

The implementations take turns in one process on the same images, PyTorch
at `torch.get_num_threads()` (the CPUs this process may use) and XLA at its
default (the same CPUs); images/s are medians of all timed calls
(`timing.interleaved_blocks`), ratios are within this run. The CPU time
other processes took meanwhile is recorded with each batch.

    python -m benchmarks.predict_throughput [--models resnet18_cifar,densenet100,resnet50]
        [--rounds 3] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import functools
import os
import pathlib
import statistics
import sys
import tempfile
import time

import numpy as np

if __package__ in (None, ""):  # `python benchmarks/predict_throughput.py`
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks import report  # pylint: disable=wrong-import-position
from benchmarks import timing  # pylint: disable=wrong-import-position

# name -> (classes, image side, `data.MEAN_STD` key, (p_w, p_a), batches): the
# CIFAR-10 networks with the official CIFAR-10 percentiles, and ResNet-50
# with the ImageNet ones at small batches (1 and 8: a batch of 256 takes
# 20 s a call on two cores, and the run is meant to last minutes).
NETWORKS = {
    "resnet18_cifar": (10, 32, "cifar10", (90.0, 90.0), (1, 32, 256)),
    "densenet100": (10, 32, "cifar_line", (90.0, 90.0), (1, 32, 256)),
    "resnet50": (1000, 224, "imagenet2012", (10.0, 10.0), (1, 8)),
}
IMPLEMENTATIONS = ("line_jax_predict", "line_jax_exported", "torch", "torch_1_thread")
# A block of calls lasts about this long (more repeats of short calls).
BLOCK_SECONDS = 0.25
# Other processes' average CPU use from which a table row is flagged.
CONTENDED_CORES = 0.5


def _networks(name: str, classes: int, side: int):
  """`(torch net, flax model, flax variables)` with the same random weights."""
  import torch
  from benchmarks import torch_models
  from line_jax import models
  net = (torch_models.TorchDenseNetBC(classes) if name == "densenet100"
         else getattr(torch_models, name)(classes))
  # BN statistics from a small batch: they need not match the input size for timing.
  net = torch_models.randomise(net, min(side, 64), seed=0)
  model = models.get_model(name, classes)
  variables = models.variables_from_state_dict(
      model, {k: v.numpy() for k, v in net.state_dict().items()}, (side, side, 3))
  return net.to(memory_format=torch.channels_last), model, variables


def _images(count: int, side: int, seed: int) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (count, side, side, 3), np.uint8)


def _torch_inputs(images: np.ndarray, mean, std):
  """uint8 NHWC NumPy -> normalised float32 NCHW, channels_last (what the
  permuted NHWC array is already; `float` and the arithmetic keep it)."""
  import torch
  x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255).sub_(mean).div_(std)
  return x.contiguous(memory_format=torch.channels_last)


def _torch_features(net, images: np.ndarray, mean, std) -> np.ndarray:
  """`[n, features]` of `images` from the PyTorch twin: the fit's data without
  compiling one more XLA program (the networks agree to float32 precision)."""
  import torch
  with torch.inference_mode():
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in (mean, std))
    return net(_torch_inputs(images, mean, std))[1].numpy()


def detector(name: str, *, fit_images: int, calibrate_images: int, tpr: float,
             batch_size: int):
  """`(torch net, line_jax Detector)`: LINe fitted and calibrated on random images.

  Args:
    name: a key of `NETWORKS`.
    fit_images: images whose features the fit resamples (to at least 4 rows
      per class).
    calibrate_images: held-out images the threshold is set on (at least
      `calibration.MIN_TAIL / (1 - tpr)`).
    tpr: the share of calibration images kept as in-distribution.
    batch_size: images per call while calibrating (a timed bucket, so its
      compilation is shared).
  """
  from line_jax import data
  from line_jax import features
  from line_jax.detector import Detector

  classes, side, normalization, (p_w, p_a), _ = NETWORKS[name]
  net, model, variables = _networks(name, classes, side)
  mean, std = data.MEAN_STD[normalization]
  backbone = features.Backbone(model, variables, mean, std, data.Preprocess(side, None, 3))
  feats = _torch_features(net, _images(fit_images, side, seed=10), mean, std)
  rng = np.random.default_rng(0)
  rows = max(fit_images, 4 * classes)
  feats = feats[rng.integers(0, fit_images, rows)] * rng.uniform(0.5, 1.5, (rows, feats.shape[1]))
  labels = np.arange(rows) % classes
  det = Detector.fit_features(backbone, feats.astype(np.float32), labels, scorer="line",
                              p_w=p_w, p_a=p_a)
  det = det.calibrate(_images(calibrate_images, side, seed=11), tpr=tpr, batch_size=batch_size)
  return net, det


def _torch_predict(net, det):
  """uint8 NumPy images -> `Decisions` in PyTorch, with `det`'s state and threshold."""
  import torch
  from benchmarks import torch_reference
  from line_jax.export import Decisions
  state = det.state
  fast = torch_reference.FastTorchLine(np.array(state.kernel).T, np.array(state.bias),
                                       float(state.clip), np.array(state.weight_floor),
                                       np.array(state.neuron_mask))
  mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in (det.backbone.mean, det.backbone.std))
  threshold = det.threshold

  def predict(images: np.ndarray) -> Decisions:
    with torch.inference_mode():
      logits, feats = net(_torch_inputs(images, mean, std))
      score = fast(feats)
      return Decisions(score.numpy(), (~(score >= threshold)).numpy(),
                       logits.argmax(1).to(torch.int32).numpy())

  return predict


def _agreement(name: str, ours, theirs) -> dict:
  """How far two implementations' decisions on the same images differ."""
  scale = float(np.abs(theirs.score).max())
  return dict(what="agreement", model=name, images=len(ours.score),
              pred_equal=float(np.mean(ours.pred == theirs.pred)),
              is_ood_equal=float(np.mean(ours.is_ood == theirs.is_ood)),
              max_score_difference=float(np.abs(ours.score - theirs.score).max()),
              max_relative_score_difference=float(
                  np.abs(ours.score - theirs.score).max() / max(scale, 1e-30)),
              is_ood_share=float(np.mean(theirs.is_ood)))


def measure(name: str, *, batches=None, rounds: int = 3, fit_images: int = 64,
            calibrate_images: int = 200, tpr: float = 0.95, workdir: str | None = None
            ) -> list[dict]:
  """images/s of predict, the exported detector and PyTorch on one network.

  Args:
    name: a key of `NETWORKS`.
    batches: images per call (default: the network's in `NETWORKS`).
    rounds: blocks of timed calls per implementation and batch.
    fit_images, calibrate_images, tpr: as in `detector`.
    workdir: where the detector is exported (default: a temporary folder).

  Returns:
    Three `what="agreement"` records (`pred_equal`, `is_ood_equal`,
    `max_score_difference`, ... of predict against PyTorch and against
    the export, on the largest batch's images), then `what="predict"`
    records: model, image_size, classes, features, batch, padded_batch,
    implementation, images_per_s, seconds (median per call), repeats (calls
    per block), rounds, round_images_per_s, other_processes_cores, and the
    detector's p_w, p_a, clip, threshold, torch_threads.
  """
  import torch
  from line_jax import _buckets
  from line_jax import export

  classes, side, _, (p_w, p_a), default_batches = NETWORKS[name]
  batches = tuple(batches or default_batches)
  net, det = detector(name, fit_images=fit_images, calibrate_images=calibrate_images, tpr=tpr,
                      batch_size=max(batches))
  torch_predict = _torch_predict(net, det)

  def torch_1_thread(images):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
      return torch_predict(images)
    finally:
      torch.set_num_threads(threads)

  with tempfile.TemporaryDirectory(dir=workdir) as tmp:
    det.export(os.path.join(tmp, "det"), platforms=("cpu",))
    exported = export.load(os.path.join(tmp, "det"))
    impls = dict(zip(IMPLEMENTATIONS, (det.predict, exported, torch_predict, torch_1_thread)))
    images = _images(max(batches), side, seed=12)
    # Compiles line_jax's largest bucket; PyTorch's call time stands for its length.
    decisions = {impl: impls[impl](images) for impl in ("line_jax_predict", "line_jax_exported")}
    torch_seconds, decisions["torch"] = _timed(lambda: torch_predict(images))
    records = [dict(_agreement(name, decisions[a], decisions[b]), compared=f"{a} vs {b}")
               for a, b in (("line_jax_predict", "torch"), ("line_jax_exported", "torch"),
                            ("line_jax_predict", "line_jax_exported"))]
    base = dict(what="predict", model=name, image_size=side, classes=classes,
                features=int(det.state.num_features), p_w=p_w, p_a=p_a,
                clip=float(det.state.clip), threshold=det.threshold,
                torch_threads=torch.get_num_threads())
    for batch in batches:
      fns = [functools.partial(fn, images[:batch]) for fn in impls.values()]
      slowest = torch_seconds
      if batch != len(images):
        for fn in fns:  # Compiles this bucket.
          fn()
        slowest = max(_timed(fn)[0] for fn in fns)
      repeats = int(min(10, max(1, BLOCK_SECONDS // slowest)))
      short = slowest < 0.05  # A pause and a waking call before each block (timing.py).
      before = _cpu_seconds()
      blocks = timing.interleaved_blocks(fns, repeats=repeats, rounds=rounds,
                                         settle_s=0.03 if short else 0.0, wake=short)
      others = _others_cores(before, _cpu_seconds())
      for impl, runs in zip(impls, blocks):
        seconds = statistics.median(t for block in runs for t in block)
        records.append(dict(base, batch=batch, padded_batch=_buckets.bucket(batch, smallest=1),
                            implementation=impl, images_per_s=batch / seconds, seconds=seconds,
                            repeats=repeats, rounds=rounds,
                            round_images_per_s=[batch / statistics.median(b) for b in runs],
                            other_processes_cores=others))
  return records


def _timed(fn) -> tuple[float, object]:
  start = time.perf_counter()
  out = fn()
  return time.perf_counter() - start, out


def _cpu_seconds() -> tuple[float, float, float]:
  """(wall clock, CPU seconds busy on the whole machine, CPU seconds of this process)."""
  with open("/proc/stat") as f:
    ticks = [int(v) for v in f.readline().split()[1:9]]
  busy = sum(ticks) - ticks[3] - ticks[4]  # Less idle and iowait.
  return time.perf_counter(), busy / os.sysconf("SC_CLK_TCK"), time.process_time()


def _others_cores(before, after) -> float:
  """CPU cores other processes kept busy on average between two `_cpu_seconds`."""
  wall, busy, ours = (b - a for a, b in zip(before, after))
  return max(0.0, (busy - ours) / wall)


def _rates(records) -> dict:
  return {(r["model"], r["batch"], r["implementation"]): r["images_per_s"]
          for r in records if r["what"] == "predict"}


def table(records: list[dict]) -> str:
  """Markdown: images/s per network and batch, and line_jax over PyTorch."""
  rates = _rates(records)
  lines = ["| network | input | batch (padded) | line_jax predict | line_jax exported "
           "| PyTorch | PyTorch, 1 thread | predict / PyTorch | exported / PyTorch "
           "| predict / faster PyTorch | other processes (cores) |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in records:
    if r["what"] != "predict" or r["implementation"] != "torch":
      continue
    at = lambda impl: rates[(r["model"], r["batch"], impl)]  # noqa: E731
    ours, exported, theirs = at("line_jax_predict"), at("line_jax_exported"), at("torch")
    one = at("torch_1_thread")
    mark = " †" if contended(r, theirs, one) else ""
    lines.append(f"| {r['model']} | {r['image_size']}x{r['image_size']} | {r['batch']} "
                 f"({r['padded_batch']}) | {ours:,.1f} | {exported:,.1f} | {theirs:,.1f} "
                 f"({r['torch_threads']} threads){mark} | {one:,.1f} | {ours / theirs:.2f}x | "
                 f"{exported / theirs:.2f}x | {ours / max(theirs, one):.2f}x | "
                 f"{r['other_processes_cores']:.1f} |")
  if any("†" in line for line in lines):
    lines.append(f"\n† Other processes kept at least {CONTENDED_CORES} cores busy and PyTorch "
                 "ran faster on one thread than on its default threads: there its "
                 "default-thread figure measures contention more than PyTorch.")
  return "\n".join(lines)


def contended(record: dict, torch_rate: float, one_thread_rate: float) -> bool:
  """Whether a PyTorch default-thread figure is mostly other processes' doing."""
  return record["other_processes_cores"] >= CONTENDED_CORES and one_thread_rate > torch_rate


def agreement_table(records: list[dict]) -> str:
  lines = ["| network | compared | images | pred equal | is_ood equal | max score difference "
           "(relative) | OOD share (PyTorch) |", "|---|---|---:|---:|---:|---:|---:|"]
  for r in records:
    if r["what"] == "agreement":
      lines.append(f"| {r['model']} | {r['compared']} | {r['images']} | "
                   f"{100 * r['pred_equal']:.1f} % | {100 * r['is_ood_equal']:.1f} % | "
                   f"{r['max_score_difference']:.2e} ({r['max_relative_score_difference']:.1e}) "
                   f"| {100 * r['is_ood_share']:.1f} % |")
  return "\n".join(lines)


def chart(records: list[dict], path: str, title: str) -> None:
  """Grouped bars: images/s per batch and implementation, one panel per network."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  rates = _rates(records)
  names = list(dict.fromkeys(r["model"] for r in records if r["what"] == "predict"))
  fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names) + 1, 3.8), squeeze=False)
  colours = {"line_jax_predict": "tab:blue", "line_jax_exported": "tab:cyan", "torch": "tab:red",
             "torch_1_thread": "lightsalmon"}
  for ax, name in zip(axes[0], names):
    sizes = sorted({b for m, b, _ in rates if m == name})
    width = 0.8 / len(IMPLEMENTATIONS)
    for i, impl in enumerate(IMPLEMENTATIONS):
      values = [rates.get((name, b, impl), 0.0) for b in sizes]
      xs = [j + (i - (len(IMPLEMENTATIONS) - 1) / 2) * width for j in range(len(sizes))]
      ax.bar(xs, values, width, label=impl, color=colours[impl])
      for x, v in zip(xs, values):
        ax.text(x, v, f"{v:,.0f}", ha="center", va="bottom", fontsize=6)
    ax.set_xticks(range(len(sizes)), [f"batch {b}" for b in sizes])
    ax.set_title(name, fontsize=9)
    ax.set_ylabel("images/s")
  axes[0][0].legend(fontsize=7)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


NOTES = """\
Each call takes uint8 NumPy images `[n, H, W, 3]` and returns NumPy decisions `(score, is_ood,
pred)`: host transfer, padding, normalisation, the network, LINe, the threshold and the argmax
are all timed; images/s are medians of every timed call, ratios are within this run.

* line_jax predict: `Detector.predict`, one jitted call per bucketed batch (1, 2, 4, then
  multiples of 8: the padded size is in brackets); on the CPU the network runs in passes of
  a few images (`layout.images_per_pass`).
* line_jax exported: `line_jax.export.load(dir)(images)` of
  `Detector.export(dir, platforms=("cpu",))`: the same computation as StableHLO with a
  symbolic batch (a multiple of 8, and a one-pass function for 1, 2, 4), padded to the same
  buckets, its network in passes of a few images on a CPU as `predict`'s.
* PyTorch: `torch.from_numpy` -> float, normalise -> the same network (identical random
  weights) in `inference_mode`, channels_last -> `FastTorchLine` of
  `benchmarks/torch_reference.py` (batch grouped by predicted class, one masked head per class
  present: `end_to_end`'s "torch_line_fast") with the fitted state's masks and clip ->
  `score >= threshold`, the logits' argmax -> `.numpy()`, at `torch.get_num_threads()`
  intra-op threads, all the CPUs this process may use, as XLA.
* PyTorch, 1 thread: the same at `torch.set_num_threads(1)`, for context. On a machine other
  processes keep busy ("other processes": their average CPU cores while that batch was
  timed), PyTorch's OpenMP threads wait for one another at every operator, and a thread that
  is descheduled stalls the rest; XLA's thread pool degrades more gently. "predict / faster
  PyTorch" is the ratio against the better of the two PyTorch settings.

LINe (the official percentiles of the head: CIFAR-10 p_w = p_a = 90, ImageNet 10, 10; the clip
is the 90th percentile of the training activations) is fitted by `Detector.fit_features` on
the network's features of random images (resampled with a jitter so that every class has
rows; round-robin labels) and calibrated by `Detector.calibrate` at a TPR of 95 % on 200 other
random images; PyTorch decides with that state and threshold. The decisions of the three
implementations on the largest batch's images are compared before timing."""


def write(directory: str, payload: dict) -> str:
  """Writes `predict_throughput.{json,md,png}` into `directory/<device-slug>/`;
  returns that folder."""
  env, records = payload["environment"], payload["records"]
  title = "Predict throughput: uint8 images to decisions, line_jax vs PyTorch"
  body = ("Images per second, higher is better:\n\n" + table(records)
          + "\n\nDecisions on the same images, compared before timing:\n\n"
          + agreement_table(records) + "\n\n" + NOTES)
  folder = report.write_table(
      directory, "predict_throughput", payload, title=title,
      command="python -m benchmarks.predict_throughput --out benchmarks/results",
      footer=(f"{env['cpu']} ({env['threads']['cpu_count']} CPUs, {env['backend']} backend), "
              f"jax {env['versions']['jax']}, torch {env['versions'].get('torch')} with "
              f"{env['threads'].get('torch_intra_op')} threads, "
              f"{payload['settings']['rounds']} rounds, {payload['seconds']:.0f} s, load "
              f"average up to {payload['load_average_1_5_15_min'][0]} (1 min) on "
              f"{env['threads']['cpu_count']} CPUs"),
      table=body)
  chart(records, os.path.join(folder, "predict_throughput.png"), f"{title}\n{env['cpu']}")
  return folder


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--models", default=",".join(NETWORKS),
                      help=f"comma-separated keys of NETWORKS ({', '.join(NETWORKS)})")
  parser.add_argument("--rounds", type=int, default=3, help="blocks of calls per batch")
  parser.add_argument("--out", default=None, help="write <out>/<device>/predict_throughput.*")
  args = parser.parse_args(argv)
  from benchmarks.input_pipeline import cpu_name  # pylint: disable=g-import-not-at-top

  start, load_before = time.perf_counter(), os.getloadavg()
  records, seconds = [], {}
  for name in args.models.split(","):
    began = time.perf_counter()
    records += measure(name, rounds=args.rounds)
    seconds[name] = round(time.perf_counter() - began, 1)
    print(table([r for r in records if r["model"] == name]), f"\n{name}: {seconds[name]} s\n",
          flush=True)
  env = timing.environment()
  env["cpu"] = cpu_name()
  load = [round(max(a, b), 1) for a, b in zip(load_before, os.getloadavg())]
  payload = {"environment": env, "records": records,
             "settings": {"rounds": args.rounds, "block_seconds": BLOCK_SECONDS,
                          "calibration": "200 random images, TPR 95 %"},
             "load_average_1_5_15_min": load, "seconds": time.perf_counter() - start,
             "seconds_per_network": seconds}
  print(agreement_table(records))
  if args.out:
    write(args.out, payload)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
