"""The CPU's and an accelerator's layouts of every computation agree.

`line_jax.layout` is the one switch: class-major logits for CPU batches up
to `Layout.CLASS_MAJOR_MAX_BATCH` rows (ReAct clipping 64-row chunks), radix
selection rolled on the CPU and unrolled elsewhere, LINe's grouped walk against its dense reduction,
Mahalanobis' and ViM's row chunks against one product. Tests pick a layout
by argument; both must give the same scores, chunk boundaries included.
"""

import warnings

from conftest import random_problem
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from line_jax import layout
from line_jax import line
from line_jax import scorers
from line_jax.scorers import _common
from line_jax.scorers import _mahalanobis

pytestmark = pytest.mark.filterwarnings("error")

HEAD_SCORERS = ("msp", "maxlogit", "energy", "gradnorm", "dice", "react", "ash_p",
                "ash_b", "ash_s", "scale")
SMALL = {"knn": {"k": 3}, "nnguide": {"k": 5}, "vim": {"dim": 8}}
# 150 rows: two full 64-row ReAct chunks and a partial one.
N, M, C, B = 200, 24, 7, 150


def _problem():
  train, labels, kernel, bias = random_problem(C, M, N, seed=3)
  test = np.abs(np.random.default_rng(4).normal(size=(B, M))).astype(np.float32) * 1.5
  return train, labels, kernel, bias, test


def _scores(name, where):
  train, labels, kernel, bias, test = _problem()
  scorer = scorers.get(name)
  with warnings.catch_warnings():
    # Random labels: temperature scaling warns that the head is no better than
    # chance and fits T at the grid's end, which both layouts score alike.
    warnings.filterwarnings("ignore", "temperature scaling")
    state = scorer.fit(train, labels, kernel, bias, **SMALL.get(name, {}))
  return np.asarray(scorer.score(state, test, layout=where))


def test_cpu_small_batches_are_class_major():
  assert layout.CPU.class_major(256)
  assert layout.CPU.class_major(layout.Layout.CLASS_MAJOR_MAX_BATCH)
  assert not layout.CPU.class_major(layout.Layout.CLASS_MAJOR_MAX_BATCH + 1)
  assert not layout.ACCELERATOR.class_major(256)
  _, _, kernel, bias, test = _problem()
  state = _common.head_state(kernel, bias)
  z, axis = _common.logits(state, test, layout.CPU)
  assert (z.shape, axis) == ((C, B), 0)
  np.testing.assert_allclose(np.asarray(z).T, test @ kernel + bias, rtol=1e-5, atol=1e-5)
  z, axis = _common.logits(state, test, layout.ACCELERATOR)
  assert (z.shape, axis) == ((B, C), 1)


def test_head_state_keeps_the_flax_kernel_view():
  _, _, kernel, bias, _ = _problem()
  state = _common.head_state(kernel, bias)
  assert state.weight.shape == (C, M)
  np.testing.assert_array_equal(np.asarray(state.kernel), kernel)


@pytest.mark.parametrize("name", scorers.names())
def test_accelerator_layout_scores_equal_cpu_layout_scores(name):
  rtol, atol = (1e-5, 1e-6) if name in HEAD_SCORERS else (2e-5, 2e-5)
  np.testing.assert_allclose(_scores(name, layout.ACCELERATOR), _scores(name, layout.CPU),
                             rtol=rtol, atol=atol)


def test_react_in_chunks_matches_numpy():
  train, labels, kernel, bias, test = _problem()
  state = scorers.get("react").fit(train, labels, kernel, bias)
  z = np.minimum(test, float(state.threshold)).astype(np.float64) @ kernel + bias
  top = z.max(axis=1)
  want = top + np.log(np.exp(z - top[:, None]).sum(axis=1))
  np.testing.assert_allclose(_scores("react", layout.CPU), want, rtol=1e-5)
  assert np.any(test > float(state.threshold))  # the clip did something


def test_line_auto_strategy_follows_the_layout():
  train, labels, kernel, bias, test = _problem()
  state = line.fit(train, labels, kernel, bias, p_w=50, p_a=50, clip=1.0)
  raw = line.score.__wrapped__

  def loops(where):
    return "while" in str(jax.make_jaxpr(lambda s, x: raw(s, x, layout=where))(state, test))

  assert loops(layout.CPU) and not loops(layout.ACCELERATOR)
  np.testing.assert_array_equal(np.asarray(line.score(state, test, layout=layout.CPU)),
                                np.asarray(line.score(state, test, strategy="grouped")))
  np.testing.assert_array_equal(
      np.asarray(line.score(state, test, layout=layout.ACCELERATOR)),
      np.asarray(line.score(state, test, strategy="dense")))


def test_float64_row_chunks_equal_one_product():
  # 5,000 rows: two full 2,048-row CPU chunks and a partial one.
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(5000, 9)).astype(np.float32))
  labels = jnp.asarray(rng.integers(0, 4, 5000))
  with jax.enable_x64(True):
    want = np.asarray(x, np.float64).T @ np.asarray(x, np.float64)
    for where in (layout.CPU, layout.ACCELERATOR):
      np.testing.assert_allclose(np.asarray(_mahalanobis.scatter(x, layout=where)), want,
                                 rtol=1e-12)
      sums = np.asarray(_mahalanobis.class_sums(x, labels, 4, layout=where))
      np.testing.assert_allclose(
          sums, [np.asarray(x, np.float64)[np.asarray(labels) == c].sum(0) for c in range(4)],
          rtol=1e-12, atol=1e-12)


