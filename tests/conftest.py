"""Shared fixtures: random LINe problems shaped like real heads."""

import numpy as np
import pytest


def random_problem(num_classes, num_features, num_train, seed=0):
  """Non-negative (post-ReLU) features, a small random head, labels covering all classes."""
  rng = np.random.default_rng(seed)
  features = np.abs(rng.normal(size=(num_train, num_features))).astype(np.float32)
  kernel = (rng.normal(size=(num_features, num_classes)) / np.sqrt(num_features)).astype(np.float32)
  bias = (0.1 * rng.normal(size=num_classes)).astype(np.float32)
  labels = (np.arange(num_train) % num_classes).astype(np.int32)
  rng.shuffle(labels)
  return features, labels, kernel, bias


@pytest.fixture
def problem():
  return random_problem
