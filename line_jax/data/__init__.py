"""Datasets for line_jax: sources, the grain input pipeline, OOD sets.

Streaming (any size): a random-access source (`ImageFolderSource`,
`TfdsSource`, `npy_source`, `fashion_mnist_source`, `ArraySource`) and
`image_batches(source, Preprocess(...), batch_size=...)`, the grain pipeline
(`skip_bad_images=True` drops undecodable files). `check_class_names`
compares a folder's classes with a model's.
In memory (small sets): `ood_set`, `validation_ood`. `open_source(spec,
split)` is the one naming every CLI takes ('fashion_mnist', 'tfds:NAME', a
folder).

The pipeline names import grain on first use.
"""

from line_jax.data._embedded_ood import OOD_SET_NAMES
from line_jax.data._embedded_ood import ood_set
from line_jax.data._embedded_ood import ood_sets
from line_jax.data._embedded_ood import validation_ood
from line_jax.data._fashion_mnist import CLASS_NAMES as FASHION_MNIST_CLASSES
from line_jax.data._fashion_mnist import DEBIAN_FASHION_MNIST_DIR
from line_jax.data._fashion_mnist import read_fashion_mnist
from line_jax.data._idx import read_idx
from line_jax.data._idx import write_idx
from line_jax.data._image_folder import CURATED_OOD
from line_jax.data._image_folder import CuratedSet
from line_jax.data._image_folder import download_curated
from line_jax.data._imglist import ImageListSource
from line_jax.data._imglist import read_image_list
from line_jax.data._npy import load_ood_npy
from line_jax.data._named import open_source
from line_jax.data._npy import parse_extra_ood
from line_jax.data._preprocess import MEAN_STD
from line_jax.data._preprocess import center_crop
from line_jax.data._preprocess import normalize
from line_jax.data._preprocess import resize_center_crop
from line_jax.data._preprocess import resize_center_crop_batch
from line_jax.data._preprocess import resize_shorter_side
from line_jax.data._sources import IMG_EXTENSIONS
from line_jax.data._sources import NO_LABEL
from line_jax.data._sources import ArraySource
from line_jax.data._sources import ImageFolderSource
from line_jax.data._sources import Subset
from line_jax.data._sources import TfdsSource
from line_jax.data._sources import check_class_names
from line_jax.data._sources import fashion_mnist_source
from line_jax.data._sources import npy_source
from line_jax.data._subsets import hold_out
from line_jax.data._subsets import known_labels
from line_jax.data._subsets import subset_indices
from line_jax.data._subsets import subset_of
from line_jax.data._stock_datasets import STOCK_DATASETS
from line_jax.data._stock_datasets import StockDataset

__all__ = (
    "ArraySource",
    "BadImageError",
    "CURATED_OOD",
    "CuratedSet",
    "DEBIAN_FASHION_MNIST_DIR",
    "FASHION_MNIST_CLASSES",
    "IMG_EXTENSIONS",
    "ImageBatches",
    "ImageFolderSource",
    "ImageListSource",
    "MEAN_STD",
    "NO_LABEL",
    "OOD_SET_NAMES",
    "Preprocess",
    "SKIP_HINT",
    "STOCK_DATASETS",
    "SkippedImage",
    "StockDataset",
    "Subset",
    "TfdsSource",
    "center_crop",
    "check_class_names",
    "download_curated",
    "fashion_mnist_source",
    "hold_out",
    "image_batches",
    "known_labels",
    "load_ood_npy",
    "normalize",
    "open_source",
    "npy_source",
    "ood_set",
    "ood_sets",
    "parse_extra_ood",
    "prefetch_to_device",
    "read_fashion_mnist",
    "read_idx",
    "read_image_list",
    "resize_center_crop",
    "resize_center_crop_batch",
    "resize_shorter_side",
    "subset_indices",
    "subset_of",
    "validation_ood",
    "write_idx",
)

# Names that need tensorflow-datasets load it on first use, so that the rest of
# line_jax.data (IDX files, OOD sets, preprocessing) works where TFDS is absent,
# e.g. on an accelerator VM with only JAX installed.
_LAZY = {
    # grain is imported only by those who stream.
    "BadImageError": ("line_jax.data._pipeline", "BadImageError"),
    "SKIP_HINT": ("line_jax.data._pipeline", "SKIP_HINT"),
    "ImageBatches": ("line_jax.data._pipeline", "ImageBatches"),
    "Preprocess": ("line_jax.data._pipeline", "Preprocess"),
    "image_batches": ("line_jax.data._pipeline", "image_batches"),
    "SkippedImage": ("line_jax.data._pipeline", "SkippedImage"),
    "prefetch_to_device": ("line_jax.data._pipeline", "prefetch_to_device"),
}


def __getattr__(name):
  if name in _LAZY:
    import importlib
    module, attr = _LAZY[name]
    return getattr(importlib.import_module(module), attr)
  raise AttributeError(f"module 'line_jax.data' has no attribute {name!r}")
