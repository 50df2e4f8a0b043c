"""Every Python block in the README runs as written."""

import os
import re

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
BLOCKS = re.findall(r"```python\n(.*?)```", open(README).read(), re.S)


def test_the_readme_has_python_blocks():
  assert BLOCKS


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  exec(compile(BLOCKS[index], f"README.md block {index}", "exec"), {"__name__": "readme"})
