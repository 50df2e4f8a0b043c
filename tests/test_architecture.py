"""The package reads as layers, one direction only (docs/architecture.md).

CLIs -> runs -> the library (suites, features, scorers, LINe, io, ...) ->
core (the fold, validation, padding, the layout switch, data, models,
distributed). Every module's `line_jax` imports, read from its source,
point to its own layer or below, and the graph between modules has no
cycle. One module asks JAX for the backend; one touches multihost_utils;
the scorers import with jax, flax and numpy alone.
"""

import ast
import collections
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "line_jax")

# Top to bottom; a unit is a top-level module or subpackage of line_jax.
LAYERS = (
    ("cli", {"_cli", "fit", "evaluate", "openood", "tune", "train", "export", "predict"}),
    ("runs", {"runs"}),
    ("library", {"detector", "suites", "features", "sharding", "odin", "plots", "io", "scorers",
                 "line", "metrics", "calibration"}),
    ("core", {"fold", "resumable", "distributed", "layout", "_validation", "_scoring", "_buckets",
              "_exported", "_json", "_matmul", "_progress", "data", "models"}),
)
RANK = {unit: rank for rank, (_, units) in enumerate(LAYERS) for unit in units}


def _modules() -> dict[str, str]:
  out = {}
  for folder, _, files in os.walk(ROOT):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(folder, name)
        rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
        out[rel.removesuffix(".__init__")] = path
  return out


def _imports(path: str, modules: dict[str, str]) -> set[str]:
  """The line_jax modules `path` imports, anywhere in it (functions included)."""
  found = set()
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("line_jax"):
      for alias in node.names:
        full = f"{node.module}.{alias.name}"
        found.add(full if full in modules else node.module)
    elif isinstance(node, ast.Import):
      found.update(a.name for a in node.names if a.name.startswith("line_jax"))
  return found


def _unit(module: str) -> str:
  parts = module.split(".")
  return parts[1] if len(parts) > 1 else ""


def _unit_graph() -> dict[str, set[str]]:
  modules = _modules()
  graph = collections.defaultdict(set)
  for module, path in modules.items():
    for target in _imports(path, modules):
      if _unit(module) and _unit(target) and _unit(module) != _unit(target):
        graph[_unit(module)].add(_unit(target))
  return graph


def test_every_unit_has_a_layer():
  units = {_unit(m) for m in _modules()} - {"", "checkpoints"}
  assert units <= set(RANK), f"place {sorted(units - set(RANK))} in a layer"


def test_imports_point_down_or_sideways_never_up():
  upward = [f"{a} ({LAYERS[RANK[a]][0]}) imports {b} ({LAYERS[RANK[b]][0]})"
            for a, targets in _unit_graph().items() for b in targets if RANK[b] < RANK[a]]
  assert not upward, upward


def test_no_import_cycle():
  graph = _unit_graph()
  state: dict[str, int] = {}

  def visit(unit, trail):
    if state.get(unit) == 1:
      raise AssertionError("import cycle: " + " -> ".join(trail + [unit]))
    if state.get(unit) == 2:
      return
    state[unit] = 1
    for target in sorted(graph.get(unit, ())):
      visit(target, trail + [unit])
    state[unit] = 2

  for unit in sorted(graph):
    visit(unit, [])


@pytest.mark.parametrize("cli", sorted(LAYERS[0][1] - {"_cli"}))
def test_each_cli_is_a_thin_shell(cli):
  source = open(os.path.join(ROOT, f"{cli}.py")).read()
  assert len(source.splitlines()) <= 80
  assert f"from line_jax.runs import {cli}" in source  # One run, called once.


@pytest.mark.parametrize("needle, owner", [("default_backend", "layout.py"),
                                           ("multihost_utils", "distributed.py")])
def test_one_module_owns_each_device_question(needle, owner):
  holders = sorted(os.path.relpath(path, ROOT) for path in _modules().values()
                   if needle in open(path).read())
  assert holders == [owner]


BLOCKER = """
import importlib.abc, sys
REFUSED = {"tensorflow_datasets", "tensorflow", "grain", "orbax", "tensorstore", "matplotlib",
           "skimage", "sklearn", "torch", "tqdm", "optax", "PIL", "chex", "threadpoolctl"}
class Refuse(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path, target=None):
    if name.partition(".")[0] in REFUSED:
      raise ImportError("not installed here: " + name)
sys.meta_path.insert(0, Refuse())
import numpy as np
from line_jax import scorers
rng = np.random.default_rng(0)
x = np.abs(rng.normal(size=(60, 8))).astype(np.float32)
y = np.arange(60) % 3
k = rng.normal(size=(8, 3)).astype(np.float32)
for name in ("energy", "line", "react", "knn", "mahalanobis"):
  s = scorers.get(name)
  assert np.isfinite(np.asarray(s.score(s.fit(x, y, k, None), x))).all(), name
print("ok")
"""


def test_scorers_need_only_jax_flax_and_numpy():
  # As if TFDS, grain, orbax, matplotlib, torch, PIL, scikit-image and the
  # rest of line_jax's dependencies were not installed.
  done = subprocess.run([sys.executable, "-c", BLOCKER], capture_output=True, text=True,
                        timeout=300, cwd=os.path.dirname(ROOT))
  assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
