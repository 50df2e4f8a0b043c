"""Same inputs, same bits: fits and scores of every scorer, across processes.

Two fresh interpreters fit every registered scorer on the same problem and
score the same batch (LINe with both strategies); they report a SHA-256 of
every state leaf and of the scores' bytes, which must agree exactly.
"""

import json
import os
import subprocess
import sys
import textwrap
import pytest

# End to end, in subprocesses or at full scale: `-m 'not slow'` skips them.
pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SCRIPT = textwrap.dedent("""
    import hashlib, json, sys
    import jax
    import numpy as np
    sys.path.insert(0, "tests")
    from conftest import random_problem
    from line_jax import line, scorers

    def digest(tree):
      h = hashlib.sha256()
      for leaf in jax.tree.leaves(tree):
        a = np.asarray(leaf)
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
      return h.hexdigest()

    features, labels, kernel, bias = random_problem(10, 32, 300, seed=3)
    test = np.abs(np.random.default_rng(4).normal(size=(97, 32))).astype(np.float32)
    hps = {"knn": dict(k=20), "vim": dict(dim=16), "line": dict(p_w=90, p_a=10, clip=1.0)}
    out = {}
    for name in scorers.names():
      scorer = scorers.get(name)
      state = scorer.fit(features, labels, kernel, bias, **hps.get(name, {}))
      again = scorer.fit(features, labels, kernel, bias, **hps.get(name, {}))
      out[name] = {"state": digest(state), "state_again": digest(again),
                   "scores": digest(scorer.score(state, test))}
    state = line.fit(features, labels, kernel, bias, p_w=90, p_a=10, clip=1.0)
    for strategy in ("dense", "grouped"):  # "auto" is one of the two.
      out["line/" + strategy] = {"scores": digest(line.score(state, test, strategy=strategy))}
    print("RESULT" + json.dumps(out))
""")


def _start():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.Popen([sys.executable, "-c", _SCRIPT], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(proc):
  stdout, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 0, stderr[-4000:]
  line = [l for l in stdout.splitlines() if l.startswith("RESULT")][-1]
  return json.loads(line[len("RESULT"):])


def test_two_fresh_processes_give_bit_identical_fits_and_scores():
  first, second = _start(), _start()
  a, b = _result(first), _result(second)
  from line_jax import scorers
  assert set(a) == set(scorers.names()) | {"line/dense", "line/grouped"}
  assert a == b
  for name, digests in a.items():
    # Within one process too: fitting twice gives the same state and scores.
    if "state_again" in digests:
      assert digests["state"] == digests["state_again"], name
