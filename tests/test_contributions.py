"""Class-mean Taylor contributions: closed form, streaming, generic head, official."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import torch_reference
from line_jax import line


def _numpy_contributions(features, labels, kernel):
  taylor = (features * kernel.T[labels]).astype(np.float64)  # float32 product, as autograd
  return np.stack([taylor[labels == c].sum(0) / np.sum(labels == c)
                   for c in range(kernel.shape[1])])


def test_closed_form_equals_numpy(problem):
  features, labels, kernel, _ = problem(7, 13, 100)
  got = line.contributions(features, labels, kernel)
  assert got.dtype == jnp.float64 and got.shape == (7, 13)
  np.testing.assert_allclose(np.asarray(got), _numpy_contributions(features, labels, kernel),
                             rtol=1e-13, atol=0)


def test_equals_official_batch_size_one_precompute(problem):
  features, labels, kernel, bias = problem(10, 342, 300)
  want = torch_reference.official_contributions(features, labels, kernel.T, bias)
  got = np.asarray(line.contributions(features, labels, kernel))
  np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)


def test_streaming_agrees_with_in_memory(problem):
  features, labels, kernel, _ = problem(5, 9, 103)
  batches = [(features[i:i + 16], labels[i:i + 16]) for i in range(0, 103, 16)]
  streamed = line.contributions_from_batches(iter(batches), kernel)
  np.testing.assert_allclose(np.asarray(streamed),
                             np.asarray(line.contributions(features, labels, kernel)),
                             rtol=1e-14)


def test_streaming_state_stays_class_by_feature_sized(problem):
  features, labels, kernel, _ = problem(4, 6, 40)
  acc = line.init_sums(4, 6)
  for i in range(0, 40, 8):
    acc = line.update_sums(acc, features[i:i + 8], labels[i:i + 8], kernel)
  assert acc.sums.shape == (4, 6) and acc.counts.shape == (4,)
  np.testing.assert_array_equal(np.asarray(acc.counts), np.bincount(labels, minlength=4))


def test_generic_head_agrees_with_closed_form_on_linear_head(problem):
  features, labels, kernel, bias = problem(6, 11, 60)
  generic = line.contributions_from_head(lambda h: h @ kernel + bias, features, labels, 6)
  np.testing.assert_allclose(np.asarray(generic),
                             np.asarray(line.contributions(features, labels, kernel)),
                             rtol=1e-6, atol=1e-7)


def test_generic_head_is_per_sample_gradient_for_nonlinear_head(problem):
  features, labels, kernel, bias = problem(3, 5, 30)

  def head(h):
    return jnp.tanh(h) @ kernel + bias

  got = np.asarray(line.contributions_from_head(head, features, labels, 3))
  per_sample = np.stack([
      np.asarray(features[i] * jax.grad(lambda h: head(h[None])[0, labels[i]])(features[i]))
      for i in range(30)
  ]).astype(np.float64)
  want = np.stack([per_sample[labels == c].mean(0) for c in range(3)])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_class_without_samples_is_named(problem):
  features, labels, kernel, _ = problem(4, 6, 40)
  labels = np.where(labels == 2, 1, labels)
  with pytest.raises(ValueError, match=r"class\(es\) have no training sample: 2"):
    line.contributions(features, labels, kernel)
