"""OpenOOD v1.5's protocol end to end on an OpenOOD-layout folder.

    result = openood.run(openood.Config("images_classic", torch_checkpoint="densenet.pth",
                                        partial_sets=True), "out/")

    lists ──> features (cached) ──> untuned fits ──> scores of ID test, near, far
                               └──> search on val ID vs val OOD ──> tuned fits ──> scores

What `python -m line_jax.evaluate --benchmark openood_cifar10` runs. The
sets are OpenOOD's own lists (`suites.openood_sets`, with the rule for
absent files); every scorer is fitted on the ID training list at the
untuned settings (the paper's for its network, else the registry defaults,
`--hparam` over them) and scores the ID test list and every near and far
set. Every scorer with a grid is then tuned as OpenOOD's automatic search
does: each grid point fitted on the training list, scored on the ID
validation list against the validation OOD list, the best AUROC kept
(`tune.tune_method`). Only then are the test sets scored, once, at the
selected point. No test image reaches the selection: it is given the
validation features alone.

Metrics (AUROC, FPR95 with ID as the positive class, AUPR-in, AUPR-out) are
reported per set and averaged over the near and over the far sets present
(the plain mean, as OpenOOD's), with the ID accuracy on the ID test list.
Files: see `_openood_report.write`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
import json
import os
import sys
import time
from typing import Any

import jax
import numpy as np

from line_jax import data
from line_jax import distributed
from line_jax import features
from line_jax import metrics as metrics_lib
from line_jax import suites
from line_jax.runs import _openood_report
from line_jax.runs._openood_report import format_table  # noqa: F401  Part of this API.
from line_jax.runs import ablation
from line_jax.runs import tune
from line_jax.runs._benchmark import read_sets
from line_jax.runs._benchmark import skipped_of
from line_jax.runs._shared import check_cache
from line_jax.runs._shared import check_out
from line_jax.runs._shared import check_positive
from line_jax.runs._shared import checked_scorers
from line_jax.runs._shared import hparams_report
from line_jax.runs._shared import report_skipped
from line_jax.runs._shared import Runtime
from line_jax.runs.evaluate import correct
from line_jax.runs.evaluate import fit_and_score
from line_jax.runs.evaluate import metrics_of

GROUPS = _openood_report.GROUPS


@dataclasses.dataclass(frozen=True)
class Config:
  """What a protocol run computes.

  Attributes:
    data_dir: OpenOOD's `images_classic/` root, holding `benchmark_imglist/`.
    benchmark: a key of `suites.OPENOOD`.
    torch_checkpoint, arch, normalization, checkpoint: the network
      (`suites.openood_backbone`).
    partial_sets: use the present files of a list with some absent.
    near, far: your own sets, `NAME=PATH` (a folder of images or a uint8
      `.npy`) or `(name, path)`, in those groups.
    scorers: registered names; empty: every one.
    hparams: `{scorer: {name: value}}` over the untuned settings.
    tune: also select each grid's point on the validation lists.
    ablation: also run LINe's ablation (one process).
    plots: write the PNGs.
    batch_size: images per network call.
    skip_bad_images: leave out images that cannot be decoded (reported).
  """

  data_dir: str
  benchmark: str = "openood_cifar10"
  torch_checkpoint: str | None = None
  arch: str | None = None
  normalization: str | None = None
  checkpoint: str | None = None
  partial_sets: bool = False
  near: tuple = ()
  far: tuple = ()
  scorers: tuple[str, ...] = ()
  hparams: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
  tune: bool = True
  ablation: bool = False
  plots: bool = True
  batch_size: int = features.IMAGES_PER_CALL
  skip_bad_images: bool = False

  @property
  def protocol(self) -> suites.OpenOODProtocol:
    if self.benchmark not in suites.OPENOOD:
      raise ValueError(f"unknown OpenOOD benchmark {self.benchmark!r}; known: "
                       f"{', '.join(suites.OPENOOD)}")
    return suites.OPENOOD[self.benchmark]

  def scorer_names(self) -> list[str]:
    """The scorers to run, checked with their hyperparameters before any work."""
    return checked_scorers(self.scorers, self.hparams, "this run")


def search_grid(name: str, untuned: Mapping[str, Any], pinned: Sequence[str]
                ) -> dict[str, list]:
  """The grid `name` is searched on: its `Scorer.grid`, each other
  hyperparameter fixed at its untuned value, and those you set (`pinned`,
  `--hparam`) fixed at yours, so the tuned row differs from the untuned
  one only where the search chose."""
  grid = {k: [v] for k, v in untuned.items()}
  grid.update({k: list(v) for k, v in tune.GRIDS[name].items() if k not in pinned})
  return grid


def select(names: Sequence[str], train, val_id, val_ood, kernel, bias, *,
           untuned: Mapping[str, Mapping[str, Any]],
           pinned: Mapping[str, Mapping[str, Any]], selected_on: Mapping[str, Any],
           progress: bool = True) -> dict[str, dict[str, Any]]:
  """OpenOOD's automatic search for each scorer with a grid, on validation data only.

  Every point is fitted on `train`, scored on `val_id` against `val_ood`,
  and the one of best AUROC kept (`tune.tune_method`). On multi-host every
  process searches alike and process 0's choice is taken by all.

  Args:
    names: scorers; those without a grid are left out.
    train: `(features [n, m], labels [n])` the points are fitted on.
    val_id: `[n_id, m]` ID validation features; val_ood: `[n_ood, m]` OOD.
    kernel, bias: the head, `[m, classes]` and `[classes]`.
    untuned: scorer -> the hyperparameters its untuned row ran with.
    pinned: scorer -> those you set, kept out of the search.
    selected_on: what the selection read, recorded with each choice.

  Returns:
    scorer -> `{"hparams": the selected point, every hyperparameter (pastes
    into fit), "percentiles", "searched": the names the search varied,
    "validation": its metrics, "grid_size", "pinned", "selected_on", "seconds"}`.
  """
  out = {}
  for name in names:
    if name not in tune.GRIDS:
      continue
    start = time.perf_counter()
    grid = search_grid(name, untuned[name], list(pinned.get(name, {})))
    result = tune.tune_method(name, *train, kernel, bias, val_id, val_ood, grid=grid,
                              check=False)
    searched = [k for k, values in grid.items() if len(values) > 1]
    out[name] = {"hparams": result["best"], "percentiles": result["best_percentiles"],
                 "searched": searched, "validation": result["metrics"],
                 "grid_size": result["grid_size"], "pinned": sorted(pinned.get(name, {})),
                 "selected_on": dict(selected_on), "seconds": time.perf_counter() - start}
    if progress and distributed.is_primary():
      print(f"tuned {name}: {({k: result['best'][k] for k in searched})} (validation AUROC "
            f"{100 * result['metrics']['auroc']:.2f} %)", file=sys.stderr, flush=True)
  # One choice for every process, even where a near tie could fall either way.
  return json.loads(distributed.gather_bytes(json.dumps(out, default=_plain).encode())[0])


def _plain(value: Any) -> Any:
  """A NumPy scalar as the Python number it holds (JSON's `default`)."""
  if isinstance(value, np.generic):
    return value.item()
  raise TypeError(f"{value!r} is not JSON")


def _everyone(cached) -> np.ndarray:
  return distributed.gather_rows(np.asarray(cached.features))


def run(config: Config, workdir: str | os.PathLike | None = None, *,
        runtime: Runtime = Runtime()) -> dict[str, Any]:
  """Runs the protocol.

  Args:
    config: what to run.
    workdir: gets the files of `_openood_report` (None: nothing); refused,
      before any work, where it holds files a protocol run does not write.
    runtime: decoding threads, the feature cache, progress output.

  Returns:
    The metrics.json dict (`_openood_report`).

  Raises:
    FileNotFoundError, ValueError: before any image is read, for the rule
      for absent files, the network, labels outside its classes, a set name
      taken twice, a validation image in a test set, no near or far set,
      or `ablation` without LINe.
  """
  start = time.perf_counter()
  protocol, names = config.protocol, config.scorer_names()
  check_positive(batch_size=config.batch_size)
  if config.ablation and "line" not in names:
    raise ValueError("--ablation is LINe's: add line to --scorers")
  if config.ablation and jax.process_count() > 1:
    raise ValueError("--ablation runs on one process; run it without --coordinator")
  if workdir is not None:
    check_out(workdir, _openood_report.OWN_FILES, marks=_openood_report.OWN_MARKS)
  check_cache(runtime)
  found = suites.openood_sets(protocol, config.data_dir, partial=config.partial_sets,
                              validation=config.tune)
  backbone, settings = suites.openood_backbone(
      protocol, torch_checkpoint=config.torch_checkpoint, arch=config.arch,
      normalization=config.normalization, checkpoint=config.checkpoint)
  _check_id_labels(found, protocol.num_classes)
  coverage = {name: c.record() for name, c in found.coverage.items()}
  sources = dict(found.sources)
  groups = {g: [n for n, c in found.coverage.items() if c.group == g] for g in GROUPS}
  yours: dict[str, list[str]] = {g: [] for g in GROUPS}
  for group, specs in (("near", config.near), ("far", config.far)):
    # A `.npy` is in the network's input shape, as evaluate's --extra-ood.
    extra = suites.extra_sets(specs, backbone.input_shape,
                              [*sources, *found.absent, *GROUPS, *_ALL.values()],
                              flag=f"--{group}")
    for spec, (name, source) in zip(specs, extra.items()):
      path = data.parse_extra_ood(spec)[1] if isinstance(spec, str) else spec[1]
      sources[name], coverage[name] = source, {"path": os.fspath(path), "used": len(source),
                                               "group": group}
      yours[group].append(name)
  if not any(groups[g] or yours[g] for g in GROUPS):
    raise FileNotFoundError(f"no near- or far-OOD set under {config.data_dir} (all absent: "
                            f"{', '.join(found.absent)}) and none of yours (--near / --far)")
  validation = found.validation()
  suites.check_disjoint(validation, {n: sources[n] for g in GROUPS for n in yours[g]})
  tests = ["id"] + [n for g in GROUPS for n in groups[g] + yours[g]]
  order = ["train", *validation, *tests]
  averages = {**groups, **{_ALL[g]: groups[g] + yours[g] for g in GROUPS if yours[g]}}
  _openood_report.say_coverage(coverage, found.absent)
  stages: dict[str, Any] = {"prepare_s": time.perf_counter() - start}

  tick = time.perf_counter()
  with read_sets(backbone, {n: sources[n] for n in order}, runtime,
                 batch_size=config.batch_size,
                 skip_bad_images=config.skip_bad_images) as cached:
    stages["features_s"] = time.perf_counter() - tick
    skipped = skipped_of(cached) if config.skip_bad_images else None
    for name, records in (skipped or {}).items():
      coverage[name]["used"] -= len(records)  # Rows scored, not files present.
      coverage[name]["skipped"] = len(records)
    kernel, bias = backbone.head_params()
    train = cached["train"]
    test_sets = {n: cached[n].features for n in tests}
    tick = time.perf_counter()
    scores, used, _ = fit_and_score(names, settings, train, kernel, bias, test_sets,
                                    overrides=config.hparams, progress=runtime.progress)
    stages["untuned_fit_and_score_s"] = time.perf_counter() - tick
    hits = distributed.gather_rows(correct(cached["id"], kernel, bias))
    result: dict[str, Any] = {
        "benchmark": protocol.name, "data_dir": os.fspath(config.data_dir),
        "model": _model_record(config, protocol), "id_accuracy": float(np.mean(hits)),
        "settings": settings, "sets": coverage, "absent": dict(found.absent),
        "groups": {g: {"sets": groups[g], "absent": [n for n, _ in getattr(protocol, g)
                                                     if n in found.absent],
                       "yours": yours[g]} for g in GROUPS},
        "hparams": {"untuned": used}, "methods": metrics_of(scores, averages)}
    if config.tune:
      tick = time.perf_counter()
      selected_on = {"id": coverage["val_id"]["list"],
                     "ood": [coverage[n]["list"] for n in validation if n != "val_id"],
                     "metric": "auroc", "fitted_on": coverage["train"]["list"]}
      val_ood = np.concatenate([_everyone(cached[n]) for n in validation if n != "val_id"])
      selection = select(
          names, (_everyone(train), distributed.gather_rows(np.asarray(train.labels))),
          _everyone(cached["val_id"]), val_ood, kernel, bias, untuned=used,
          pinned=config.hparams, selected_on=selected_on, progress=runtime.progress)
      stages["tuning_s"] = time.perf_counter() - tick
      if selection:
        tick = time.perf_counter()
        tuned_scores, tuned_used, _ = fit_and_score(
            list(selection), settings, train, kernel, bias, test_sets,
            overrides={n: s["hparams"] for n, s in selection.items()},
            progress=runtime.progress)
        stages["tuned_fit_and_score_s"] = time.perf_counter() - tick
        result["hparams"]["tuned"] = tuned_used
        result["tuned"] = metrics_of(tuned_scores, averages)
      result["selection"] = selection
    if skipped is not None:
      result["skipped"] = skipped
    tables = None
    if config.ablation:
      tick = time.perf_counter()
      settings_of = {"untuned": used["line"],
                     "tuned": result["hparams"].get("tuned", {}).get("line")}
      tables = {kind: _ablation(train, kernel, bias, test_sets, hp, averages)
                for kind, hp in settings_of.items() if hp is not None}
      stages["ablation_s"] = time.perf_counter() - tick
  if distributed.is_primary() and runtime.progress:
    print(hparams_report(settings, used, config.hparams), file=sys.stderr)
  report_skipped(skipped or {})
  stages["total_s"] = time.perf_counter() - start
  timings = _openood_report.timings(cached, stages)
  if workdir is not None and distributed.is_primary():
    _openood_report.write(workdir, result, scores, timings, tables, make_plots=config.plots)
  return result


# The average over a group's sets with yours (`--near` / `--far`) among them.
_ALL = {"near": "near_all", "far": "far_all"}


def _ablation(train, kernel, bias, sets, hparams, averages) -> dict[str, Any]:
  """LINe's ablation at `hparams`, each variant's metrics with the group averages."""
  hp = {k: hparams[k] for k in ("p_w", "p_a", "clip")}
  table = ablation.line_ablation(train.batches(), kernel, bias, sets, **hp)
  for variant in table["variants"].values():
    rows = {k: v for k, v in variant["metrics"].items() if k != "average"}
    variant["metrics"] = metrics_lib.averaged(rows, averages)
  return table


def _model_record(config: Config, protocol: suites.OpenOODProtocol) -> dict[str, Any]:
  if config.checkpoint is not None:
    return {"checkpoint": os.fspath(config.checkpoint)}
  arch = config.arch or protocol.model
  return {"torch_checkpoint": os.fspath(config.torch_checkpoint), "arch": arch,
          "normalization": config.normalization or protocol.normalization_of(arch)}


def _check_id_labels(found: suites.OpenOODSets, num_classes: int) -> None:
  """The ID lists' labels must be classes of the network, before any image is read."""
  for name in ("train", "val_id", "id"):
    if name not in found.sources:
      continue
    source = found.sources[name]
    bad = np.flatnonzero((source.labels < 0) | (source.labels >= num_classes))
    if bad.size:
      raise ValueError(f"{source.list_path}: label {source.labels[bad[0]]} of "
                       f"{source.paths[bad[0]]} is not a class in [0, {num_classes}) "
                       f"({bad.size} such lines)")
