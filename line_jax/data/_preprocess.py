"""Image preprocessing as pure functions on NumPy / JAX arrays.

Images are channels-last, `[..., H, W, C]`. Resizing runs on the host with
Pillow on purpose: the reference PyTorch checkpoints were evaluated with
torchvision's `Resize` / `CenterCrop` on PIL images, and these functions
reproduce those pixels (same size rounding, same antialiased bilinear
filter, same crop offsets), which `jax.image.resize` does not.
"""

from __future__ import annotations

import numpy as np
import PIL.Image

# Per-channel (mean, std) of pixel values scaled to [0, 1].
MEAN_STD = {
    # torchvision's ImageNet statistics (every ImageNet checkpoint uses them).
    "imagenet2012": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    # Exact statistics of the CIFAR training sets.
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    # The rounded values of Hendrycks et al.'s outlier-exposure code, which
    # the Energy and DICE CIFAR scripts (and their checkpoints) reuse.
    "cifar_oe": (
        (125.3 / 255, 123.0 / 255, 113.9 / 255),
        (63.0 / 255, 62.1 / 255, 66.7 / 255),
    ),
    # The constants of the official LINe and DICE CIFAR code (`ood_eval.py`
    # and `precompute.py` of both repositories, `transforms.Normalize`), which
    # the DICE DenseNet-BC-100 checkpoints were evaluated with. The std is not
    # CIFAR's pixel std (0.247, ...): features move by 12-15 % and the
    # predicted class of 8-25 % of images flips with the other constants.
    "cifar_line": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    # Fashion-MNIST training set (computed from the 60,000 IDX images).
    "fashion_mnist": ((0.2860,), (0.3530,)),
}


def normalize(images, mean, std):
  """Scales uint8 pixels to [0, 1], then standardises each channel.

  Args:
    images: uint8 (or float in [0, 255]) `[..., H, W, C]`, NumPy or JAX.
    mean: `[C]` per-channel means in [0, 1] units, e.g. `MEAN_STD[name][0]`.
    std: `[C]` per-channel standard deviations in the same units.

  Returns:
    float32 `[..., H, W, C]`, of the same array kind as `images`.
  """
  mean = np.asarray(mean, np.float32)
  std = np.asarray(std, np.float32)
  if images.shape[-1] != mean.shape[-1]:
    raise ValueError(
        f"images have {images.shape[-1]} channels but mean/std have "
        f"{mean.shape[-1]}")
  return (images.astype(np.float32) / np.float32(255) - mean) / std


def center_crop(images, size: int):
  """Crops the central `size` x `size` window, as torchvision's CenterCrop.

  Args:
    images: `[..., H, W, C]` with `H, W >= size`, NumPy or JAX.
    size: side of the square crop.

  Returns:
    `[..., size, size, C]`, a slice of `images`.
  """
  h, w = images.shape[-3], images.shape[-2]
  if h < size or w < size:
    raise ValueError(f"cannot crop {size}x{size} from a {h}x{w} image")
  # torchvision rounds the offset (round half to even, as Python's round).
  top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
  return images[..., top:top + size, left:left + size, :]


def resize_shorter_side(image: np.ndarray, size: int) -> np.ndarray:
  """Resizes one image so its shorter side is `size`, keeping the aspect.

  Matches torchvision's `Resize(size)` on a PIL image: the longer side is
  `int(size * long / short)` and Pillow's bilinear filter antialiases when
  shrinking.

  Args:
    image: uint8 `[H, W, C]` with C = 1 or 3.
    size: target length of the shorter side.

  Returns:
    uint8 `[H', W', C]` with `min(H', W') == size`.
  """
  image = np.asarray(image)
  if image.ndim != 3 or image.dtype != np.uint8:
    raise ValueError(
        f"expected one uint8 [H, W, C] image, got {image.dtype} {image.shape}")
  h, w, c = image.shape
  if min(h, w) == size:
    return image
  if h <= w:
    new_h, new_w = size, int(size * w / h)
  else:
    new_h, new_w = int(size * h / w), size
  pil = PIL.Image.fromarray(image[:, :, 0] if c == 1 else image)
  out = np.asarray(pil.resize((new_w, new_h), PIL.Image.BILINEAR))
  return out.reshape(new_h, new_w, c)


def resize_center_crop(
    image: np.ndarray, resize_size: int = 256, crop_size: int = 224
) -> np.ndarray:
  """Resize(resize_size) then CenterCrop(crop_size): ImageNet evaluation.

  Args:
    image: uint8 `[H, W, C]`.
    resize_size: shorter side after resizing (256 for ImageNet).
    crop_size: side of the central crop (224 for ImageNet).

  Returns:
    uint8 `[crop_size, crop_size, C]`.
  """
  return center_crop(resize_shorter_side(image, resize_size), crop_size)


def resize_center_crop_batch(
    images: np.ndarray, resize_size: int = 256, crop_size: int = 224
) -> np.ndarray:
  """`resize_center_crop` applied to each image of `[N, H, W, C]`."""
  images = np.asarray(images)
  if images.ndim != 4:
    raise ValueError(f"expected [N, H, W, C], got shape {images.shape}")
  out = [resize_center_crop(im, resize_size, crop_size) for im in images]
  if not out:
    return np.zeros((0, crop_size, crop_size, images.shape[-1]), np.uint8)
  return np.stack(out)
