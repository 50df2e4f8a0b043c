"""The committed Fashion-MNIST checkpoint loads and keeps its accuracy."""

import pathlib

import numpy as np
import pytest

from line_jax import models
from line_jax.runs import train
from line_jax.data import read_fashion_mnist

# End to end, in subprocesses or at full scale: `-m 'not slow'` skips them.
pytestmark = pytest.mark.slow

CHECKPOINT = pathlib.Path(__file__).resolve().parents[1] / "line_jax" / "checkpoints" / "fashion_mnist_resnet_small"


def test_committed_checkpoint_reaches_92_percent_on_the_real_test_set():
  model, variables, config = models.load_checkpoint(CHECKPOINT)
  assert config["model"] == "resnet_small" and config["num_classes"] == 10
  images, labels = read_fashion_mnist("test")  # Debian's dataset-fashion-mnist
  assert images.shape == (10000, 28, 28)
  accuracy = train.accuracy(model, variables, images[..., None], labels.astype(np.int32),
                            config["mean"], config["std"])
  assert accuracy >= 0.92
  assert abs(accuracy - config["test_accuracy"]) < 0.005  # as recorded when it was trained
