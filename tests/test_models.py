"""Tests of line_jax.models: shapes, feature widths, the head hook, dtypes."""

import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from line_jax import models

FEATURES = {"resnet18_cifar": 512, "densenet100": 342, "resnet18": 512, "resnet34": 512,
            "resnet50": 2048, "resnet101": 2048, "resnet152": 2048,
            "resnet_small": 128}


def _input(name, batch=2, seed=0):
  h, w, c = models.input_shapes[name]
  h, w = min(h, 32), min(w, 32)  # ResNet-50 on 32x32 keeps the test fast.
  return np.random.default_rng(seed).normal(size=(batch, h, w, c)).astype(
      np.float32)


def _shapes(model, x):
  return jax.eval_shape(model.init, jax.random.key(0),
                        jax.ShapeDtypeStruct(x.shape, jnp.float32))


def _random_variables(model, x, seed=0):
  """He-scaled random weights and BN statistics, without `model.init`.

  Eager `init` compiles every initializer separately (tens of seconds for
  DenseNet-100 on CPU); shapes from `eval_shape` and NumPy draws are instant.
  """
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    if name == "kernel":
      std = math.sqrt(2.0 / math.prod(leaf.shape[:-1]))
      value = rng.normal(0.0, std, leaf.shape)
    elif name in ("scale", "var"):
      value = rng.uniform(0.5, 1.5, leaf.shape)
    else:  # bias, mean
      value = rng.normal(0.0, 0.1, leaf.shape)
    return value.astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, _shapes(model, x))


def _num_params(model, x):
  return sum(leaf.size for leaf in jax.tree.leaves(_shapes(model, x)["params"]))


# The deepest two compile for tens of seconds; test_torch_import.py runs them
# against torchvision's architecture, features and logits both.
@pytest.mark.parametrize(
    "name", sorted(set(models.registry) - {"resnet101", "resnet152"}))
