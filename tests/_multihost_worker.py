"""One process of tests/test_multihost.py: fits every scorer on its own rows.

Usage: python tests/_multihost_worker.py PORT PROCESS_ID OUT_DIR
"""

import os
import sys

import jax
import numpy as np

PORT, PID, OUT = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
jax.distributed.initialize(f"127.0.0.1:{PORT}", num_processes=2, process_id=PID,
                           initialization_timeout=60)

from line_jax import scorers  # noqa: E402  After initialize, as the contract says.
from line_jax import sharding  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from _multihost_data import SMALL, local_batches, problem  # noqa: E402

features, labels, kernel, bias, test = problem()
os.makedirs(os.path.join(OUT, f"p{PID}"), exist_ok=True)
batches = local_batches(features, labels, PID)
for name in scorers.names():
  hparams = {k: v for k, v in SMALL.get(name, {}).items() if k in scorers.get(name).defaults}
  state = scorers.get(name).fit_from_batches(batches, kernel, bias, **hparams)
  # Each process writes its own copy (orbax's saves are multi-process: only
  # process 0 would write), as plain arrays of the state's leaves.
  leaves = {f"{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(state))}
  np.savez(os.path.join(OUT, f"p{PID}", name + ".npz"), **leaves)
  local_test = test[PID::2]
  scores = sharding.score(scorers.get(name).score, state, local_test, sharding.batch_mesh())
  np.save(os.path.join(OUT, f"p{PID}", name + "_scores.npy"), np.asarray(scores))
print("done", PID, flush=True)
