"""Evaluates every registered OOD scorer on a benchmark: metrics, table, plots.

    python -m line_jax.evaluate --out DIR            # Fashion-MNIST, committed checkpoint
    python -m line_jax.evaluate --out DIR --extra-ood mine=my_images.npy
    python -m line_jax.evaluate --out DIR --benchmark cifar10 \
        --data-dir ~/tensorflow_datasets --torch-checkpoint densenet100_cifar10.pth

Steps: features of the training set, the ID test set and each OOD set
(`line_jax.features`); every scorer fitted on the training features, labels
and head with the benchmark's hyperparameters (`line_jax._protocols`); scores
of ID test and each OOD set; `line_jax.metrics.evaluate` per pair. Writes

* `DIR/metrics.json`: `{"id_accuracy": float, "methods": {method: {ood_set:
  {"fpr95", "auroc", "aupr_in", "aupr_out"}, "average": {...}}}}`, fractions;
  "average" is the mean over every OOD set of the run (extra ones included);
* `DIR/table.md`: methods as rows, OOD sets as columns, FPR95 / AUROC in %;
* `DIR/hparams.json`: the hyperparameters each method ran with;
* `DIR/roc.png` (a panel per OOD set) and `DIR/hist_<method>.png`.

The logic is `run_evaluation`, importable; `main` only parses flags.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
import dataclasses
import json
import os
import sys
import time
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from line_jax import _protocols
from line_jax import features as features_lib
from line_jax import metrics as metrics_lib
from line_jax import plots
from line_jax import scorers

DEFAULT_CHECKPOINT = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    "checkpoints", "fashion_mnist_resnet_small")
METRICS = ("fpr95", "auroc", "aupr_in", "aupr_out")
SCORE_CHUNK = 2048  # Samples per score call: bounds KNN's [chunk, bank block] temporary.


@dataclasses.dataclass
class Inputs:
  """Everything a benchmark feeds the evaluation.

  Attributes:
    model, variables: a `line_jax.models` network and its variables.
    mean, std: `[C]` normalisation in [0, 1] pixel units.
    train_images: uint8 `[n, H, W, C]`; train_labels: `[n]` ints.
    test_images: uint8 `[n_test, H, W, C]`; test_labels: `[n_test]` ints.
    ood: OOD set name -> uint8 `[n_set, H, W, C]`, in column order.
  """

  model: Any
  variables: Any
  mean: Sequence[float]
  std: Sequence[float]
  train_images: Any
  train_labels: np.ndarray
  test_images: Any
  test_labels: np.ndarray
  ood: dict[str, np.ndarray]


def fashion_mnist_inputs(checkpoint: str = DEFAULT_CHECKPOINT, *,
                         max_train: int | None = None, max_test: int | None = None,
                         ood_size: int = 2000) -> Inputs:
  """The default benchmark: Fashion-MNIST (Debian's files), the embedded OOD sets."""
  from line_jax import _checkpoint
  from line_jax import data

  model, variables, config = _checkpoint.load_model(checkpoint)
  train_images, train_labels = data.read_fashion_mnist("train")
  test_images, test_labels = data.read_fashion_mnist("test")
  mean, std = data.MEAN_STD["fashion_mnist"]
  return Inputs(
      model, variables, config.get("mean", mean), config.get("std", std),
      train_images[:max_train, :, :, None], train_labels[:max_train],
      test_images[:max_test, :, :, None], test_labels[:max_test],
      data.ood_sets(size=ood_size))


def paper_inputs(protocol: _protocols.Protocol, data_dir: str | None,
                 torch_checkpoint: str | None, *, max_train: int | None = None,
                 max_test: int | None = None) -> Inputs:
  """A paper benchmark (CIFAR-10/100, ImageNet) from prepared local data.

  Raises:
    FileNotFoundError: listing every missing input (checkpoint, TFDS
      datasets, curated folders) before anything is loaded.
  """
  missing = _protocols.missing_inputs(protocol, data_dir, torch_checkpoint)
  if missing:
    raise FileNotFoundError(
        f"benchmark {protocol.name!r} cannot run; missing:\n  - " + "\n  - ".join(missing))
  from line_jax import data
  from line_jax import models

  model, variables = models.load_torch_checkpoint(
      protocol.model, torch_checkpoint, protocol.num_classes)
  size = {"image_size": protocol.image_size, "resize_size": protocol.resize_size}
  # CIFAR's own images are already 32x32; only resize what is not.
  id_size = size if protocol.resize_size != protocol.image_size else {}
  load = dict(data_dir=data_dir, download=False, **id_size)
  # TODO(lead): ImageNet's 1.28 M training images do not fit in memory as
  # uint8; use max_train (or stream with features.FeatureBatches).
  train_split = "train" if max_train is None else f"train[:{max_train}]"
  train_images, train_labels = data.load_split(protocol.id_dataset, train_split, **load)
  test_images, test_labels = data.load_split(protocol.id_dataset, None,
                                             max_examples=max_test, **load)
  ood = {}
  for source in protocol.ood:
    if source.kind == "tfds":
      ood[source.name], _ = data.load_split(
          source.dataset, source.split, data_dir=data_dir, download=False,
          max_examples=source.max_images, **size)
    else:
      ood[source.name] = data.load_curated(source.dataset, data_dir,
                                           max_images=source.max_images, **size)
  mean, std = data.MEAN_STD[protocol.mean_std]
  return Inputs(model, variables, mean, std, train_images, train_labels,
                test_images, test_labels, ood)


def load_extra_ood(specs: Sequence[str | tuple[str, str]],
                   image_shape: tuple[int, int, int], taken: Sequence[str]
                   ) -> dict[str, np.ndarray]:
  """Reads `--extra-ood NAME=PATH.npy` sets; errors name the file and problem."""
  from line_jax import data

  out = {}
  for spec in specs:
    name, path = data.parse_extra_ood(spec) if isinstance(spec, str) else spec
    if name in out or name in taken or name == "average":
      raise ValueError(f"--extra-ood name {name!r} is already taken; choose another")
    out[name] = data.load_ood_npy(path, image_shape)
  return out


def _embedded_names() -> tuple[str, ...]:
  from line_jax.data import OOD_SET_NAMES

  return OOD_SET_NAMES


def score_all(scorer: scorers.Scorer, state: Any, feats: np.ndarray) -> np.ndarray:
  """`[n]` scores, in fixed-size chunks (the last one padded): one compilation."""
  n = feats.shape[0]
  chunk = min(SCORE_CHUNK, n)
  out = []
  for start in range(0, n, chunk):
    part = feats[start:start + chunk]
    valid = part.shape[0]
    if valid < chunk:  # Repeat real rows: zeros would be NaN for ASH-S.
      part = np.concatenate([part, np.repeat(part[-1:], chunk - valid, axis=0)])
    out.append(np.asarray(scorer.score(state, part))[:valid])
  return np.concatenate(out).astype(np.float64)


def score_methods(methods: Sequence[str], protocol: _protocols.Protocol,
                  train_features: np.ndarray, train_labels: np.ndarray, kernel,
                  bias, sets: Mapping[str, np.ndarray], *, progress: bool = True
                  ) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, dict]]:
  """Fits each method on the training features and scores every set.

  Args:
    methods: scorer names.
    protocol: gives the hyperparameters.
    train_features: `[n, features]`; train_labels: `[n]`.
    kernel: `[features, classes]`; bias: `[classes]`.
    sets: name -> `[n_set, features]`, "id" first.

  Returns:
    `(scores, hparams)`: method -> set -> `[n_set]` float64 scores, and
    method -> the hyperparameters it ran with.
  """
  scores, used = {}, {}
  bar = tqdm(methods, desc="scorers", disable=not progress, leave=False)
  for method in bar:
    bar.set_postfix_str(method)
    scorer = scorers.get(method)
    hp = _protocols.hparams_for(protocol, method, scorer.defaults, train_features)
    state = scorer.fit(train_features, train_labels, kernel, bias, **hp)
    scores[method] = {name: score_all(scorer, state, f) for name, f in sets.items()}
    used[method] = hp
  return scores, used


