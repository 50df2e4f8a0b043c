"""One evaluation: features once, every scorer fitted and scored, metrics.

    features (cached) ──> fit_from_batches per scorer ──> scores per set ──> metrics

The training, test and OOD sets stream through the input pipeline into
memmaps (`line_jax.feature_cache`, shared with `fit` and `tune`), then every
registered scorer is fitted from batches of the cached training features,
with the benchmark's hyperparameters, and scores each set in fixed-size
chunks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import os
import tempfile
import time
from typing import Any

import jax
import numpy as np

from line_jax import _progress
from line_jax import _protocols
from line_jax import feature_cache
from line_jax import metrics as metrics_lib
from line_jax import scorers
from line_jax.evaluation import _inputs as inputs_lib
from line_jax.evaluation import _ood
from line_jax.evaluation import _report

METRICS = ("fpr95", "auroc", "aupr_in", "aupr_out")
SCORE_CHUNK = 2048  # Samples per score call: bounds KNN's [chunk, bank block] temporary.
FIT_BATCH = 4096  # Cached training rows per fit_from_batches batch.


def score_all(scorer: scorers.Scorer, state: Any, feats) -> np.ndarray:
  """`[n]` scores, in fixed-size chunks (the last one padded): one compilation.

  Args:
    scorer: a registered scorer.
    state: its fitted state.
    feats: `[n, features]`, any sliceable array (a memmap is read chunk by chunk).
  """
  n = feats.shape[0]
  chunk = min(SCORE_CHUNK, n)
  out = []
  for start in range(0, n, chunk):
    part = np.asarray(feats[start:start + chunk])
    valid = part.shape[0]
    if valid < chunk:  # Repeat real rows: zeros would be NaN for ASH-S.
      part = np.concatenate([part, np.repeat(part[-1:], chunk - valid, axis=0)])
    out.append(np.asarray(scorer.score(state, part))[:valid])
  return np.concatenate(out).astype(np.float64)


def fit_and_score(methods: Sequence[str], protocol: _protocols.Protocol,
                  train: feature_cache.CachedSet, kernel, bias, sets: Mapping[str, Any], *,
                  overrides: Mapping[str, Mapping[str, Any]] | None = None,
                  progress: bool = True
                  ) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, dict], dict[str, float]]:
  """Fits each method from batches of the cached training set; scores every set.

  Args:
    methods: scorer names.
    protocol: gives the hyperparameters (`_protocols.hparams_for`).
    train: the cached training features and labels.
    kernel: `[features, classes]`; bias: `[classes]`.
    sets: name -> `[n_set, features]` (memmaps), "id" first.
    overrides: `{method: {hyperparameter: value}}` over the protocol's.

  Returns:
    `(scores, hparams, seconds)`: method -> set -> `[n_set]` float64 scores,
    method -> the hyperparameters it ran with, method -> fit + score time.
  """
  scores, used, seconds = {}, {}, {}
  for method, bar in _progress.iterate(methods, "scorers", enabled=progress):
    bar.set_postfix_str(method)
    start = time.perf_counter()
    scorer = scorers.get(method)
    hp = _protocols.hparams_for(protocol, method, (overrides or {}).get(method), train.features)
    state = scorer.fit_from_batches(train.batches(FIT_BATCH), kernel, bias, **hp)
    scores[method] = {name: _all_processes(score_all(scorer, state, f))
                      for name, f in sets.items()}
    used[method] = scorers.resolved_hparams(hp, state)
    seconds[method] = time.perf_counter() - start
  return scores, used, seconds


def _all_processes(local: np.ndarray) -> np.ndarray:
  """Every process's rows, in process order (each scored its own shard)."""
  if jax.process_count() == 1:
    return local
  import flax.serialization  # pylint: disable=g-import-not-at-top
  from line_jax.scorers import _protocol  # pylint: disable=g-import-not-at-top
  parts = _protocol.gather_bytes(flax.serialization.msgpack_serialize(np.asarray(local)))
  return np.concatenate([flax.serialization.msgpack_restore(p) for p in parts])


