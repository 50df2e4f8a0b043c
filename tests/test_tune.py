"""line_jax.tune: the vmapped grid equals a Python loop of the registry scorers."""

import numpy as np
import pytest

from line_jax import tune

from conftest import random_problem

GRIDS = {
    "line": {"p_w": (10.0, 90.0), "p_a": (50.0, 90.0), "clip": (90.0, None)},
    "react": {"percentile": (80.0, 95.0)},
    "dice": {"p": (30.0, 90.0)},
    "ash_p": {"percentile": (50.0, 90.0)},
    "ash_b": {"percentile": (50.0, 90.0)},
    "ash_s": {"percentile": (50.0, 90.0)},
    "scale": {"percentile": (50.0, 90.0)},
    "knn": {"k": (1, 5, 20)},
}


@pytest.fixture(scope="module")
def data():
  train, labels, kernel, bias = random_problem(10, 32, 400, seed=1)
  rng = np.random.default_rng(2)
  # Rounded: many tied activations, which the traced top-k of ASH / SCALE
  # must break as the registry's does.
  val_id = np.round(np.abs(rng.normal(size=(90, 32))), 1).astype(np.float32)
  val_ood = (1.5 * np.abs(rng.normal(size=(60, 32)))).astype(np.float32)
  return train, labels, kernel, bias, val_id, val_ood


@pytest.mark.parametrize("method", list(GRIDS))
def test_vmapped_grid_equals_loop(method, data):
  # tune_method asserts the two agree (rtol 1e-4) before it returns.
  result = tune.tune_method(method, *data, grid=GRIDS[method], check=True)
  points = tune.grid_points(GRIDS[method])
  assert result["grid_size"] == len(points)
  assert result["best"] in points
  assert result["vmapped_s"] is not None and result["loop_s"] is not None
  best = max(r[1]["auroc"] for r in result["grid"])
  assert result["metrics"]["auroc"] == best


def test_grid_points_and_validation_set():
  assert tune.grid_points({"a": (1, 2), "b": (3,)}) == [{"a": 1, "b": 3}, {"a": 2, "b": 3}]
  images = tune.validation_ood(size=12, seed=0)
  assert images.shape == (12, 28, 28, 1) and images.dtype == np.uint8
  np.testing.assert_array_equal(images, tune.validation_ood(size=12, seed=0))
  assert not set(tune.VALIDATION_SOURCES) & {"brick", "grass", "gravel", "camera", "astronaut",
                                             "coffee", "chelsea", "rocket", "coins"}