def test_features_are_the_head_input(name):
  model = models.get_model(name, num_classes=7)
  x = _input(name)
  variables = _random_variables(model, x)
  logits, features = jax.jit(model.apply)(variables, x)
  assert logits.shape == (2, 7) and logits.dtype == jnp.float32
  assert features.shape == (2, FEATURES[name]) == (2, model.num_features)
  assert features.dtype == jnp.float32
  assert np.all(np.asarray(features) >= 0.0)
  assert np.all(np.isfinite(np.asarray(logits)))
  fc = variables["params"]["fc"]
  expected = np.asarray(features) @ fc["kernel"] + fc["bias"]
  # Random BN statistics let activations grow: compare relative to the scale.
  np.testing.assert_allclose(logits, expected, rtol=1e-5,
                             atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("name, num_classes, expected", [
    ("resnet18", 1000, 11_689_512),  # torchvision's resnet18 ... resnet152
    ("resnet34", 1000, 21_797_672),
    ("resnet50", 1000, 25_557_032),
    ("resnet101", 1000, 44_549_160),
    ("resnet152", 1000, 60_192_808),
    ("resnet18_cifar", 10, 11_173_962),
    ("densenet100", 10, 769_162),  # DenseNet-BC-100, k = 12 ("0.8M")
])
def test_parameter_counts_match_the_reference_architectures(
    name, num_classes, expected):
  model = models.get_model(name, num_classes)
  assert _num_params(model, _input(name, batch=1)) == expected


def test_resnet_small_size():
  model = models.get_model("resnet_small", 10)
  assert 300_000 <= _num_params(model, _input("resnet_small")) <= 1_000_000


def test_init_and_train_mode_update_batch_stats():
  model = models.get_model("resnet_small", 10)
  x = _input("resnet_small", batch=4)
  variables = jax.jit(model.init)(jax.random.key(0), x)
  (logits, features), updates = model.apply(
      variables, x, train=True, mutable=["batch_stats"])
  assert logits.shape == (4, 10) and features.shape == (4, 128)
  old = variables["batch_stats"]["bn1"]["mean"]
  new = updates["batch_stats"]["bn1"]["mean"]
  assert not np.allclose(old, new)
  # Flax momentum 0.9 is PyTorch's momentum 0.1: one step moves 10 % of the
  # way to the batch mean of the stem convolution's output.
  stem = jax.lax.conv_general_dilated(
      x, variables["params"]["conv1"]["kernel"], (1, 1), ((1, 1), (1, 1)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_allclose(
      new, 0.9 * np.asarray(old) + 0.1 * np.mean(stem, axis=(0, 1, 2)),
      rtol=1e-5, atol=1e-6)


def test_bfloat16_compute_keeps_float32_params_and_outputs():
  x = _input("resnet_small")
  f32 = models.get_model("resnet_small", 10)
  bf16 = models.get_model("resnet_small", 10, dtype=jnp.bfloat16)
  variables = _random_variables(f32, x)
  assert jax.tree.map(lambda a: a.dtype, jax.eval_shape(
      bf16.init, jax.random.key(0), x)) == jax.tree.map(
          lambda a: a.dtype, variables)
  logits, features = jax.jit(bf16.apply)(variables, x)
  ref_logits, ref_features = jax.jit(f32.apply)(variables, x)
  assert logits.dtype == features.dtype == jnp.float32
  scale = float(np.abs(ref_features).max())
  np.testing.assert_allclose(features, ref_features, atol=0.05 * scale)


def test_unknown_name():
  with pytest.raises(ValueError, match="resnet50"):
    models.get_model("resnet51", 10)


def test_importing_models_does_not_import_torch():
  code = ("import sys, line_jax.models; "
          "assert 'torch' not in sys.modules, 'torch imported'")
  subprocess.run([sys.executable, "-c", code], check=True)


def test_head_params_of_every_registered_model_is_its_fc():
  for name in sorted(models.registry):
    model = models.get_model(name, num_classes=7)
    shapes = _shapes(model, _input(name, batch=1))
    kernel, bias = models.head_params(shapes, head="fc")
    assert kernel.shape == (model.num_features, 7) and bias.shape == (7,)
    assert models.dense_layers(shapes) == {"fc": (model.num_features, 7)}


def test_head_params_nested_names_no_bias_and_bare_params():
  params = {"backbone": {"Conv_0": {"kernel": np.zeros((3, 3, 1, 4))}},
            "head": {"fc": {"kernel": np.ones((4, 2)), "bias": np.zeros(2)},
                     "proj": {"kernel": np.ones((4, 4))}}}
  kernel, bias = models.head_params({"params": params}, head="head/fc")
  assert kernel.shape == (4, 2) and bias.shape == (2,)
  kernel, bias = models.head_params(params, head="head/proj")  # params alone; no bias
  assert kernel.shape == (4, 4) and bias is None
  assert models.head_params(params, head=("head", "fc"))[0].shape == (4, 2)
  assert models.dense_layers(params) == {"head/fc": (4, 2), "head/proj": (4, 4)}


@pytest.mark.parametrize("head", ["fc", "head", "backbone/Conv_0", "head/fc/kernel", "x/y"])
def test_head_params_wrong_name_lists_the_dense_layers(head):
  params = {"backbone": {"Conv_0": {"kernel": np.zeros((3, 3, 1, 4))}},
            "head": {"fc": {"kernel": np.ones((4, 2)), "bias": np.zeros(2)}}}
  with pytest.raises(ValueError, match=rf"no Dense layer '{head}' in the variables; its "
                     r"Dense-like submodules \(kernel features x classes\): 'head/fc' 4x2$"):
    models.head_params({"params": params}, head=head)


def test_head_params_bad_arguments():
  with pytest.raises(ValueError, match="no Dense-like submodule"):
    models.head_params({"params": {}}, head="fc")
  with pytest.raises(ValueError, match="head must name a submodule"):
    models.head_params({"params": {}}, head="")
  with pytest.raises(TypeError, match="variables dict .* got list"):
    models.head_params([1, 2], head="fc")


def test_head_params_of_an_nnx_module():
  from flax import nnx  # pylint: disable=g-import-not-at-top

  class Net(nnx.Module):

    def __init__(self, rngs):
      self.body = nnx.Linear(3, 4, rngs=rngs)
      self.head = nnx.Dict(fc=nnx.Linear(4, 2, use_bias=False, rngs=rngs))

  net = Net(nnx.Rngs(0))
  kernel, bias = models.head_params(net, head="head/fc")
  assert kernel.shape == (4, 2) and bias is None
  np.testing.assert_array_equal(kernel, net.head["fc"].kernel[...])
  with pytest.raises(ValueError, match=r"no Dense layer 'fc' in Net; .*'body' 3x4, "
                     r"'head/fc' 4x2"):
    models.head_params(net, head="fc")
