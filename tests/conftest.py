"""Shared fixtures: random LINe problems shaped like real heads."""

import atexit
import gc
import os
import shutil
import sys
import tempfile

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


@pytest.fixture
def narrow(monkeypatch):
  """`python -m line_jax.train`'s config narrowed to 4 filters (the flags do
  not set the width); the narrowed `TrainConfig` class."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  from line_jax.runs import train  # pylint: disable=g-import-not-at-top

  @dataclasses.dataclass(frozen=True)
  class Narrow(train.TrainConfig):
    model_kwargs: dict = dataclasses.field(default_factory=lambda: {"num_filters": 4})

  monkeypatch.setattr(train, "TrainConfig", Narrow)
  return Narrow


# Set at import, before any test module copies os.environ for its subprocesses:
# no test reads or writes the user's feature cache under ~ (`_own_feature_cache`
# then gives each test a folder of its own).
os.environ["LINE_JAX_CACHE"] = tempfile.mkdtemp(prefix="line_jax_test_feature_cache_")
atexit.register(shutil.rmtree, os.environ["LINE_JAX_CACHE"], ignore_errors=True)


@pytest.fixture(autouse=True)
def _own_feature_cache(tmp_path_factory, monkeypatch):
  """Each test's CLIs (and their subprocesses) get a feature cache of their own.

  The default, `~/.cache/line_jax/features`, is shared across runs: a test
  must neither read another test's features nor leave any behind.
  """
  monkeypatch.setenv("LINE_JAX_CACHE", str(tmp_path_factory.mktemp("feature_cache")))


def pytest_collection_modifyitems(items):
  """The slow end-to-end tests first: with one worker per core (`make test`),
  the longest files start early instead of ending the run on one worker."""
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """Drops every compiled program when a test file ends.

  A worker runs hundreds of files; without this it holds all their XLA
  executables (6-7 GB per worker by the end of `make test`).
  """
  yield
  jax = sys.modules.get("jax")
  if jax is not None:
    jax.clear_caches()
  gc.collect()
