"""Serving a fitted detector: save once, load in the server, score any batch size.

    python examples/serving.py                       # fits a LINe state first
    python examples/serving.py --state /path/state   # serves a state line_jax.save wrote

`line_jax.save(path, state)` writes any scorer's fitted state (orbax arrays
and a JSON description, no pickle); `line_jax.load(path)` gives it back with
its class and hyperparameters, ready to score, with no target to pass; the
server names the method it serves (`--method`). Requests arrive in batches
of every size; `Scorer.score` pads each to a bucket (8, 16, 32, ...), so a
stream of sizes 1..300 compiles a handful of times, not 300. Under 10 s.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import numpy as np

import line_jax
from line_jax import scorers

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def fit_demo_state(path: str, num_features: int = 64, num_classes: int = 10, seed: int = 0):
  """Fits LINe on stand-in features and saves it: what a training job would do."""
  rng = np.random.default_rng(seed)
  kernel = (rng.normal(size=(num_features, num_classes)) / 8).astype(np.float32)
  bias = np.zeros(num_classes, np.float32)
  labels = rng.integers(0, num_classes, 5000)
  features = np.abs(rng.normal(size=(5000, num_features))).astype(np.float32)
  features += 3 * np.clip(kernel.T[labels], 0, None)
  state = scorers.get("line").fit(features, labels, kernel, bias)
  line_jax.save(path, state)
  return state


def serve(scorer: scorers.Scorer, state, requests) -> tuple[list[np.ndarray], int]:
  """Scores each request; returns the scores and the number of XLA compilations."""
  compiled = []

  def listener(event, duration, **kwargs):
    del duration, kwargs
    if event == _COMPILE_EVENT:
      compiled.append(event)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    scores = [np.asarray(scorer.score(state, batch)) for batch in requests]
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  return scores, len(compiled)


def main(argv=None) -> dict[str, float]:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--state", help="a folder line_jax.save wrote; none: fit one first")
  p.add_argument("--method", default="line", choices=scorers.names(),
                 help="the scorer that fitted --state")
  p.add_argument("--num-features", type=int, default=64,
                 help="request width where the state holds no head (knn, mahalanobis)")
  p.add_argument("--max-batch", type=int, default=300, help="requests of 1..this many rows")
  args = p.parse_args(argv)
  start = time.perf_counter()

  with tempfile.TemporaryDirectory() as tmp:
    path = args.state
    fitted = None
    if path is None:
      path = os.path.join(tmp, "line_state")
      fitted = fit_demo_state(path)
      args.method = "line"
      print(f"fitted and saved a {type(fitted).__name__} to {path}")
    state = line_jax.load(path)  # in the server: no target, hyperparameters kept
  print(f"loaded {type(state).__name__} "
        + " ".join(f"{k}={getattr(state, k)}" for k in ("p_w", "p_a") if hasattr(state, k)))

  # Stand-in requests as wide as the head: your model's features in a real server.
  width = state.kernel.shape[0] if hasattr(state, "kernel") else args.num_features
  rng = np.random.default_rng(1)
  sizes = rng.permutation(np.arange(1, args.max_batch + 1))
  requests = [np.abs(rng.normal(size=(int(n), width))).astype(np.float32) for n in sizes]
  t = time.perf_counter()
  scorer = scorers.get(args.method)
  scores, compilations = serve(scorer, state, requests)
  elapsed = time.perf_counter() - t
  assert [len(s) for s in scores] == list(sizes)
  if fitted is not None:  # The loaded state scores exactly as the fitted one.
    want = np.asarray(scorer.score(fitted, requests[0]))
    np.testing.assert_array_equal(scores[0], want)
    print("loaded state scores identically to the fitted one")
  rows = int(sum(sizes))
  print(f"served {len(requests)} requests of 1..{args.max_batch} rows ({rows:,} rows) in "
        f"{elapsed:.2f} s with {compilations} compilations")
  print(f"done in {time.perf_counter() - start:.1f} s")
  return {"requests": len(requests), "compilations": compilations}


if __name__ == "__main__":
  main()
