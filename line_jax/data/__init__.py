"""Datasets for line_jax: TFDS loaders, curated image folders, embedded OOD sets.

Importing this package registers the TFDS builder `fashion_mnist_local`.
"""

from line_jax.data._embedded_ood import OOD_SET_NAMES
from line_jax.data._embedded_ood import ood_set
from line_jax.data._embedded_ood import ood_sets
from line_jax.data._fashion_mnist_local import CLASS_NAMES as FASHION_MNIST_CLASSES
from line_jax.data._fashion_mnist_local import DEBIAN_FASHION_MNIST_DIR
from line_jax.data._fashion_mnist_local import FashionMnistLocal
from line_jax.data._fashion_mnist_local import read_fashion_mnist
from line_jax.data._idx import read_idx
from line_jax.data._idx import write_idx
from line_jax.data._image_folder import CURATED_OOD
from line_jax.data._image_folder import CuratedSet
from line_jax.data._image_folder import download_curated
from line_jax.data._image_folder import load_curated
from line_jax.data._image_folder import load_image_folder
from line_jax.data._npy import load_ood_npy
from line_jax.data._npy import parse_extra_ood
from line_jax.data._preprocess import MEAN_STD
from line_jax.data._preprocess import center_crop
from line_jax.data._preprocess import normalize
from line_jax.data._preprocess import resize_center_crop
from line_jax.data._preprocess import resize_center_crop_batch
from line_jax.data._preprocess import resize_shorter_side
from line_jax.data._tfds_loader import STOCK_DATASETS
from line_jax.data._tfds_loader import StockDataset
from line_jax.data._tfds_loader import load_split

__all__ = (
    "CURATED_OOD",
    "CuratedSet",
    "DEBIAN_FASHION_MNIST_DIR",
    "FASHION_MNIST_CLASSES",
    "FashionMnistLocal",
    "MEAN_STD",
    "OOD_SET_NAMES",
    "STOCK_DATASETS",
    "StockDataset",
    "center_crop",
    "download_curated",
    "load_curated",
    "load_image_folder",
    "load_ood_npy",
    "load_split",
    "normalize",
    "ood_set",
    "ood_sets",
    "parse_extra_ood",
    "read_fashion_mnist",
    "read_idx",
    "resize_center_crop",
    "resize_center_crop_batch",
    "resize_shorter_side",
    "write_idx",
)
