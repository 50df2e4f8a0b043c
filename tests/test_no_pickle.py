"""Nothing in the package or the benchmarks can unpickle (run code from a file).

Checked on the syntax tree, so comments and docstrings that mention pickle do
not count and a call split over lines does: any import of pickle, cPickle,
cloudpickle or dill; any `pickle.load` / `loads` / `Unpickler`; any call with
`allow_pickle=True`; any `torch.load(...)` without `weights_only=True`. A
text search backs it up for `cloudpickle` and `allow_pickle=True` anywhere.
"""

import ast
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCANNED = ("line_jax", "benchmarks")
_MODULES = {"pickle", "cPickle", "_pickle", "cloudpickle", "dill"}
_TEXT = re.compile(r"cloudpickle|allow_pickle\s*=\s*True|import\s+pickle|pickle\.load")


def _is_true(node) -> bool:
  return isinstance(node, ast.Constant) and node.value is True


def pickle_uses(source: str, filename: str = "<source>") -> list[str]:
  """`"line: what"` for every way `source` could unpickle."""
  found = []
  for node in ast.walk(ast.parse(source, filename)):
    if isinstance(node, ast.Import):
      found += [f"{node.lineno}: import {a.name}" for a in node.names
                if a.name.split(".")[0] in _MODULES]
    elif isinstance(node, ast.ImportFrom) and node.module:
      if node.module.split(".")[0] in _MODULES:
        found.append(f"{node.lineno}: from {node.module} import ...")
    elif isinstance(node, ast.Attribute) and node.attr in {"load", "loads", "Unpickler"}:
      if isinstance(node.value, ast.Name) and node.value.id in _MODULES:
        found.append(f"{node.lineno}: {node.value.id}.{node.attr}")
    if isinstance(node, ast.Call):
      keywords = {k.arg: k.value for k in node.keywords}
      if "allow_pickle" in keywords and not (
          isinstance(keywords["allow_pickle"], ast.Constant)
          and keywords["allow_pickle"].value is False):
        found.append(f"{node.lineno}: allow_pickle not False")
      func = node.func
      if (isinstance(func, ast.Attribute) and func.attr == "load"
          and isinstance(func.value, ast.Name) and func.value.id == "torch"
          and not _is_true(keywords.get("weights_only"))):
        found.append(f"{node.lineno}: torch.load without weights_only=True")
  for number, text in enumerate(source.splitlines(), 1):
    code = text.split("#", 1)[0]
    if _TEXT.search(code) and not code.strip().startswith(('"', "'")):
      found.append(f"{number}: text {_TEXT.search(code).group(0)!r}")
  return sorted(set(found))


def _files():
  for top in SCANNED:
    for root, _, names in os.walk(os.path.join(REPO, top)):
      for name in sorted(names):
        if name.endswith(".py"):
          yield os.path.join(root, name)


def test_the_package_and_benchmarks_never_unpickle():
  files = list(_files())
  assert len(files) > 20  # The scan really covers the package.
  offences = {}
  for path in files:
    with open(path, encoding="utf-8") as f:
      uses = pickle_uses(f.read(), path)
    if uses:
      offences[os.path.relpath(path, REPO)] = uses
  assert not offences, offences


@pytest.mark.parametrize("source", [
    "import pickle",
    "import cloudpickle as cp",
    "from pickle import loads",
    "import numpy as np\nx = np.load('a.npy', allow_pickle=True)",
    "import numpy as np\nx = np.load('a.npy',\n            allow_pickle=flag)",
    "import torch\nsd = torch.load('m.pt')",
    "import torch\nsd = torch.load('m.pt', weights_only=False)",
    "import pickle as p\np.load(f)",
])
def test_the_checker_catches(source):
  assert pickle_uses(source)


@pytest.mark.parametrize("source", [
    "import numpy as np\nx = np.load('a.npy', allow_pickle=False)",
    "import torch\nsd = torch.load('m.pt', map_location='cpu', weights_only=True)",
    '"""Read without pickle: never unpickled."""',
])
def test_the_checker_allows(source):
  assert not pickle_uses(source)
