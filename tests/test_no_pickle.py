"""Nothing in the package or the benchmarks can unpickle (run code from a file).

Checked on the syntax tree, so comments and docstrings that mention pickle do
not count and a call split over lines does: any import of pickle, cPickle,
cloud-pickle or dill; any load / loads / Unpickler from them; any call whose
allow-pickle argument is not the constant False; any `torch.load(...)`
without `weights_only=True`. A text search backs it up.

The patterns below are spelt in pieces (`_P`) so that this file, which must
name them, does not itself read as pickle use to a plain text search.
"""

import ast
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCANNED = ("line_jax", "benchmarks")
_P = "pick" + "le"
_ALLOW = f"allow_{_P}"
_MODULES = {_P, "cPickle", f"_{_P}", f"cloud{_P}", "dill"}
_TEXT = re.compile(rf"cloud{_P}|{_ALLOW}\s*=\s*True|import\s+{_P}|{_P}\.load")


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
      if _ALLOW in keywords and not (
          isinstance(keywords[_ALLOW], ast.Constant) and keywords[_ALLOW].value is False):
        found.append(f"{node.lineno}: {_ALLOW} not False")
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
    f"import {_P}",
    f"import cloud{_P} as cp",
    f"from {_P} import loads",
    f"import numpy as np\nx = np.load('a.npy', {_ALLOW}=True)",
    f"import numpy as np\nx = np.load('a.npy',\n            {_ALLOW}=flag)",
    "import torch\nsd = torch.load('m.pt')",
    "import torch\nsd = torch.load('m.pt', weights_only=False)",
    f"import {_P} as p\np.load(f)",
])
def test_the_checker_catches(source):
  assert pickle_uses(source)


@pytest.mark.parametrize("source", [
    f"import numpy as np\nx = np.load('a.npy', {_ALLOW}=False)",
    "import torch\nsd = torch.load('m.pt', map_location='cpu', weights_only=True)",
    '"""Read without pickle: never unpickled."""',
])
def test_the_checker_allows(source):
  assert not pickle_uses(source)
