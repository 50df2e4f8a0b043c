"""Benchmark suites: which model, data, OOD sets and hyperparameters.

One `Suite` per benchmark `python -m line_jax.evaluate --benchmark` runs
(`SUITES`); `hparams_for` is the one rule every run takes hyperparameters by
(registry default, then the suite's, then the user's); `fashion_mnist_inputs`
and `paper_inputs` give a suite's `Inputs` (a backbone and image sources) from
local files, `Inputs.from_arrays` a custom set's.

Scorer hyperparameters that differ from the registry defaults (which are the
papers' ImageNet settings) are listed per benchmark, each with its source:

| scorer      | fashion_mnist (tuned) (0) | fashion_mnist_cifar_settings   | cifar10 / cifar100           | imagenet              |
|-------------|---------------------------|--------------------------------|------------------------------|-----------------------|
| line        | 10/10, clip = p80         | p_w 90, p_a 90, clip = p90 (1) | 90/90/1.0; 90/10/1.0 (LINe)  | 10/10/0.8 (LINe)      |
| react       | p 80                      | p 90                           | p 90 (ReAct)                 | p 90 (ReAct)          |
| dice        | p 10                      | p 90 (DICE's CIFAR)            | p 90 (DICE)                  | p 70 (DICE)           |
| ash_p/b/s   | 50 / 50 / 50              | 90 / 95 / 95 (ASH's CIFAR)     | 90 / 95 / 95 (ASH)           | 60 / 65 / 90 (ASH)    |
| scale       | p 80                      | p 85                           | p 85                         | p 85 (SCALE)          |
| knn         | k 1                       | k 50 (KNN's CIFAR)             | k 50 (KNN)                   | k 1000 (KNN)          |
| vim         | D 32                      | D 64 (2)                       | D 256 (2)                    | D 1000 (ViM's code)   |
| react_dice  | default (15, 90)          | p 90, percentile 90            | p 90 (DICE), 90 (ReAct)      | p 15, percentile 90   |

Where a benchmark names no value, the registry's default holds, and two of
those adapt to the model and data: KNN's k is one neighbour per 1,000 bank
rows (`k=None`, KNN's CIFAR ratio) and ViM's D follows the official rule on
the feature width (`dim=None`). Every other scorer runs at its registry
default everywhere: its paper's setting, which for some (GEN's M = 100 capped at the class count, NNGuide's
12,811-row bank, NCI's alpha) is the ImageNet one, there being no CIFAR
setting in the paper or official code.

(0) Chosen by `python -m line_jax.tune` on a validation split of the training
    set and a validation OOD set disjoint from every test OOD set, for every
    method alike (best validation AUROC on its grid). Several choices sit on
    the edge of their grid (DICE 10, ASH 50, KNN 1, LINe 10/10).
(1) LINe's CIFAR clip of 1.0 is in DenseNet-BC feature units (DICE's CIFAR
    code sets ReAct's threshold to 1.0 too). Measured on the DICE CIFAR-10
    checkpoint over the 50,000 training images of the JPEG copy
    (docs/cifar10), 1.0 is the 96.6th percentile of the activations; their
    90th percentile, ReAct's own CIFAR rule and what the cifar10 suite's
    `react` uses, is 0.40. This 128-feature network has other units, so
    the clip is a percentile of its own training activations
    (`TrainPercentile(90)`), resolved when fitting.
(2) ViM's paper fixes D only for features >= 1536 (D = 1000) or 768 (512);
    for the narrower CIFAR / Fashion-MNIST features we take half the width,
    rounded down to a power of two.

Normalisation: the CIFAR suites use `MEAN_STD["cifar_line"]`, mean
(0.4914, 0.4822, 0.4465), std (0.2023, 0.1994, 0.2010): the constants of the
official LINe and DICE `ood_eval.py` / `precompute.py`, with which the DICE
DenseNet-BC-100 checkpoints were trained and evaluated.

OOD sets. The embedded Fashion-MNIST ones are built at 2,000 images each (see
`line_jax.data.ood_set`). The paper's CIFAR OOD sets, each used where
it is present under `--data-dir`:

* SVHN: the official selection of `select_svhn_data.py` (LINe / DICE): the
  first 1,000 test images of each label, in the order of torchvision's
  `test_32x32.mat`, 10,000 in all. Read from `<data-dir>/svhn/test_32x32.mat`
  (torchvision's `SVHN(root="<data-dir>/svhn")` file). TFDS's `svhn_cropped`
  is not used: it stores the test split shuffled, so "the first 1,000" there
  would be other images.
* LSUN-C, LSUN-R, iSUN: ODIN's curated folders.
* Textures: DTD, the 5,640 images, resized to 32 and center-cropped.
* Places365: DIFFERENT from the paper. The official code reads a 10,000-image
  Places365 subset whose file list was never published; here it is TFDS's
  `places365_small` validation split, its first 10,000, resized to 32. Its
  numbers are therefore not comparable image for image.

Where none of a CIFAR suite's paper sets is present, the offline sets
stand in (`offline_ood`): the embedded sets built at 32x32 RGB plus
Fashion-MNIST; see `line_jax.data.ood_set` for each. ImageNet: iNaturalist, SUN,
Places, Textures (curated folders, 224 crops of 256 resizes); it has no
offline stand-in.
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
from line_jax.suites._ood import extra_sets
from line_jax.suites._ood import load_svhn_mat
from line_jax.suites._ood import offline_sets
from line_jax.suites._ood import paper_set
from line_jax.suites._ood import suite_sets

__all__ = (
    "Inputs",
    "NO_BENCHMARK",
    "OodSource",
    "SUITES",
    "Suite",
    "TrainPercentile",
    "evenly_spaced",
    "extra_sets",
    "fashion_mnist_inputs",
    "first_per_label",
    "get",
    "hparams_for",
    "load_svhn_mat",
    "missing_inputs",
    "offline_sets",
    "paper_inputs",
    "paper_ood",
    "suite_sets",
)
