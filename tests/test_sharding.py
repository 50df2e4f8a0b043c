"""Batch-sharded fits and scores over 8 virtual CPU devices equal one device.

`--xla_force_host_platform_device_count` only works before JAX starts, so the
check runs in a fresh interpreter and reports JSON back.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from line_jax import sharding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    import numpy as np
    sys.path.insert(0, "tests")
    from conftest import random_problem
    from line_jax import line, scorers, sharding

    mesh = sharding.batch_mesh()
    # 1003 and 203 are not multiples of 8: the remainder and padding paths run.
    features, labels, kernel, bias = random_problem(10, 64, 1003, seed=1)
    test = np.abs(np.random.default_rng(2).normal(size=(203, 64))).astype(np.float32)
    out = {"devices": len(jax.devices()), "mesh": list(mesh.shape.items()), "rel": {}}

    def rel(a, b):
      a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
      return float(np.max(np.abs(a - b) / np.maximum(np.abs(a), 1e-12)))

    hps = {"line": dict(p_w=90, p_a=10, clip=1.0), "knn": dict(k=10)}
    for name in ("energy", "react", "mahalanobis", "knn", "vim", "line"):
      scorer = scorers.get(name)
      one = scorer.fit(features, labels, kernel, bias, **hps.get(name, {}))
      many = sharding.fit(name, features, labels, kernel, bias, mesh,
                          **hps.get(name, {}))
      fitted = max(rel(a, b) for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(many)))
      scored = rel(scorer.score(one, test), sharding.score(scorer.score, many, test, mesh))
      out["rel"][name] = [fitted, scored]

    # line.fit itself on a sharded batch (1000 rows: no padding needed).
    hp = dict(p_w=90, p_a=10, clip=1.0)
    split = sharding.batch_sharding(mesh)
    one = line.fit(features[:1000], labels[:1000], kernel, bias, **hp)
    many = line.fit(jax.device_put(features[:1000], split),
                    jax.device_put(labels[:1000], split), kernel, bias, **hp)
    out["rel"]["line.fit"] = [
        max(rel(a, b) for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(many))), 0.0]

    # line.score directly, both strategies.
    state = line.fit(features, labels, kernel, bias, **hp)
    for strategy in ("dense", "grouped"):  # "auto" is one of the two.
      want = line.score(state, test, strategy=strategy)
      got = sharding.score(line.score, state, test, mesh, strategy=strategy)
      out["rel"]["line.score/" + strategy] = [0.0, rel(want, got)]

    # The contributions' float64 sums from sharded batches.
    acc = sharding.update_sums(line.init_sums(10, 64), features, labels, kernel, mesh)
    out["rel"]["contributions"] = [
        rel(line.contributions(features, labels, kernel), line.finalize_sums(acc)), 0.0]
    out["sums_dtype"] = str(acc.sums.dtype)
    out["sums_devices"] = len(acc.sums.sharding.device_set)

    # Where the score ran: its input and output shardings and the compiled program.
    fn = sharding.sharded_score_fn(line.score, mesh)
    x = sharding.shard_batch(test, mesh)
    scores = fn(sharding.replicate(state, mesh), x)
    out["input_spec"] = list(x.sharding.spec)
    out["input_shards"] = sorted(s.data.shape[0] for s in x.addressable_shards)
    out["output_spec"] = list(scores.sharding.spec)
    out["output_devices"] = len(scores.sharding.device_set)
    hlo = fn.lower(sharding.replicate(state, mesh), x).compile().as_text()
    out["num_partitions_8"] = "num_partitions=8" in hlo
    print("RESULT" + json.dumps(out))
""")


@pytest.fixture(scope="module")
def report():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  run = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-4000:]
  line = [l for l in run.stdout.splitlines() if l.startswith("RESULT")][-1]
  return json.loads(line[len("RESULT"):])


def test_eight_devices_in_one_batch_mesh(report):
  assert report["devices"] == 8
  assert report["mesh"] == [["batch", 8]]


def test_sharded_fits_and_scores_equal_one_device(report):
  for name, (fitted, scored) in report["rel"].items():
    assert fitted <= 1e-5, (name, fitted)
    assert scored <= 1e-5, (name, scored)
  assert set(report["rel"]) >= {"energy", "react", "mahalanobis", "knn", "vim",
                                "line", "line.fit", "line.score/dense", "line.score/grouped",
                                "contributions"}


def test_computation_ran_over_eight_devices(report):
  # 203 rows padded to 208: 26 per device; the scores stay split the same way.
  assert report["input_spec"] == ["batch"]
  assert report["input_shards"] == [26] * 8
  assert report["output_spec"] == ["batch"]
  assert report["output_devices"] == 8
  assert report["num_partitions_8"]
  assert report["sums_dtype"] == "float64" and report["sums_devices"] == 8


_PAD_SCRIPT = textwrap.dedent("""
    import json
    import jax
    import jax.numpy as jnp
    import numpy as np
    from line_jax import sharding

    mesh = sharding.batch_mesh()
    out = {"devices": len(jax.devices())}
    # 5 rows over 4 devices: 3 padding rows; NumPy and JAX inputs, 1-D and 2-D.
    for name, x, fill in (("numpy", np.arange(5, dtype=np.float32), -1),
                          ("jax", jnp.arange(10, dtype=jnp.int32).reshape(5, 2), 7),
                          ("whole", np.arange(8, dtype=np.float32), -1)):
      y = sharding.shard_batch(x, mesh, fill=fill)
      out[name] = {"rows": np.asarray(y).tolist(),
                   "shards": sorted(s.data.shape[0] for s in y.addressable_shards),
                   "spec": list(y.sharding.spec)}
    print("RESULT" + json.dumps(out))
""")


def test_shard_batch_pads_with_fill():
  # One device pads nothing; four do, so the padding rows exist to be checked.
  mesh = sharding.batch_mesh()
  x = sharding.shard_batch(np.arange(5, dtype=np.float32), mesh, fill=-1)
  assert x.shape == (sharding.padded_size(5, mesh),)
  np.testing.assert_array_equal(np.asarray(x)[:5], np.arange(5))
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  run = subprocess.run([sys.executable, "-c", _PAD_SCRIPT], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-4000:]
  out = json.loads([l for l in run.stdout.splitlines() if l.startswith("RESULT")][-1][6:])
  assert out["devices"] == 4
  assert out["numpy"]["rows"] == [0, 1, 2, 3, 4, -1, -1, -1]
  assert out["jax"]["rows"] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [7, 7], [7, 7], [7, 7]]
  assert out["whole"]["rows"] == list(range(8))  # a multiple of 4: no padding
  for name in ("numpy", "jax", "whole"):
    assert out[name]["shards"] == [2, 2, 2, 2] and out[name]["spec"] == ["batch"]


def test_batches_cut_keeps_every_row_once():
  mesh = sharding.batch_mesh()
  features = np.arange(22, dtype=np.float32).reshape(11, 2)
  labels = np.arange(11)
  pieces = list(sharding.Batches([(features, labels)] * 2, mesh))
  rows = np.concatenate([np.asarray(f) for f, _ in pieces])
  np.testing.assert_array_equal(rows, np.concatenate([features, features]))
  np.testing.assert_array_equal(np.concatenate([np.asarray(y) for _, y in pieces]),
                                np.concatenate([labels, labels]))
