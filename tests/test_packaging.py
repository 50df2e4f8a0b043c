"""The wheel: only `line_jax`, the committed checkpoint inside, CLIs that run.

Builds the wheel from a copy of the package's files (so the build writes no
build/ or egg-info into the checkout), installs it with `pip --target` into
a folder of its own, and runs the CLIs with their default checkpoint from a
directory outside the repository, with that folder on PYTHONPATH: the
installed copy, not the checkout, is what runs (checked).
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

from line_jax.data import DEBIAN_FASHION_MNIST_DIR

# End to end, in subprocesses or at full scale: `-m 'not slow'` skips them.
pytestmark = pytest.mark.slow

REPO = pathlib.Path(__file__).resolve().parents[1]
CHECKPOINT = pathlib.Path("line_jax", "checkpoints", "fashion_mnist_resnet_small")


def _files(root: pathlib.Path) -> set[str]:
  return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
  """`(wheel, target)`: the built wheel and the folder it is installed in."""
  base = tmp_path_factory.mktemp("packaging")
  src = base / "src"
  src.mkdir()
  ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
  for name in ("line_jax", "benchmarks"):  # benchmarks/: present, and left out.
    shutil.copytree(REPO / name, src / name, ignore=ignore)
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(REPO / name, src / name)
  pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
  subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", str(src),
                  "-w", str(base / "dist")], check=True, cwd=base, timeout=300)
  (wheel,) = (base / "dist").glob("line_jax-*.whl")
  target = base / "site"
  subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)],
                 check=True, cwd=base, timeout=300)
  return wheel, target


def _run(target, *args, cwd, python_flags=()):
  env = dict(os.environ, PYTHONPATH=str(target), JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, *python_flags, *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=300)


def test_the_wheel_holds_line_jax_and_its_checkpoint_only(installed):
  wheel, target = installed
  names = zipfile.ZipFile(wheel).namelist()
  assert {n.split("/")[0] for n in names} == {"line_jax", "line_jax-0.1.0.dist-info"}
  assert not any(n.startswith(("benchmarks/", "tests/")) for n in names)
  committed = {(CHECKPOINT / f).as_posix() for f in _files(REPO / CHECKPOINT)}
  assert committed and committed <= set(names)
  assert sorted(os.listdir(target)) == ["line_jax", "line_jax-0.1.0.dist-info"]


def test_installed_copy_is_what_runs_and_benchmarks_is_not_there(installed, tmp_path):
  _, target = installed
  probe = ("import json, line_jax, line_jax.models as m, line_jax.runs as r; "
           "print(json.dumps([line_jax.__file__, m.DEFAULT_CHECKPOINT, "
           "r.BenchmarkData().checkpoint]))")
  done = _run(target, "-c", probe, cwd=tmp_path)
  assert done.returncode == 0, done.stderr
  for path in json.loads(done.stdout):
    assert pathlib.Path(path).is_relative_to(target), path
    assert os.path.exists(path), path
  # -S: without site-packages (where an editable install of the checkout may
  # map `benchmarks`), only PYTHONPATH, i.e. the installed folder, is searched.
  missing = _run(target, "-c", "import importlib.util as u; print(u.find_spec('benchmarks'))",
                 cwd=tmp_path, python_flags=("-S",))
  assert missing.returncode == 0 and missing.stdout.strip() == "None", missing


@pytest.mark.skipif(not os.path.isdir(DEBIAN_FASHION_MNIST_DIR),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_installed_clis_run_with_the_packaged_checkpoint(installed, tmp_path):
  _, target = installed
  fit = _run(target, "-m", "line_jax.fit", "--out", "fitted", "--max-examples", "64",
             "--batch-size", "32", "--scorers", "energy,line", "--quiet", cwd=tmp_path)
  assert fit.returncode == 0, fit.stderr
  with open(tmp_path / "fitted" / "args.json") as f:
    args = json.load(f)
  assert pathlib.Path(args["checkpoint"]).is_relative_to(target)
  assert (tmp_path / "fitted" / "energy").is_dir() and (tmp_path / "fitted" / "line").is_dir()
  evaluate = _run(target, "-m", "line_jax.evaluate", "--out", "evaluated", "--max-train", "64",
                  "--max-test", "64", "--ood-size", "64", "--methods", "energy",
                  "--no-plots", cwd=tmp_path)
  assert evaluate.returncode == 0, evaluate.stderr
  with open(tmp_path / "evaluated" / "metrics.json") as f:
    assert "energy" in json.dumps(json.load(f))
