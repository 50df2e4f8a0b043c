"""Benchmark evaluation as library functions; `python -m line_jax.evaluate` is its CLI.

    result = run_evaluation("out/", benchmark="cifar10", id_folder="cifar10-jpeg",
                            torch_checkpoint="densenet100_cifar10.pth.tar")
"""

from line_jax.evaluation._inputs import DEFAULT_CHECKPOINT
from line_jax.evaluation._inputs import Inputs
from line_jax.evaluation._inputs import evenly_spaced
from line_jax.evaluation._inputs import fashion_mnist_inputs
from line_jax.evaluation._inputs import paper_inputs
from line_jax.evaluation._ood import load_svhn_mat
from line_jax.evaluation._ood import offline_sets
from line_jax.evaluation._ood import protocol_sets
from line_jax.evaluation._report import format_table
from line_jax.evaluation._report import write_outputs
from line_jax.evaluation._run import METRICS
from line_jax.evaluation._run import fit_and_score
from line_jax.evaluation._run import metrics_of
from line_jax.evaluation._run import run_evaluation
from line_jax.evaluation._run import score_all

__all__ = (
    "DEFAULT_CHECKPOINT",
    "Inputs",
    "METRICS",
    "evenly_spaced",
    "fashion_mnist_inputs",
    "fit_and_score",
    "format_table",
    "load_svhn_mat",
    "metrics_of",
    "offline_sets",
    "paper_inputs",
    "protocol_sets",
    "run_evaluation",
    "score_all",
    "write_outputs",
)
