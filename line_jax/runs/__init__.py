"""The library entry points the CLIs are shells over: one module per run.

Each holds a frozen config (what the run computes) and `run(config, workdir,
*, runtime=Runtime())` (`Runtime`: decoding threads, the feature cache,
progress output; how it runs, never what):

* `fit`: every scorer folded over a data set's features, resumable;
* `evaluate`: a benchmark end to end (metrics, tables, plots);
* `ablation`: LINe's parts switched on and off on a benchmark;
* `openood`: OpenOOD v1.5's protocol on an OpenOOD-layout folder (near /
  far, untuned and tuned on the validation lists);
* `tune`: hyperparameters on held-out data, each grid vmapped;
* `train`: a classifier with optax, saved as an orbax checkpoint;
* `export`: a detector fitted, calibrated and exported (`line_jax.detector`);
* `predict`: an exported detector's decisions for image files, one row each.

`Network` names the network a run reads (a line_jax checkpoint or a PyTorch
state_dict of a registered architecture); `BenchmarkData` the model and data
`evaluate` and `ablation` read.
The run modules load on first use: a CLI imports only its own.
"""

import importlib

from line_jax.runs._benchmark import BenchmarkData
from line_jax.runs._network import Network
from line_jax.runs._shared import Runtime

__all__ = ("BenchmarkData", "Network", "Runtime", "ablation", "evaluate", "export", "fit",
           "openood", "predict", "train", "tune")
_RUNS = frozenset(("ablation", "evaluate", "export", "fit", "openood", "predict", "train",
                   "tune"))


def __getattr__(name):
  if name in _RUNS:
    return importlib.import_module(f"line_jax.runs.{name}")
  raise AttributeError(f"module 'line_jax.runs' has no attribute {name!r}")
