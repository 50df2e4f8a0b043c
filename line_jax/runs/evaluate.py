"""A benchmark end to end: features once, every scorer fitted and scored, metrics.

    result = evaluate.run(evaluate.Config(BenchmarkData("cifar10", id_folder="cifar10",
                          torch_checkpoint="densenet100_cifar10.pth.tar")), "out/")
    BenchmarkData("cifar10", id_folder="cifar10",      # a network of your own
                  network=Network(torch_checkpoint="r18.pth", arch="resnet18_cifar"))

    features (cached) ──> each scorer's fold ──> scores per set ──> metrics, table, plots
                                                              └──> scores/<set>.csv, thresholds

What `python -m line_jax.evaluate` runs. The training, test and OOD sets
stream through the input pipeline and the backbone into the feature cache
(`runs._benchmark.features_of`), then every scorer is fitted from batches of
the cached training features, with the hyperparameters of the settings the
inputs name (a benchmark's own, or the registry defaults for
`Inputs.from_arrays`; `suites.hparams_for`, the rule `fit` follows too), and
scores each set. The hyperparameters each scorer ran with are printed once
and written into `metrics.json` and `hparams.json`; so are, with
`BenchmarkData(skip_bad_images=True)`, the images left out because they
cannot be decoded (`metrics.json`'s "skipped"). Every input's scores are
written beside the metrics, one file per set, for an audit (`run`), with
each scorer's threshold at 95 % TPR on the ID test set and its decision.
On multi-host each process extracts and scores its own shard of every set;
the fits merge across processes, the scores (with each input's index and
label) are gathered, and process 0 alone writes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
import os
import sys
import time
from typing import Any

import jax
import numpy as np

from line_jax import _progress
from line_jax import _scoring
from line_jax import calibration
from line_jax import distributed
from line_jax import fold
from line_jax import metrics as metrics_lib
from line_jax import scorers
from line_jax import suites
from line_jax.features import cache
from line_jax.runs import _report
from line_jax.runs import ablation
from line_jax.runs._benchmark import benchmark_sets
from line_jax.runs._benchmark import BenchmarkData
from line_jax.runs._benchmark import rows_of
from line_jax.runs._benchmark import skipped_of
from line_jax.runs._benchmark import user_hparams
from line_jax.runs._report import format_table  # noqa: F401  Part of this module's API.
from line_jax.runs._shared import check_cache
from line_jax.runs._shared import check_out
from line_jax.runs._shared import checked_scorers
from line_jax.runs._shared import hparams_report
from line_jax.runs._shared import report_skipped
from line_jax.runs._shared import Runtime

METRICS = metrics_lib.NAMES
TPR = 0.95  # thresholds.json: each scorer's threshold keeps this share of the ID test set.


@dataclasses.dataclass(frozen=True)
class Config:
  """What an evaluation computes.

  Attributes:
    data: the benchmark's model and data.
    scorers: registered scorer names; empty: every one.
    hparams: `{scorer: {name: value}}` over the settings the inputs name
      (and over the Inputs' own `hparams`).
    plots: write the PNGs (ROC curves, score histograms).
    ablation: also run LINe's ablation on the same features
      (`runs.ablation`; one process).
  """

  data: BenchmarkData = BenchmarkData()
  scorers: tuple[str, ...] = ()
  hparams: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
  plots: bool = True
  ablation: bool = False

  def scorer_names(self) -> list[str]:
    """The scorers to run, checked with their hyperparameters before any work."""
    return checked_scorers(self.scorers, self.hparams, "this evaluation")


def fit_and_score(names: Sequence[str], suite: suites.Suite | str | None,
                  train: cache.CachedSet, kernel, bias, sets: Mapping[str, Any], *,
                  overrides: Mapping[str, Mapping[str, Any]] | None = None,
                  progress: bool = True
                  ) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, dict], dict[str, Any]]:
  """Fits every scorer in one fold over the cached training set; scores every set.

  The scorers fold side by side (`fold.chain`), so the training features are
  read once per pass for all of them, merged across processes after each.

  Args:
    names: scorer names.
    suite: whose settings the scorers take (`suites.hparams_for`; "none":
      the registry defaults).
    train: the cached training features and labels.
    kernel: `[features, classes]`; bias: `[classes]`.
    sets: name -> `[n_set, features]` (memmaps), "id" first.
    overrides: `{scorer: {hyperparameter: value}}` over the suite's.

  Returns:
    `(scores, hparams, seconds)`: scorer -> set -> `[n_set]` float64 scores
    (every process's rows), scorer -> the hyperparameters it ran with, and
    `{"fold_s": the shared fold, "finalize_and_score_s": {scorer: s}}`.
  """
  hparams = {name: suites.hparams_for(suite, name, (overrides or {}).get(name),
                                      train.features) for name in names}
  for name, hp in hparams.items():
    scorers.get(name).check_hparams(hp)
  folds = {name: scorers.get(name).fold for name in names}
  chained = fold.chain(folds)
  start = time.perf_counter()
  acc = chained.init(kernel, bias, **hparams)
  if chained.reads_data:
    acc = fold.accumulate(chained, acc, train.batches(),
                          check=fold.batch_check(chained, kernel, bias))
  seconds = {"fold_s": time.perf_counter() - start, "finalize_and_score_s": {}}
  accs, scores, used = dict(acc.accs), {}, {}
  del acc  # Each scorer's accumulator is freed once its state is made.
  for name, bar in _progress.iterate(names, "scorers", enabled=progress):
    bar.set_postfix_str(name)
    start = time.perf_counter()
    scorer = scorers.get(name)
    state = folds[name].finalize(accs.pop(name))
    scores[name] = {set_name: _gathered_scores(scorer, state, f, set_name)
                    for set_name, f in sets.items()}
    used[name] = scorers.resolved_hparams(hparams[name], state)
    seconds["finalize_and_score_s"][name] = time.perf_counter() - start
  return scores, used, seconds


def _gathered_scores(scorer, state, features, set_name: str) -> np.ndarray:
  """`[n]` scores of every process's rows of a set; a NaN score (a feature row
  holding NaN or Inf) is refused on every process alike, by its row in the set."""
  scores = distributed.gather_rows(scorer.score_all(state, features, nonfinite="nan"))
  bad = np.flatnonzero(np.isnan(scores))
  if bad.size:
    raise ValueError(f"{set_name}: {scorer.name} scores NaN at "
                     f"{_scoring.named_rows(bad, scores.size)}: their features hold NaN or "
                     "Inf (or the scorer cannot score them)")
  return scores


def metrics_of(scores: Mapping[str, Mapping[str, np.ndarray]],
               groups: Mapping[str, Sequence[str]] | None = None) -> dict[str, dict]:
  """scorer -> {OOD set: metrics, group: mean of each metric over its sets}
  of `{scorer: {set: [n] scores}}` ("id": the ID test scores); `groups`
  (`metrics.averaged`) defaults to "average" over every OOD set."""
  out = {}
  for name, by_set in scores.items():
    rows = {set_name: metrics_lib.ood_metrics(by_set["id"], s)
            for set_name, s in by_set.items() if set_name != "id"}
    out[name] = metrics_lib.averaged(rows, {"average": list(rows)} if groups is None else groups)
  return out


def thresholds_of(scores: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, dict]:
  """scorer -> its threshold keeping `TPR` of the ID test scores ("id"):
  `calibration.at_tpr(...).to_json()`, or `{"refused": why}` where the set
  is too small to set one (`calibration.MIN_TAIL`); the run goes on."""
  out = {}
  for name, by_set in scores.items():
    try:
      out[name] = calibration.at_tpr(by_set["id"], TPR).to_json()
    except ValueError as e:
      out[name] = {"refused": str(e)}
  return out


def correct(cached: cache.CachedSet, kernel, bias, chunk: int = 8192) -> np.ndarray:
  """`[n]` float64, 1 where the head `features @ kernel + bias` predicts the label."""
  kernel = np.asarray(kernel, np.float32)
  bias = 0.0 if bias is None else np.asarray(bias, np.float32)
  hits = [np.argmax(np.asarray(cached.features[i:i + chunk]) @ kernel + bias, axis=1)
          == cached.labels[i:i + chunk] for i in range(0, len(cached), chunk)]
  return np.concatenate(hits).astype(np.float64)


def run(config: Config = Config(), workdir: str | os.PathLike | None = None, *,
        inputs: suites.Inputs | None = None, runtime: Runtime = Runtime()) -> dict[str, Any]:
  """Runs a benchmark end to end.

  Writes (when `workdir` is set) `metrics.json` (`{"id_accuracy", "settings":
  whose hyperparameters, "hparams": {scorer: what it ran with}, "methods":
  {scorer: {ood_set: {"fpr95", "auroc", "aupr_in", "aupr_out"}, "average"}}}`,
  fractions; "average" is the mean over every OOD set of the run, extra ones
  included; with `skip_bad_images` also "skipped": `{set: [{"index", "path",
  "error"}, ...]}` of the images left out, by index in each set), `table.md`
  (FPR95 / AUROC in %), `hparams.json`, `timings.json`, with `config.plots`
  `roc.png` and `hist_<scorer>.png`, and with `config.ablation` the files of
  `runs.ablation`. And, to audit any number above:

  * `thresholds.json`: `{scorer: calibration.at_tpr(ID test scores, 0.95)
    .to_json()}` (`threshold`, `achieved`, `interval`, `count`, ...: an
    input is ID where it scores at least `threshold`), or `{scorer:
    {"refused": why}}` where the ID test set is too small (under 200 inputs);
    set on the ID test scores themselves, so it keeps 95 % of them by
    construction;
  * `scores/<set>.csv` for "id" (the ID test set) and each OOD set: a
    header, then one line per input in the set's order: `index` (in its
    data set, through subsets: as "skipped" counts), `path` (its file; empty
    for pixels), `label` (-1: none), and per scorer `<scorer>` (the score,
    float64 written exactly) and `<scorer>_ood` (1: out at the threshold, 0:
    in, empty where refused).

  Args:
    config: what to evaluate.
    workdir: output folder (made if needed; refused, before any work, where
      it holds files an evaluation does not write); None writes nothing.
    inputs: ready `suites.Inputs` (custom data) instead of the benchmark's,
      at the settings they name (`Inputs.from_arrays`: the registry
      defaults) with their `hparams`, then `config.hparams`, over them.
    runtime: decoding threads, the feature cache (None: a temporary folder,
      removed at the end), progress output.

  Returns:
    The metrics.json dict: `{"id_accuracy", "settings", "hparams", "methods"}`
    (and "skipped").
  """
  start = time.perf_counter()
  names = config.scorer_names()
  if config.ablation and jax.process_count() > 1:
    raise ValueError("--ablation runs on one process; run it without --coordinator")
  if workdir is not None:
    check_out(workdir, _report.OWN_FILES, marks=_report.OWN_MARKS)
  check_cache(runtime)
  with benchmark_sets(config.data, runtime, inputs=inputs) as (inputs, sources, cached):
    skipped = skipped_of(cached) if config.data.skip_bad_images else None
    train = cached.pop("train")
    # Which input each score is (collective: every process or none).
    rows = None if workdir is None else rows_of(sources, cached, config.data.batch_size)
    kernel, bias = inputs.backbone.head_params()
    sets = {name: c.features for name, c in cached.items()}
    overrides = user_hparams(inputs, config.hparams)
    scores, used, fit_seconds = fit_and_score(names, inputs.settings, train, kernel, bias,
                                              sets, overrides=overrides,
                                              progress=runtime.progress)
    hits = distributed.gather_rows(correct(cached["id"], kernel, bias))
    result = {"id_accuracy": float(np.mean(hits)), "settings": inputs.settings,
              "hparams": used, "methods": metrics_of(scores)}
    thresholds = thresholds_of(scores)
    if skipped is not None:
      result["skipped"] = skipped
    if config.ablation:
      hp = suites.hparams_for(inputs.settings, "line", overrides.get("line"), train.features)
      table = ablation.line_ablation(train.batches(), kernel, bias, sets, **hp)
  timings = _report.timings({"train": train, **cached}, fit_seconds,
                            time.perf_counter() - start)
  if distributed.is_primary() and runtime.progress:
    print(hparams_report(inputs.settings, used, overrides), file=sys.stderr)
    refused = [name for name, t in thresholds.items() if "refused" in t]
    if refused:
      print(f"{_report.THRESHOLDS_FILE}: no threshold for {', '.join(refused)}: "
            f"{thresholds[refused[0]]['refused']}", file=sys.stderr)
  report_skipped(skipped or {})
  if workdir is not None and distributed.is_primary():
    _report.write_outputs(workdir, result, scores, used, timings, make_plots=config.plots,
                          progress=runtime.progress, rows=rows, thresholds=thresholds)
    if config.ablation:
      ablation.write(table, workdir, plots=config.plots)
  return result