def test_the_layout_of_an_array_is_its_device():
  assert layout.for_arrays(np.zeros(3)) == layout.default()
  on_cpu = jax.device_put(jnp.zeros(3), jax.devices("cpu")[0])
  assert layout.for_arrays(on_cpu) == layout.CPU
  assert layout.for_arrays(None, [1.0], on_cpu) == layout.CPU
  traced = []
  jax.jit(lambda x: traced.append(layout.for_arrays(x)) or x)(jnp.zeros(3))
  assert traced == [layout.default()]
  assert layout.resolve(None) == layout.default()
  assert layout.resolve(layout.ACCELERATOR) is layout.ACCELERATOR


def test_a_network_runs_in_cache_sized_passes_on_the_cpu_only():
  from line_jax import layout as layout_lib

  assert layout_lib.CPU.images_per_pass(256, 32, 32) == 8
  assert layout_lib.CPU.images_per_pass(30, 32, 32) == 6  # The largest divisor under 8.
  assert layout_lib.CPU.images_per_pass(32, 224, 224) == 2  # At least 2 images.
  assert layout_lib.CPU.images_per_pass(7, 224, 224) == 1  # 7 is prime.
  assert layout_lib.CPU.images_per_pass(1, 32, 32) == 1
  assert layout_lib.ACCELERATOR.images_per_pass(256, 32, 32) == 256


def _small_network_inputs(count):
  """`(forward, variables, images, mean, std)`: a small ResNet and `count`
  uint8 28 x 28 images, the arguments of `_extract.network_outputs`."""
  from line_jax import models

  model = models.get_model("resnet_small", 10)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))
  forward, variables = models.feature_apply(model, variables)
  images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (count, 28, 28, 1), np.uint8))
  return forward, variables, images, jnp.asarray([0.3]), jnp.asarray([0.4])


def test_features_in_passes_equal_features_in_one_pass():
  from line_jax.features import _extract

  forward, variables, images, mean, std = _small_network_inputs(12)
  whole = _extract._apply(forward, variables, images, mean, std, None)
  for per_pass in (1, 4, 6):
    parts = _extract._apply(forward, variables, images, mean, std, per_pass)
    for a, b in zip(whole, parts):
      assert a.shape == b.shape
      np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5)


def test_network_compiler_options_on_the_cpu_only_and_the_users_flags_win(monkeypatch):
  cpu_options = dict(layout.Layout.CPU_NETWORK_OPTIONS)
  assert layout.ACCELERATOR.network_compiler_options() == {}
  monkeypatch.delenv("XLA_FLAGS", raising=False)  # An environment flag would drop them.
  layout._known_options.cache_clear()  # pylint: disable=protected-access
  try:  # Whether this XLA knows them (an option of one release may be gone from the next).
    jax.jit(lambda x: x * 2, compiler_options=cpu_options).lower(jnp.float32(1)).compile()
    known = cpu_options
  except jax.errors.JaxRuntimeError:
    known = {}
  assert layout.CPU.network_compiler_options() == known
  layout._known_options.cache_clear()  # pylint: disable=protected-access
  try:
    name = next(iter(cpu_options))
    monkeypatch.setenv("XLA_FLAGS", f"--xla_force_host_platform_device_count=1 --{name}=")
    assert layout.CPU.network_compiler_options() == {}
    layout._known_options.cache_clear()  # pylint: disable=protected-access
    # A flag whose name only starts with the option's is another flag.
    monkeypatch.setenv("XLA_FLAGS", f"--{name}_other=1")
    assert layout.CPU.network_compiler_options() == known
    monkeypatch.delenv("XLA_FLAGS")
    # An option this XLA does not know (one of another release): XLA's defaults.
    assert layout._known_options((("xla_cpu_no_such_option", "1"),)) == {}  # pylint: disable=protected-access
  finally:
    layout._known_options.cache_clear()  # pylint: disable=protected-access


def test_a_network_jit_compiles_with_the_options_and_computes_the_same():
  from line_jax.features import _extract

  args = (*_small_network_inputs(8), 4)
  tuned = _extract._apply.jitted().lower(*args).compile()  # pylint: disable=protected-access
  plain = jax.jit(_extract.network_outputs, static_argnums=(0, 5)).lower(*args).compile()
  # jax 0.10's XLA hands every convolution to YNNPACK (a `__ynn_fusion` each);
  # with the options only the head's product goes there.
  if layout.CPU.network_compiler_options() and "__ynn_fusion" in plain.as_text():
    assert plain.as_text().count("__ynn_fusion") > 5
    assert tuned.as_text().count("__ynn_fusion") == 1
  for a, b in zip(_extract._apply(*args), plain(*args[1:5])):  # pylint: disable=protected-access
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
