"""docs/bad_inputs.md stays true: every test its table names exists.

A row names its test as `tests/FILE.py::test_name`, or `::test_name` in the
file named last before it; a renamed or deleted test fails here.
"""

import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _tests_of(path: pathlib.Path) -> set[str]:
  tree = ast.parse(path.read_text())
  return {node.name for node in ast.walk(tree)
          if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
          and node.name.startswith("test_")}


def _references() -> list[tuple[str, str]]:
  refs, current = [], None
  text = (ROOT / "docs" / "bad_inputs.md").read_text()
  for match in re.finditer(r"(tests/[\w/]+\.py)?::(test_\w+)", text):
    current = match.group(1) or current
    refs.append((current, match.group(2)))
  return refs


def test_every_test_the_table_names_exists():
  refs = _references()
  assert len(refs) > 50
  defined: dict[str, set[str]] = {}
  missing = []
  for file, name in refs:
    assert file is not None, f"::{name} follows no file"
    if file not in defined:
      path = ROOT / file
      defined[file] = _tests_of(path) if path.exists() else set()
    if name not in defined[file]:
      missing.append(f"{file}::{name}")
  assert not missing, "docs/bad_inputs.md names tests that do not exist: " + ", ".join(missing)
