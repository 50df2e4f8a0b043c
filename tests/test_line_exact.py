"""LINe scores equal the official algorithm: by hand, and against a PyTorch reference."""

import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import torch_reference
from line_jax import line

# Hand-computed example: 3 classes, 4 features. PyTorch-layout weight W [C, m].
W = np.array([[1.0, -1.0, 2.0, 0.5],
              [0.5, 1.0, -1.0, 1.0],
              [-1.0, 2.0, 1.0, -0.5]], np.float32)
B = np.array([0.5, 0.0, 0.25], np.float32)
# One training sample per class, so contrib[c] = h_c * W[c]:
#   contrib0 = [1, -2, 2, 0.25], contrib1 = [0.25, 1, -2, 3], contrib2 = [-1, 1, 3, -0.5].
TRAIN = np.array([[1.0, 2.0, 1.0, 0.5],
                  [0.5, 1.0, 2.0, 3.0],
                  [1.0, 0.5, 3.0, 1.0]], np.float32)
# p_a = 50 over 4 values: midpoint of the 2nd and 3rd smallest contribution
# (0.625, 0.625, 0.25), kept where strictly above.
NEURON_MASK = np.array([[1, 0, 1, 0],
                        [0, 1, 0, 1],
                        [0, 1, 1, 0]], bool)
# p_w = 50 over the 12 values |contrib[c, j]| * W[k, j]: midpoint of the 6th and
# 7th smallest (0.375, 0.625 and 0.5 for classes 0, 1, 2; class 2 has two
# entries equal to its threshold 0.5 and drops both: the comparison is strict).
WEIGHT_MASK = np.array([
    [[1, 0, 1, 0], [1, 1, 0, 0], [0, 1, 1, 0]],
    [[0, 0, 1, 1], [0, 1, 0, 1], [0, 1, 1, 0]],
    [[1, 0, 1, 0], [0, 1, 0, 0], [0, 1, 1, 0]],
], bool)
# Test samples, clip 2.5. Sample 0: clipped [2, 1, 0.5, 2.5], logits
# [3.75, 4.0, -0.5] -> class 1; kept features [0, 1, 0, 2.5]; masked logits
# [1.25 + 0.5, 1 + 2.5, 2 + 0.25]. Sample 1: clipped [0, 0, 2.5, 0] -> logits
# [5.5, -2.5, 2.75] -> class 0; masked logits [5 + 0.5, 0, 2.5 + 0.25].
# Sample 2: [0, 1, 0, 0] -> logits [-0.5, 1, 2.25] -> class 2; masked logits
# [0 + 0.5, 1, 2 + 0.25].
TEST = np.array([[2.0, 1.0, 0.5, 3.0], [0.0, 0.0, 3.0, 0.0], [0.0, 1.0, 0.0, 0.0]], np.float32)
EXPECTED = np.log(np.exp([[1.75, 3.5, 2.25], [5.5, 0.0, 2.75], [0.5, 1.0, 2.25]]).sum(1))


def _weight_masks(state, classes=None):
  """`[classes, C, m]` bool: the weight mask that `state` encodes per predicted class."""
  floor = np.asarray(state.weight_floor)  # [C, m]
  if classes is not None:
    floor = floor[classes]
  kernel_t = np.asarray(state.kernel).T  # [C, m]
  return kernel_t[None, :, :] > floor[:, None, :]  # [class, row k, feature j]


def test_hand_computed_example():
  state = line.fit(TRAIN, np.arange(3), W.T, B, p_w=50, p_a=50, clip=2.5)
  np.testing.assert_array_equal(np.asarray(state.neuron_mask), NEURON_MASK)
  np.testing.assert_array_equal(_weight_masks(state), WEIGHT_MASK)
  for strategy in ("grouped", "dense"):
    got = line.score(state, TEST, strategy=strategy)
    np.testing.assert_allclose(np.asarray(got), EXPECTED, rtol=1e-6)


def test_hand_example_matches_the_reference_too():
  contrib = torch_reference.official_contributions(TRAIN, np.arange(3), W, B)
  ref = torch_reference.OfficialLine(W, B, contrib, p_w=50, p_a=50, clip=2.5)
  np.testing.assert_allclose(ref(TEST).numpy(), EXPECTED, rtol=1e-6)


