"""Benchmark suites: which model, data, OOD sets and hyperparameters.

One `Suite` per benchmark `python -m line_jax.evaluate --benchmark` runs
(`SUITES`); `hparams_for` is the one rule every run takes hyperparameters by
(registry default, then the suite's, then the user's); `fashion_mnist_inputs`
and `paper_inputs` give a suite's `Inputs` (a backbone and image sources) from
local files, at its settings; `Inputs.from_arrays` a custom set's, at the
registry defaults unless it names a suite (`settings=`), with the user's
`hparams=` over either.

Every suite's settings, each with its source, its normalisation and its OOD
sets (where the paper's differ from what runs here) are in `docs/suites.md`.

`OPENOOD` holds OpenOOD v1.5's benchmarks (`--benchmark openood_cifar10`): its
own image lists on a user's OpenOOD-layout folder (`openood_sets`, with the
rule for absent files) and the network they read (`openood_backbone`).
"""

from line_jax.suites._catalog import NO_BENCHMARK
from line_jax.suites._catalog import OodSource
from line_jax.suites._catalog import SUITES
from line_jax.suites._catalog import Suite
from line_jax.suites._catalog import TrainPercentile
from line_jax.suites._catalog import first_per_label
from line_jax.suites._catalog import get
from line_jax.suites._catalog import hparams_for
from line_jax.suites._catalog import missing_inputs
from line_jax.suites._catalog import paper_ood
from line_jax.suites._inputs import Inputs
from line_jax.suites._inputs import evenly_spaced
from line_jax.suites._inputs import fashion_mnist_inputs
from line_jax.suites._inputs import paper_inputs
from line_jax.suites._openood import Coverage
from line_jax.suites._openood import OPENOOD
from line_jax.suites._openood import OpenOODProtocol
from line_jax.suites._openood import OpenOODSets
from line_jax.suites._openood import VAL_OOD_PREFIX
from line_jax.suites._openood import check_disjoint
from line_jax.suites._openood import openood_backbone
from line_jax.suites._openood import openood_sets
from line_jax.suites._ood import extra_sets
from line_jax.suites._ood import load_svhn_mat
from line_jax.suites._ood import offline_sets
from line_jax.suites._ood import paper_set
from line_jax.suites._ood import suite_sets

__all__ = (
    "Coverage",
    "Inputs",
    "NO_BENCHMARK",
    "OPENOOD",
    "OodSource",
    "OpenOODProtocol",
    "OpenOODSets",
    "SUITES",
    "Suite",
    "TrainPercentile",
    "VAL_OOD_PREFIX",
    "check_disjoint",
    "evenly_spaced",
    "extra_sets",
    "fashion_mnist_inputs",
    "first_per_label",
    "get",
    "hparams_for",
    "load_svhn_mat",
    "missing_inputs",
    "offline_sets",
    "openood_backbone",
    "openood_sets",
    "paper_inputs",
    "paper_ood",
    "suite_sets",
)
