"""Two JAX processes on 127.0.0.1 (gloo, 2 CPU devices each) fit every scorer,
each on its own uneven rows, and get the state one process gets on all rows.

The pair is started with a free port and stopped with SIGKILL on any hang
(JAX's preemption notifier catches SIGTERM).
"""

import os
import socket
import subprocess
import sys
import time

import chex
import numpy as np
import pytest

import jax
from line_jax import scorers

sys.path.insert(0, os.path.dirname(__file__))
from _multihost_data import SMALL, local_batches, problem  # noqa: E402

# End to end, in subprocesses or at full scale: `-m 'not slow'` skips them.
pytestmark = pytest.mark.slow

HERE = os.path.dirname(os.path.abspath(__file__))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
  out = tmp_path_factory.mktemp("multihost")
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2",
             PYTHONPATH=os.path.dirname(HERE))
  procs = [subprocess.Popen(
      ["timeout", "-s", "KILL", "150", sys.executable, os.path.join(HERE, "_multihost_worker.py"),
       str(port), str(pid), str(out)], env=env, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True) for pid in (0, 1)]
  deadline = time.monotonic() + 170
  while any(p.poll() is None for p in procs):
    if any(p.poll() not in (None, 0) for p in procs) or time.monotonic() > deadline:
      for p in procs:  # One failed (or the pair hung): the other would wait forever.
        p.kill()
    time.sleep(0.2)
  for p in procs:
    assert p.returncode == 0, p.stdout.read()[-3000:]
  return out


@pytest.mark.parametrize("name", scorers.names())
def test_each_process_gets_the_single_process_state(pair, name):
  features, labels, kernel, bias, test = problem()
  scorer = scorers.get(name)
  hparams = {k: v for k, v in SMALL.get(name, {}).items() if k in scorer.defaults}
  single = scorer.fit_from_batches(local_batches(features, labels, 0) +
                                   local_batches(features, labels, 1), kernel, bias, **hparams)
  leaves, treedef = jax.tree.flatten(single)
  states = []
  for pid in (0, 1):
    saved = np.load(pair / f"p{pid}" / f"{name}.npz")
    assert len(saved.files) == len(leaves)
    states.append(jax.tree.unflatten(treedef, [saved[str(i)] for i in range(len(leaves))]))
  chex.assert_trees_all_equal(states[0], states[1])
  if name == "line":
    np.testing.assert_array_equal(states[0].neuron_mask, single.neuron_mask)
    np.testing.assert_array_equal(states[0].weight_floor, single.weight_floor)
  chex.assert_trees_all_close(states[0], single, rtol=1e-6, atol=1e-6)
  for pid in (0, 1):  # Each process scored its own rows.
    got = np.load(pair / f"p{pid}" / f"{name}_scores.npy")
    want = np.asarray(scorer.score(single, test[pid::2]))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