def metrics_of(scores: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, dict]:
  """method -> {ood_set: metrics, "average": mean of each metric over sets}."""
  out = {}
  for method, by_set in scores.items():
    rows = {name: metrics_lib.evaluate(by_set["id"], s)
            for name, s in by_set.items() if name != "id"}
    rows["average"] = {m: float(np.mean([r[m] for r in rows.values()])) for m in METRICS}
    out[method] = rows
  return out


def format_table(result: Mapping[str, Any]) -> str:
  """Markdown table: methods as rows, OOD sets (then average) as columns.

  Each cell is `FPR95 / AUROC` in percent (lower / higher is better).
  """
  methods = result["methods"]
  sets = list(next(iter(methods.values())))
  header = "| method | " + " | ".join(sets) + " |"
  lines = [
      f"ID accuracy: {100 * result['id_accuracy']:.2f} %. "
      "Cells: FPR95 / AUROC in % (FPR95 lower is better, AUROC higher).",
      "",
      header,
      "|---|" + "---|" * len(sets),
  ]
  for method, rows in methods.items():
    cells = [f"{100 * rows[s]['fpr95']:.2f} / {100 * rows[s]['auroc']:.2f}" for s in sets]
    lines.append(f"| {method} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def run_evaluation(
    out_dir: str | os.PathLike | None = None,
    *,
    benchmark: str = "fashion_mnist",
    checkpoint: str | os.PathLike = DEFAULT_CHECKPOINT,
    methods: Sequence[str] | None = None,
    extra_ood: Sequence[str | tuple[str, str]] = (),
    batch_size: int = 512,
    data_dir: str | None = None,
    torch_checkpoint: str | None = None,
    max_train: int | None = None,
    max_test: int | None = None,
    ood_size: int = 2000,
    inputs: Inputs | None = None,
    make_plots: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
  """Runs a benchmark end to end; see the module docstring.

  Args:
    out_dir: folder for metrics.json, table.md, hparams.json and PNGs (made if
      needed); None writes nothing.
    benchmark: a key of `line_jax._protocols.PROTOCOLS`.
    checkpoint: line_jax checkpoint folder (fashion_mnist only).
    methods: scorer names; None means every registered one.
    extra_ood: `NAME=PATH.npy` strings or `(name, path)` pairs; uint8 images
      of the benchmark's input shape (`[N, H, W]` allowed for one channel).
    batch_size: images per network call.
    data_dir, torch_checkpoint: inputs of the paper benchmarks.
    max_train, max_test: use only the first this many images (quick runs).
    ood_size: images per embedded OOD set (fashion_mnist).
    inputs: ready `Inputs` (tests, custom data); replaces the loading step.
    make_plots: write the PNGs.
    progress: show progress bars.

  Returns:
    The metrics.json dict: `{"id_accuracy", "methods"}`.
  """
  protocol = _protocols.get(benchmark)
  methods = list(scorers.names() if methods is None else methods)
  for method in methods:
    scorers.get(method)  # Unknown names fail before any work.
  # The user's files are checked before the (slow) loading of everything else.
  shape = (tuple(inputs.test_images.shape[1:]) if inputs is not None else
           (protocol.image_size, protocol.image_size, protocol.channels))
  taken = list(inputs.ood) if inputs is not None else (
      [s.name for s in protocol.ood] or list(_embedded_names()))
  extra = load_extra_ood(extra_ood, shape, taken)
  if inputs is None:
    if benchmark.startswith("fashion_mnist"):
      inputs = fashion_mnist_inputs(checkpoint, max_train=max_train,
                                    max_test=max_test, ood_size=ood_size)
    else:
      inputs = paper_inputs(protocol, data_dir, torch_checkpoint,
                            max_train=max_train, max_test=max_test)
  ood = {**inputs.ood, **extra}

  def extract(images, label):
    return features_lib.extract(inputs.model, inputs.variables, images, mean=inputs.mean,
                                std=inputs.std, batch_size=batch_size,
                                progress=label if progress else False)

  _, train_features = extract(inputs.train_images, "features: train")
  test_logits, test_features = extract(inputs.test_images, "features: ID test")
  sets = {"id": test_features}
  for name, images in ood.items():
    sets[name] = extract(images, f"features: {name}")[1]
  params = inputs.variables["params"]["fc"]
  scores, used = score_methods(methods, protocol, train_features,
                               np.asarray(inputs.train_labels), params["kernel"],
                               params["bias"], sets, progress=progress)
  accuracy = float(np.mean(np.argmax(test_logits, axis=1) == np.asarray(inputs.test_labels)))
  result = {"id_accuracy": accuracy, "methods": metrics_of(scores)}
  if out_dir is not None:
    write_outputs(out_dir, result, scores, used, make_plots=make_plots, progress=progress)
  return result


def write_outputs(out_dir, result, scores, used, *, make_plots=True, progress=True) -> None:
  """Writes metrics.json, hparams.json, table.md and (optionally) the PNGs."""
  out_dir = os.fspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "metrics.json"), "w") as f:
    json.dump(result, f, indent=2)
  with open(os.path.join(out_dir, "hparams.json"), "w") as f:
    json.dump(used, f, indent=2)
  with open(os.path.join(out_dir, "table.md"), "w") as f:
    f.write(format_table(result))
  if not make_plots:
    return
  plots.plot_roc(scores, os.path.join(out_dir, "roc.png"))
  for method in tqdm(scores, desc="plots", disable=not progress, leave=False):
    plots.plot_histograms(method, scores[method], os.path.join(out_dir, f"hist_{method}.png"))


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m line_jax.evaluate", description=__doc__.split("\n")[0])
  p.add_argument("--out", required=True, help="output folder")
  p.add_argument("--benchmark", default="fashion_mnist", choices=list(_protocols.PROTOCOLS))
  p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="line_jax checkpoint folder")
  p.add_argument("--methods", default=None, help="comma-separated scorer names (default: all)")
  p.add_argument("--extra-ood", action="append", default=[], metavar="NAME=PATH.npy",
                 help="add a uint8 [N, H, W(, C)] OOD set; repeatable")
  p.add_argument("--batch-size", type=int, default=512)
  p.add_argument("--data-dir", default=None, help="TFDS data and curated OOD folders")
  p.add_argument("--torch-checkpoint", default=None, help="PyTorch state_dict (paper benchmarks)")
  p.add_argument("--max-train", type=int, default=None)
  p.add_argument("--max-test", type=int, default=None)
  p.add_argument("--no-plots", action="store_true")
  return p


def main(argv: Sequence[str] | None = None) -> None:
  args = _parser().parse_args(argv)
  start = time.perf_counter()
  try:
    result = run_evaluation(
        args.out, benchmark=args.benchmark, checkpoint=args.checkpoint,
        methods=None if args.methods is None else args.methods.split(","),
        extra_ood=args.extra_ood, batch_size=args.batch_size, data_dir=args.data_dir,
        torch_checkpoint=args.torch_checkpoint, max_train=args.max_train,
        max_test=args.max_test, make_plots=not args.no_plots)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
  print(format_table(result))
  print(f"wrote {args.out} in {time.perf_counter() - start:.1f} s on {jax.devices()[0].platform}")


if __name__ == "__main__":
  main()
