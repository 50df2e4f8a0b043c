"""The NumPy-exact percentile machinery behind LINe's masks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from line_jax.line import _percentile


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 342, 1000, 3420, 2048 * 1000])
@pytest.mark.parametrize("p", [0, 0.5, 10, 33.3, 50, 65, 90, 99.99, 100])
def test_position_and_lerp_reproduce_numpy_bit_for_bit(n, p):
  rng = np.random.default_rng(n)
  values = rng.normal(size=min(n, 5000))
  if values.size < n:  # For huge n only the position is checked against NumPy's.
    virtual = (n - 1) * np.true_divide(p, 100)
    previous, following, gamma = _percentile.numpy_position(n, p)
    assert previous == min(int(np.floor(virtual)), n - 1)
    assert following == min(previous + 1, n - 1)
    return
  previous, following, gamma = _percentile.numpy_position(n, p)
  ordered = np.sort(values)
  got = _percentile.numpy_lerp(ordered[previous], ordered[following], gamma)
  assert got == np.percentile(values, p)  # exact, not approximate


def test_lerp_matches_numpy_for_adjacent_floats_near_gamma_one():
  # The case where NumPy's interpolation lands on the upper value.
  a = np.float64(1.0)
  b = np.nextafter(a, 2.0)
  values = np.array([a] * 3 + [b] * 3)
  for p in np.linspace(0, 100, 201):
    previous, following, gamma = _percentile.numpy_position(values.size, p)
    got = _percentile.numpy_lerp(values[previous], values[following], gamma)
    assert got == np.percentile(values, p)


@pytest.mark.parametrize("rows,cols", [(3, 4), (10, 342), (100, 37)])
def test_order_statistics_equal_full_sort(rows, cols):
  rng = np.random.default_rng(rows)
  weights = rng.normal(size=(rows, cols)).astype(np.float32)
  weights[0, 0] = weights[1, 0]  # ties inside a column
  scale = np.abs(rng.normal(size=cols))
  scale[1] = 0.0  # a column whose products are all zero
  with jax.enable_x64(True):
    sorted_cols = jnp.sort(jnp.asarray(weights), axis=0)
    products = np.sort((scale[None, :] * weights.astype(np.float64)).ravel())
    for rank in [0, 1, rows * cols // 2, rows * cols - 2, rows * cols - 1]:
      low, high = _percentile.order_statistics(jnp.asarray(scale), sorted_cols, rank)
      assert float(low) == products[rank]
      assert float(high) == products[min(rank + 1, products.size - 1)]


def test_count_at_most_counts_products_per_column():
  rng = np.random.default_rng(1)
  weights = np.sort(rng.normal(size=(50, 20)).astype(np.float32), axis=0)
  scale = np.abs(rng.normal(size=20))
  with jax.enable_x64(True):
    for v in [-1.0, 0.0, 0.3, 5.0]:
      got = _percentile.count_at_most(jnp.asarray(scale), jnp.asarray(weights), jnp.float64(v))
      want = np.sum(scale[None] * weights.astype(np.float64) <= v, axis=0)
      np.testing.assert_array_equal(np.asarray(got), want)
