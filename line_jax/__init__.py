"""line_jax: LINe out-of-distribution detection in JAX, fused and jitted.

Every score in line_jax follows one convention: higher = more in-distribution.

    from line_jax import scorers
    state = scorers.get("line").fit(train_features, train_labels, kernel, bias)
    scores = scorers.get("line").score(state, features)
    line_jax.save("fits/line", state); state = line_jax.load("fits/line")

Submodules load on first use, so `import line_jax.scorers` needs only jax,
flax and numpy; `docs/architecture.md` shows how the modules layer.
"""

import importlib

__version__ = "0.1.0"

_SUBMODULES = frozenset((
    "data", "distributed", "features", "fold", "io", "layout", "line", "metrics", "calibration", "detector",
    "models", "odin", "plots", "resumable", "runs", "scorers", "sharding", "suites"))


def save(path, state) -> None:
  """`line_jax.io.save`: writes a fitted state to the folder `path`."""
  from line_jax import io  # pylint: disable=g-import-not-at-top
  io.save(path, state)


def load(path):
  """`line_jax.io.load`: the state `save` wrote to `path`, ready to score."""
  from line_jax import io  # pylint: disable=g-import-not-at-top
  return io.load(path)


def __getattr__(name):
  if name in _SUBMODULES:
    return importlib.import_module(f"line_jax.{name}")
  raise AttributeError(f"module 'line_jax' has no attribute {name!r}")
