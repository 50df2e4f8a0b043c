"""The stock TFDS datasets the benchmarks use, and how.

`tfds.data_source` (`line_jax.data.TfdsSource`) gives random access over
array_record files and needs no TensorFlow once a dataset is prepared. Preparing the stock builders, however,
does need TensorFlow (their extraction code uses `tf.io`) and a network; on a
machine with neither, prepare elsewhere and pass the `data_dir`.

Dataset names are the stock TFDS names:

| Role | Name              | Split used for evaluation | Images              |
|------|-------------------|---------------------------|---------------------|
| ID   | `cifar10`         | `test` (10,000)           | 32x32x3             |
| ID   | `cifar100`        | `test` (10,000)           | 32x32x3             |
| ID   | `imagenet2012`    | `validation` (50,000)     | variable, RGB       |
| ID   | `fashion_mnist`   | `test` (10,000)           | 28x28x1             |
| OOD  | `svhn_cropped`    | `test` (26,032)           | 32x32x3             |
| OOD  | `dtd`             | `test` (1,880)            | variable, RGB       |
| OOD  | `places365_small` | `validation` (36,500)     | 256x256x3           |

`imagenet2012` cannot be downloaded by TFDS: put `ILSVRC2012_img_train.tar`
and `ILSVRC2012_img_val.tar` (from https://image-net.org/download-images) in a
folder and pass it as `manual_dir` (TFDS's default is
`<data_dir>/downloads/manual/`).
"""

from __future__ import annotations

import dataclasses



@dataclasses.dataclass(frozen=True)
class StockDataset:
  """How the benchmark uses one TFDS dataset.

  Attributes:
    role: "id" (in-distribution) or "ood".
    eval_split: the split the benchmark evaluates on.
    fixed_size: True when every image has the same shape, so no resize is
      needed to stack them.
  """

  role: str
  eval_split: str
  fixed_size: bool


STOCK_DATASETS = {
    "cifar10": StockDataset("id", "test", True),
    "cifar100": StockDataset("id", "test", True),
    "imagenet2012": StockDataset("id", "validation", False),
    "fashion_mnist": StockDataset("id", "test", True),
    "fashion_mnist_local": StockDataset("id", "test", True),  # benchmarks.legacy_loaders
    "svhn_cropped": StockDataset("ood", "test", True),
    "dtd": StockDataset("ood", "test", False),
    "places365_small": StockDataset("ood", "validation", True),
}