def _assert_matches_official(problem, num_classes, num_features, grid):
  features, labels, kernel, bias = problem(num_classes, num_features, 2 * num_classes, seed=num_classes)
  test = np.abs(np.random.default_rng(1).normal(size=(48, num_features))).astype(np.float32)
  contrib = line.contributions(features, labels, kernel)
  official_contrib = torch_reference.official_contributions(features, labels, kernel.T, bias)
  for p_w, p_a in grid:
    state = line.fit_from_contributions(contrib, kernel, bias, p_w=p_w, p_a=p_a, clip=1.0)
    ref = torch_reference.OfficialLine(kernel.T, bias, official_contrib, p_w=p_w, p_a=p_a,
                                       clip=1.0, lazy=True)
    want = ref(test).numpy()
    for c, mask in ref.masked_w.items():  # every mask the reference built, bit for bit
      np.testing.assert_array_equal(_weight_masks(state, [c])[0], mask.numpy() != 0)
      np.testing.assert_array_equal(np.asarray(state.neuron_mask[c]), ref.mask_f[c].numpy() == 1)
    for strategy in ("grouped", "dense"):
      got = np.asarray(line.score(state, test, strategy=strategy))
      rel = np.max(np.abs(got - want) / np.abs(want))
      assert rel <= 1e-5, (p_w, p_a, strategy, rel)


FULL_GRID = [(p_w, p_a) for p_w in (10, 50, 90) for p_a in (10, 50, 90)]


@pytest.mark.parametrize("num_classes,num_features", [(10, 342), (100, 342)])
def test_matches_official_reference(problem, num_classes, num_features):
  _assert_matches_official(problem, num_classes, num_features, FULL_GRID)


@pytest.mark.slow  # Full scale.
def test_matches_official_reference_imagenet_head(problem):
  # Each p_w and each p_a value once: a full grid at this size costs minutes.
  _assert_matches_official(problem, 1000, 2048, [(10, 90), (50, 10), (90, 50)])


def test_fit_equals_fit_from_contributions(problem):
  features, labels, kernel, bias = problem(10, 30, 50)
  a = line.fit(features, labels, kernel, bias, p_w=90, p_a=90, clip=1.0)
  b = line.fit_from_contributions(line.contributions(features, labels, kernel), kernel, bias,
                                  p_w=90, p_a=90, clip=1.0)
  np.testing.assert_array_equal(np.asarray(a.weight_floor), np.asarray(b.weight_floor))
  np.testing.assert_array_equal(np.asarray(a.neuron_mask), np.asarray(b.neuron_mask))


def test_everything_switched_off_is_energy(problem):
  features, labels, kernel, bias = problem(10, 30, 50)
  state = line.fit(features, labels, kernel, bias, p_w=None, p_a=None, clip=None)
  test = np.abs(np.random.default_rng(2).normal(size=(20, 30))).astype(np.float32) * 3
  energy = np.log(np.exp((test @ kernel + bias).astype(np.float64)).sum(1))
  for strategy in ("grouped", "dense"):
    np.testing.assert_allclose(np.asarray(line.score(state, test, strategy=strategy)), energy,
                               rtol=1e-5)


def test_percentile_zero_keeps_all_but_the_minimum(problem):
  features, labels, kernel, bias = problem(4, 8, 12)
  state = line.fit(features, labels, kernel, bias, p_w=0, p_a=0, clip=1.0)
  assert np.all(np.asarray(state.neuron_mask).sum(1) == 7)
  assert np.all(_weight_masks(state).reshape(4, -1).sum(1) == 4 * 8 - 1)


def test_percentile_hundred_drops_everything(problem):
  features, labels, kernel, bias = problem(4, 8, 12)
  with pytest.warns(UserWarning) as caught:
    state = line.fit(features, labels, kernel, bias, p_w=100, p_a=100, clip=1.0)
  messages = [str(w.message) for w in caught]
  assert any("p_w=100 prunes every weight" in m for m in messages), messages
  assert any("p_a=100 prunes every neuron" in m for m in messages), messages
  assert not np.asarray(state.neuron_mask).any() and not _weight_masks(state).any()
  got = np.asarray(line.score(state, features))
  np.testing.assert_allclose(got, np.log(np.exp(bias.astype(np.float64)).sum()), rtol=1e-6)


@pytest.mark.parametrize("batch", [1, 7, 64, 300])
def test_grouped_and_dense_agree_at_any_batch(problem, batch):
  features, labels, kernel, bias = problem(20, 40, 60)
  state = line.fit(features, labels, kernel, bias, p_w=50, p_a=50, clip=1.0)
  test = np.abs(np.random.default_rng(batch).normal(size=(batch, 40))).astype(np.float32)
  a = np.asarray(line.score(state, test, strategy="grouped"))
  b = np.asarray(line.score(state, test, strategy="dense"))
  np.testing.assert_allclose(a, b, rtol=1e-6)


def test_all_samples_in_one_class_and_scores_follow_sample_order(problem):
  features, labels, kernel, bias = problem(5, 16, 25)
  state = line.fit(features, labels, kernel, bias, p_w=50, p_a=50, clip=1.0)
  test = np.tile(features[:1], (37, 1)) * np.linspace(0.5, 1.5, 37, dtype=np.float32)[:, None]
  got = np.asarray(line.score(state, test, strategy="grouped"))
  one_by_one = np.array([float(line.score(state, test[i:i + 1], strategy="grouped")[0])
                         for i in range(37)])
  np.testing.assert_allclose(got, one_by_one, rtol=1e-6)
  assert got.dtype == jnp.float32
