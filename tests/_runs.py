"""The library runs as the old one-call helpers the tests were written against."""

import contextlib
import os
import tempfile

from line_jax import models
from line_jax import runs


def run_evaluation(out_dir=None, *, benchmark="fashion_mnist",
                   checkpoint=models.DEFAULT_CHECKPOINT, methods=None, extra_ood=(),
                   batch_size=512, data_dir=None, torch_checkpoint=None, id_folder=None,
                   max_train=None, max_test=None, ood_size=2000, cache_dir=None,
                   workers=None, ablation=False, hparams=None, inputs=None,
                   make_plots=True, progress=True):
  """The evaluation (and with `ablation`, LINe's ablation) as `python -m
  line_jax.evaluate` runs them, through `line_jax.runs`."""
  data = runs.BenchmarkData(
      benchmark, checkpoint=checkpoint, torch_checkpoint=torch_checkpoint, data_dir=data_dir,
      id_folder=id_folder, max_train=max_train, max_test=max_test, ood_size=ood_size,
      extra_ood=tuple(extra_ood), batch_size=batch_size)
  with contextlib.ExitStack() as stack:
    if cache_dir is None and ablation:  # As the CLI: the ablation reads evaluate's features.
      cache_dir = stack.enter_context(tempfile.TemporaryDirectory())
    runtime = runs.Runtime(workers=workers,
                           cache_dir=None if cache_dir is None else os.fspath(cache_dir),
                           progress=progress)
    result = runs.evaluate.run(
        runs.evaluate.Config(data, tuple(methods or ()), hparams or {}, make_plots), out_dir,
        inputs=inputs, runtime=runtime)
    if ablation:
      runs.ablation.run(runs.ablation.Config(data, hparams or {}, make_plots), out_dir,
                        inputs=inputs, runtime=runtime)
  return result


def run_tuning(methods=None, *, checkpoint=None, dataset="fashion_mnist", val_size=5000,
               ood_size=2000, check=True, batch_size=512, cache_dir=None, workers=None,
               progress=True):
  """`python -m line_jax.tune`'s run (`line_jax.runs.tune.run`), writing nothing."""
  config = runs.tune.Config(scorers=tuple(methods or ()),
                            checkpoint=checkpoint or models.DEFAULT_CHECKPOINT,
                            dataset=dataset, val_size=val_size, ood_size=ood_size, check=check,
                            batch_size=batch_size)
  return runs.tune.run(config, runtime=runs.Runtime(workers=workers, cache_dir=cache_dir,
                                                    progress=progress))
