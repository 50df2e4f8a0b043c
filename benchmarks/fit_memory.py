"""Peak resident memory of `python -m line_jax.fit` over 3,000 and 12,000 JPEGs.

The fit CLI streams an image folder through the grain pipeline and the
committed checkpoint, folding every scorer; its memory should not grow with
the number of images. This builds two ImageFolder trees of colour JPEGs
(10 classes; 64-128 px crops of 10 colour images bundled with scikit-image
and scikit-learn, with random size, position, flip and brightness; written
once into a cache folder, the small tree hard links to the first images of
the large one), runs the CLI on each in a fresh subprocess, and records the
child's peak resident set (`ru_maxrss` from `os.wait4`, the kernel's own
high-water mark, which no sampling can miss) and its wall time; `/proc`
samples of the resident set every `poll_s` seconds go with them.

Goal: the 12,000-image peak within 15 % of the 3,000-image peak.

    python -m benchmarks.fit_memory [--out benchmarks/results] [--cache DIR]
        [--sizes 3000,12000] [--without knn ...] [-- extra fit flags]

Each `--without NAMES` (comma-separated, repeatable) adds a pair of runs
without those scorers, to see what grows: KNN keeps every training feature
in its bank by design, NNGuide up to 12,811 of them, and the two-pass
scorers (ReAct, ViM) make the fit keep every feature row in a memory-mapped
`features.npy` for their second pass. `--out DIR` writes
`DIR/<device>/fit_memory.json` and `fit_memory.md`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

if __package__ in (None, ""):  # `python benchmarks/fit_memory.py`
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks import report  # pylint: disable=wrong-import-position
from benchmarks import timing  # pylint: disable=wrong-import-position

SIZES = (3000, 12000)
CLASSES = 10
GOAL = 0.15  # the larger run's peak may exceed the smaller's by this share
_DONE = "COMPLETE"
_REPO = pathlib.Path(__file__).resolve().parents[1]


def source_images() -> list[tuple[str, np.ndarray]]:
  """Ten `[h, w, 3]` uint8 colour images that ship with scikit-image / -learn."""
  import skimage.data  # pylint: disable=import-outside-toplevel
  import sklearn.datasets  # pylint: disable=import-outside-toplevel
  names = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field",
           "immunohistochemistry", "retina", "colorwheel")
  images = [(name, np.asarray(getattr(skimage.data, name)())[..., :3]) for name in names]
  samples = sklearn.datasets.load_sample_images()
  for name, image in zip(samples.filenames, samples.images):
    images.append((pathlib.Path(name).stem, np.asarray(image)))
  return images[:CLASSES]


def _crop(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  h, w = (int(rng.integers(64, 129)) for _ in range(2))
  h, w = min(h, image.shape[0]), min(w, image.shape[1])
  top = int(rng.integers(0, image.shape[0] - h + 1))
  left = int(rng.integers(0, image.shape[1] - w + 1))
  crop = image[top:top + h, left:left + w].astype(np.float32)
  if rng.random() < 0.5:
    crop = crop[:, ::-1]
  return np.clip(crop * rng.uniform(0.8, 1.2), 0, 255).astype(np.uint8)


def make_folder(root: str | os.PathLike, num_images: int, *, seed: int = 0) -> str:
  """`root/jpeg_<n>/<class>/<i>.jpg`: `num_images` JPEGs over 10 class folders.

  Written once: a folder with its completion marker is reused as it is.
  Image i goes to class `i % 10` and depends only on (seed, i), so the first
  images of a larger folder are those of a smaller one.
  """
  from PIL import Image  # pylint: disable=import-outside-toplevel
  folder = pathlib.Path(root) / f"jpeg_{num_images}_seed{seed}"
  if (folder / _DONE).is_file():
    return str(folder)
  sources = source_images()
  if folder.exists():
    shutil.rmtree(folder)
  for name, _ in sources:
    (folder / name).mkdir(parents=True)
  for i in range(num_images):
    name, image = sources[i % len(sources)]
    rng = np.random.default_rng([seed, i])
    Image.fromarray(_crop(image, rng)).save(folder / name / f"{i:06d}.jpg",
                                            quality=int(rng.integers(80, 96)))
  (folder / _DONE).write_text(f"{num_images}\n")
  return str(folder)


def _rss_mb(pid: int) -> float | None:
  try:
    with open(f"/proc/{pid}/status") as f:
      for line in f:
        if line.startswith("VmRSS:"):
          return int(line.split()[1]) / 1024
  except OSError:
    pass
  return None


def measure_fit(folder: str, out: str, args: Sequence[str] = (), *,
                poll_s: float = 0.5) -> dict:
  """Runs `python -m line_jax.fit --out out --dataset folder --quiet *args`.

  Returns:
    peak_rss_mb (the child's `ru_maxrss`, MiB), wall_s, rss_samples
    (`[seconds, MiB]` pairs from /proc), returncode, command.

  Raises:
    RuntimeError: if the fit fails (its stderr's tail in the message).
  """
  command = [sys.executable, "-m", "line_jax.fit", "--out", out, "--dataset", folder,
             "--quiet", *args]
  with tempfile.TemporaryFile() as stderr:
    start = time.perf_counter()
    child = subprocess.Popen(command, cwd=_REPO, stdout=subprocess.DEVNULL, stderr=stderr)
    samples = []
    while True:
      pid, status, usage = os.wait4(child.pid, os.WNOHANG)
      if pid:
        break
      rss = _rss_mb(child.pid)
      if rss is not None:
        samples.append([round(time.perf_counter() - start, 2), round(rss, 1)])
      time.sleep(poll_s)
    wall = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    if child.returncode:
      stderr.seek(0)
      tail = stderr.read().decode(errors="replace")[-2000:]
      raise RuntimeError(f"{' '.join(command)} exited with {child.returncode}:\n{tail}")
  # Linux reports ru_maxrss in KiB.
  return {"peak_rss_mb": usage.ru_maxrss / 1024, "wall_s": wall, "rss_samples": samples,
          "returncode": child.returncode, "command": " ".join(command[1:])}


def run(sizes: Sequence[int] = SIZES, *, cache: str, fit_args: Sequence[str] = (),
        without: Sequence[Sequence[str]] = (), seed: int = 0) -> list[dict]:
  """Fits every scorer on each folder size; again without each group in `without`.

  Returns:
    One record per run: images, scorers ("all", or "all but NAMES"),
    peak_rss_mb, wall_s, rss_samples, command.
  """
  root = pathlib.Path(cache)
  largest = make_folder(root, max(sizes), seed=seed)
  folders = {max(sizes): largest}
  for n in sizes:
    if n not in folders:
      folders[n] = _subset(largest, root / f"jpeg_{n}_of_{max(sizes)}_seed{seed}", n)
  variants = [("all", list(fit_args))]
  for group in without:
    from line_jax import scorers  # pylint: disable=import-outside-toplevel
    kept = [s for s in scorers.names() if s not in group]
    variants.append((f"all but {','.join(group)}",
                     [*_drop_hparams(fit_args, group), "--scorers", ",".join(kept)]))
  records = []
  for label, args in variants:
    for n in sizes:
      with tempfile.TemporaryDirectory(prefix="fit_memory_") as out:
        result = measure_fit(folders[n], os.path.join(out, "fit"), args)
      result.pop("returncode")
      records.append({"images": n, "scorers": label, **result})
  return records


def _drop_hparams(args: Sequence[str], names: Sequence[str]) -> list[str]:
  """`args` without `--hparam NAME.X=V` for the scorers `names` (the fit
  refuses hyperparameters of scorers it does not fit)."""
  kept, skip = [], False
  for i, arg in enumerate(args):
    if skip:
      skip = False
      continue
    value = arg.split("=", 1)[1] if arg.startswith("--hparam=") else (
        args[i + 1] if arg == "--hparam" and i + 1 < len(args) else None)
    if value is not None and value.split(".", 1)[0] in names:
      skip = arg == "--hparam"
      continue
    kept.append(arg)
  return kept


def _subset(largest: str, folder: pathlib.Path, num_images: int) -> str:
  """The first `num_images` images of `largest` (hard links), same classes."""
  if (folder / _DONE).is_file():
    return str(folder)
  if folder.exists():
    shutil.rmtree(folder)
  files = sorted(pathlib.Path(largest).glob("*/*.jpg"), key=lambda p: p.name)[:num_images]
  for path in files:
    target = folder / path.parent.name / path.name
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
      os.link(path, target)
    except OSError:
      shutil.copyfile(path, target)
  (folder / _DONE).write_text(f"{num_images}\n")
  return str(folder)


def summary(records: list[dict]) -> list[dict]:
  """Per scorer set: the smallest and largest runs' peaks, their ratio, the goal."""
  rows = []
  for label in dict.fromkeys(r["scorers"] for r in records):
    runs = sorted((r for r in records if r["scorers"] == label), key=lambda r: r["images"])
    small, large = runs[0], runs[-1]
    ratio = large["peak_rss_mb"] / small["peak_rss_mb"]
    rows.append({"scorers": label, "small_images": small["images"],
                 "large_images": large["images"], "small_peak_mb": small["peak_rss_mb"],
                 "large_peak_mb": large["peak_rss_mb"], "ratio": ratio,
                 "growth_mb": large["peak_rss_mb"] - small["peak_rss_mb"],
                 "within_goal": ratio <= 1 + GOAL})
  return rows


# What may grow with the images, by design; the runs without them show it.
GROWTH_NOTE = (
    "What grows with the images, by design: KNN's bank keeps every training feature "
    "(342 float32 = 1.3 KiB per image, in the accumulator and again in the fitted state); "
    "NNGuide's bank keeps up to 12,811 of them; and when a two-pass scorer is fitted "
    "(ReAct, ViM, ReAct+DICE, LINe with its percentile clip), the fit writes every feature "
    "row to a memory-mapped features.npy during the first pass and reads it back for the "
    "second, whose file pages count in the resident set while mapped. Without these, the "
    "peak does not grow.")


def table(records: list[dict]) -> str:
  lines = ["| scorers | images | peak RSS MiB | wall s |", "|---|---|---|---|"]
  for r in records:
    lines.append(f"| {r['scorers']} | {r['images']:,} | {r['peak_rss_mb']:,.0f} | "
                 f"{r['wall_s']:.1f} |")
  lines += ["", "| scorers | peak at smallest / largest, MiB | ratio | growth MiB | "
            f"within {GOAL:.0%} |", "|---|---|---|---|---|"]
  for s in summary(records):
    lines.append(f"| {s['scorers']} | {s['small_peak_mb']:,.0f} ({s['small_images']:,}) / "
                 f"{s['large_peak_mb']:,.0f} ({s['large_images']:,}) | {s['ratio']:.3f} | "
                 f"{s['growth_mb']:+,.0f} | {'yes' if s['within_goal'] else 'NO'} |")
  return "\n".join(lines + ["", GROWTH_NOTE])


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", help="write <out>/<device>/fit_memory.{json,md}")
  parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(),
                                                      "line_jax_fit_memory"),
                      help="folder for the generated JPEG trees (reused)")
  parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="comma-separated")
  parser.add_argument("--without", action="append", default=[],
                      help="comma-separated scorers for one more pair of runs without them "
                      "(repeatable)")
  parser.add_argument("--note", default="", help="a line for the markdown (e.g. the load)")
  parser.add_argument("fit_args", nargs="*", help="extra flags for line_jax.fit (after --)")
  args = parser.parse_args(argv)
  sizes = tuple(int(n) for n in args.sizes.split(","))
  without = [tuple(n for n in group.split(",") if n) for group in args.without]
  start = time.perf_counter()
  records = run(sizes, cache=args.cache, fit_args=args.fit_args, without=without)
  markdown = table(records)
  env = timing.environment()
  env["loadavg"] = os.getloadavg()
  footer = (f"peak RSS = the child's ru_maxrss (os.wait4); {env['threads']['cpu_count']} "
            f"CPUs, load average {env['loadavg'][0]:.1f} at the end (a shared machine), "
            f"{time.perf_counter() - start:.0f} s")
  if args.note:
    footer += f"; {args.note}"
  print(markdown + "\n\n" + footer)
  if args.out:
    folder = report.write_table(
        args.out, "fit_memory",
        {"environment": env, "settings": {"sizes": sizes, "fit_args": args.fit_args,
                                          "without": without, "goal": GOAL},
         "records": records, "summary": summary(records)},
        title="Peak memory of python -m line_jax.fit over a JPEG folder",
        command="python -m benchmarks.fit_memory --out " + args.out
        + "".join(f" --without {group}" for group in args.without),
        footer=footer, table=markdown)
    print(f"wrote {folder}/fit_memory.json and fit_memory.md")


if __name__ == "__main__":
  main()