def _own_shard(source: Sequence, batch_size: int) -> Sequence:
  """This process's contiguous shard of whole batches (all of it on one process)."""
  if jax.process_count() == 1:
    return source
  from line_jax import _cli  # pylint: disable=g-import-not-at-top
  start, stop = _cli.batch_shard(len(source), batch_size, jax.process_index(),
                                 jax.process_count())
  if start == stop:
    raise ValueError(f"a set of {len(source)} images leaves process {jax.process_index()} no "
                     f"batch of {batch_size}; use a smaller --batch-size or fewer processes")
  from line_jax import data  # pylint: disable=g-import-not-at-top
  return data.Subset.range(source, start, stop)


def metrics_of(scores: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, dict]:
  """method -> {ood_set: metrics, "average": mean of each metric over sets}."""
  out = {}
  for method, by_set in scores.items():
    rows = {name: metrics_lib.evaluate(by_set["id"], s)
            for name, s in by_set.items() if name != "id"}
    rows["average"] = {m: float(np.mean([r[m] for r in rows.values()])) for m in METRICS}
    out[method] = rows
  return out


def extract_sets(inputs: inputs_lib.Inputs, sets: Mapping[str, Sequence], folder: str, *,
                 batch_size: int, workers: int | None, progress: bool,
                 scratch: str | None = None) -> dict[str, feature_cache.CachedSet]:
  """Each source's features from the cache in `folder`, or streamed through
  the pipeline and the network into it. A source of a kind the cache cannot
  key (a Sequence of your own) is extracted into `scratch` (default:
  `folder`) under a key of this run alone."""
  from line_jax import data

  height, _, channels = inputs.image_shape
  preprocess = data.Preprocess(height, inputs.resize_size or height, channels)
  model_key = feature_cache.model_key(inputs.model, inputs.variables, mean=inputs.mean,
                                      std=inputs.std, preprocess=preprocess, head=inputs.head)
  out = {}
  for name, source in sets.items():
    batches = data.image_batches(source, preprocess, batch_size=min(batch_size, len(source)),
                                 workers=workers)
    key, where = feature_cache.key(model_key, source), folder
    if key is None:  # Not cacheable: a key of this run alone, in the scratch folder.
      key = feature_cache.fingerprint(model_key, [repr(source), os.getpid(), time.time_ns()])
      where = scratch or folder
    out[name] = feature_cache.extract(
        batches, len(source), inputs.model, inputs.variables, mean=inputs.mean,
        std=inputs.std, head=inputs.head, folder=where, key=key,
        description=f"{name}: {source!r}", progress=f"features: {name}" if progress else False)
  return out


def correct(cached: feature_cache.CachedSet, kernel, bias, chunk: int = 8192) -> np.ndarray:
  """`[n]` float64, 1 where the head `features @ kernel + bias` predicts the label."""
  kernel = np.asarray(kernel, np.float32)
  bias = 0.0 if bias is None else np.asarray(bias, np.float32)
  hits = [np.argmax(np.asarray(cached.features[i:i + chunk]) @ kernel + bias, axis=1)
          == cached.labels[i:i + chunk] for i in range(0, len(cached), chunk)]
  return np.concatenate(hits).astype(np.float64)


