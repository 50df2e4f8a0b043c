"""LINe stays O(classes x features): no [B, C, m] or [C, C, m] array anywhere."""

import re

import jax
import numpy as np
import pytest

from line_jax import line

MIB = 2**20
C, M, BATCH = 1000, 2048, 256


@pytest.fixture(scope="module")
def imagenet_state():
  rng = np.random.default_rng(0)
  kernel = (rng.normal(size=(M, C)) / np.sqrt(M)).astype(np.float32)
  contrib = rng.normal(size=(C, M)) * 1e-3
  return line.fit_from_contributions(contrib, kernel, np.zeros(C, np.float32),
                                     p_w=10, p_a=10, clip=0.8)


def test_fitted_state_is_small(imagenet_state):
  nbytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(imagenet_state))
  official = C * C * M * 4  # the official code's masked weights: 7.6 GiB
  assert nbytes < 64 * MIB
  assert official / nbytes > 400


def _largest_array_elements(hlo_text: str) -> int:
  sizes = [int(np.prod([int(d) for d in dims.split(",") if d]))
           for dims in re.findall(r"(?:f32|f64|pred|s32|s64|bf16)\[([\d,]*)\]", hlo_text)]
  return max(sizes)


def test_compiled_scorer_temporary_memory_is_small(imagenet_state):
  features = jax.ShapeDtypeStruct((BATCH, M), np.float32)
  compiled = line.score.lower(imagenet_state, features).compile()
  assert compiled.memory_analysis().temp_size_in_bytes < 64 * MIB
  # No buffer anywhere near [batch, classes, features] or [classes, classes, features].
  assert _largest_array_elements(compiled.as_text()) < BATCH * C * M // 64


def test_scorer_is_one_computation_without_host_round_trip(imagenet_state):
  features = jax.ShapeDtypeStruct((BATCH, M), np.float32)
  hlo = line.score.lower(imagenet_state, features).compile().as_text()
  for host_op in ("callback", "outfeed", "infeed", "send(", "recv("):
    assert host_op not in hlo.lower()
