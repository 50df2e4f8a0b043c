"""The three LINe head shapes of the paper and a random fitted problem for each."""

from __future__ import annotations

import numpy as np

# (classes, features, p_w, p_a, clip): the official demo scripts' settings for
# the CIFAR-10 and CIFAR-100 DenseNet heads and the ImageNet ResNet-50 head.
HEADS = (
    (10, 342, 90, 90, 1.0),
    (100, 342, 90, 10, 1.0),
    (1000, 2048, 10, 10, 0.8),
)


def problem(num_classes, num_features, p_w, p_a, clip, seed=0):
  """A random head, contributions and the fitted `LineState`.

  Returns:
    `(kernel [features, classes], bias [classes], contrib [classes, features], state)`.
  """
  from line_jax import line
  rng = np.random.default_rng(seed)
  kernel = (rng.normal(size=(num_features, num_classes)) / np.sqrt(num_features)).astype(np.float32)
  bias = (0.1 * rng.normal(size=num_classes)).astype(np.float32)
  contrib = np.abs(rng.normal(size=(num_classes, num_features))) * rng.normal(size=(num_classes, num_features))
  state = line.fit_from_contributions(contrib, kernel, bias, p_w=p_w, p_a=p_a, clip=clip)
  return kernel, bias, contrib, state