def run_evaluation(
    out_dir: str | os.PathLike | None = None,
    *,
    benchmark: str = "fashion_mnist",
    checkpoint: str | os.PathLike = inputs_lib.DEFAULT_CHECKPOINT,
    methods: Sequence[str] | None = None,
    extra_ood: Sequence[str | tuple[str, str]] = (),
    batch_size: int = 512,
    data_dir: str | None = None,
    torch_checkpoint: str | None = None,
    id_folder: str | None = None,
    max_train: int | None = None,
    max_test: int | None = None,
    ood_size: int = 2000,
    cache_dir: str | os.PathLike | None = None,
    workers: int | None = None,
    ablation: bool = False,
    hparams: Mapping[str, Mapping[str, Any]] | None = None,
    inputs: inputs_lib.Inputs | None = None,
    make_plots: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
  """Runs a benchmark end to end.

  Writes (when `out_dir` is set) `metrics.json` (`{"id_accuracy", "methods":
  {method: {ood_set: {"fpr95", "auroc", "aupr_in", "aupr_out"}, "average"}}}`,
  fractions; "average" is the mean over every OOD set of the run, extra ones
  included), `table.md` (FPR95 / AUROC in %), `hparams.json`, `timings.json`,
  `roc.png` and `hist_<method>.png`; with `ablation`, `ablation.json` and
  `ablation.md` (`line_jax.ablation`).

  Args:
    out_dir: output folder (made if needed); None writes nothing.
    benchmark: a key of `line_jax._protocols.PROTOCOLS`.
    checkpoint: line_jax checkpoint folder (fashion_mnist only).
    methods: scorer names; None means every registered one.
    extra_ood: `NAME=PATH.npy` strings or `(name, path)` pairs; uint8 images
      of the benchmark's input shape (`[N, H, W]` allowed for one channel).
    batch_size: images per network call.
    data_dir: TFDS datasets and the paper's OOD sets.
    torch_checkpoint: PyTorch state_dict of a paper benchmark's network.
    id_folder: ID `train/` and `test/` in ImageFolder layout (else TFDS).
    max_train, max_test: evenly spaced subsets of this size (quick runs).
    ood_size: images per offline OOD set.
    cache_dir: keep the feature memmaps here and reuse them on the next run;
      None uses a temporary folder, removed at the end.
    workers: decoding threads of the input pipeline (None: one per core).
    ablation: also run LINe's ablation (`line_jax.ablation`).
    hparams: `{method: {hyperparameter: value}}` over the benchmark's
      settings (`_protocols.hparams_for`, the rule `fit` follows too).
    inputs: ready `Inputs` (tests, custom data); replaces the loading step.
    make_plots: write the PNGs.
    progress: show progress bars.

  Returns:
    The metrics.json dict: `{"id_accuracy", "methods"}`.
  """
  start = time.perf_counter()
  protocol = _protocols.get(benchmark)
  methods = list(scorers.names() if methods is None else methods)
  for method in methods:
    scorers.get(method)  # Unknown names fail before any work.
  # The user's files are checked before the (slow) loading of everything else.
  shape = inputs.image_shape if inputs is not None else (
      protocol.image_size, protocol.image_size, protocol.channels)
  taken = list(inputs.ood) if inputs is not None else (
      [s.name for s in protocol.ood] + list(protocol.offline_ood))
  extra = _ood.extra_sets(extra_ood, shape, taken)
  if inputs is None:
    if benchmark.startswith("fashion_mnist"):
      inputs = inputs_lib.fashion_mnist_inputs(checkpoint, max_train=max_train,
                                               max_test=max_test, ood_size=ood_size)
    else:
      inputs = inputs_lib.paper_inputs(protocol, data_dir, torch_checkpoint, id_folder=id_folder,
                                       max_train=max_train, max_test=max_test, ood_size=ood_size)
  if ablation and jax.process_count() > 1:
    raise ValueError("--ablation runs on one process; run it without --coordinator")
  # On multi-host each process extracts and scores its own shard of every set;
  # the fits merge across processes (`fit_from_batches`), the scores are
  # gathered, and process 0 alone writes.
  sources = {name: _own_shard(source, batch_size) for name, source in
             {"train": inputs.train, "id": inputs.test, **inputs.ood, **extra}.items()}
  with tempfile.TemporaryDirectory(prefix="line_jax_features_") as tmp:
    folder = os.fspath(cache_dir or tmp)
    cached = extract_sets(inputs, sources, folder, scratch=tmp, batch_size=batch_size,
                          workers=workers, progress=progress)
    train = cached.pop("train")
    kernel, bias = inputs.head_params()
    sets = {name: c.features for name, c in cached.items()}
    scores, used, fit_seconds = fit_and_score(methods, protocol, train, kernel, bias, sets,
                                              overrides=hparams, progress=progress)
    hits = _all_processes(correct(cached["id"], kernel, bias))
    result = {"id_accuracy": float(np.mean(hits)), "methods": metrics_of(scores)}
    table = None
    if ablation:
      from line_jax import ablation as ablation_lib

      line_hp = _protocols.hparams_for(protocol, "line", (hparams or {}).get("line"),
                                       train.features)
      table = ablation_lib.line_ablation(train.batches(FIT_BATCH), kernel, bias,
                                         sets, **line_hp)
  timings = _report.timings({"train": train, **cached}, fit_seconds,
                            time.perf_counter() - start)
  if out_dir is not None and jax.process_index() == 0:
    _report.write_outputs(out_dir, result, scores, used, timings, ablation=table,
                          make_plots=make_plots, progress=progress)
  return result
