"""benchmarks.fit_memory on tiny folders: the JPEG trees, the measured runs, the files.

Measures nothing that matters (40 and 80 images): guards the folder
layout the fit CLI reads, the record and summary fields, and the written
JSON and markdown; not the ratio.
"""

import json
import pathlib

from PIL import Image
import pytest

pytest.importorskip("skimage")
pytest.importorskip("sklearn")

# pylint: disable=wrong-import-position
from benchmarks import fit_memory  # noqa: E402

# End to end, in subprocesses or at full scale: `-m 'not slow'` skips them.
pytestmark = pytest.mark.slow

_RECORD = {"images", "scorers", "peak_rss_mb", "wall_s", "rss_samples", "command"}
_SUMMARY = {"scorers", "small_images", "large_images", "small_peak_mb", "large_peak_mb",
            "ratio", "growth_mb", "within_goal"}


def test_make_folder_writes_ten_classes_of_colour_jpegs_once(tmp_path):
  folder = pathlib.Path(fit_memory.make_folder(tmp_path, 23))
  classes = sorted(p for p in folder.iterdir() if p.is_dir())
  assert len(classes) == fit_memory.CLASSES
  files = sorted(folder.glob("*/*.jpg"))
  assert len(files) == 23
  assert {len(list(c.glob("*.jpg"))) for c in classes} == {2, 3}
  with Image.open(files[0]) as image:
    assert image.format == "JPEG" and image.mode == "RGB"
    assert all(64 <= side <= 128 for side in image.size)
  stamp = files[0].stat().st_mtime_ns
  assert fit_memory.make_folder(tmp_path, 23) == str(folder)  # reused, not rewritten
  assert files[0].stat().st_mtime_ns == stamp


def test_smaller_folder_is_the_first_images_of_the_larger(tmp_path):
  large = pathlib.Path(fit_memory.make_folder(tmp_path, 30))
  small = pathlib.Path(fit_memory._subset(str(large), tmp_path / "small", 12))  # pylint: disable=protected-access
  names = sorted(p.name for p in small.glob("*/*.jpg"))
  assert names == [f"{i:06d}.jpg" for i in range(12)]
  for path in small.glob("*/*.jpg"):
    assert path.read_bytes() == (large / path.parent.name / path.name).read_bytes()


@pytest.fixture(scope="module")
def result(tmp_path_factory):
  cache = tmp_path_factory.mktemp("cache")
  out = tmp_path_factory.mktemp("out")
  fit_memory.main(["--cache", str(cache), "--sizes", "40,80", "--without", "knn",
                   "--out", str(out), "--", "--hparam", "knn.k=5"])
  folder = out / "cpu"
  return json.loads((folder / "fit_memory.json").read_text()), folder


def test_records_and_summary(result):
  payload, _ = result
  records = payload["records"]
  assert [(r["images"], r["scorers"]) for r in records] == [
      (40, "all"), (80, "all"), (40, "all but knn"), (80, "all but knn")]
  for r in records:
    assert set(r) == _RECORD
    assert r["peak_rss_mb"] > 50 and r["wall_s"] > 0
    assert "line_jax.fit" in r["command"] and "--quiet" in r["command"]
  assert "--scorers" not in records[0]["command"]
  assert "knn" not in records[2]["command"].split("--scorers ")[1].split()[0].split(",")
  summary = payload["summary"]
  assert [s["scorers"] for s in summary] == ["all", "all but knn"]
  for s in summary:
    assert set(s) == _SUMMARY
    assert s["ratio"] == pytest.approx(s["large_peak_mb"] / s["small_peak_mb"])
    assert s["within_goal"] == (s["ratio"] <= 1 + fit_memory.GOAL)
  assert payload["settings"]["sizes"] == [40, 80] and payload["settings"]["goal"] == 0.15
  assert "loadavg" in payload["environment"]


def test_markdown_has_both_tables(result):
  _, folder = result
  text = (folder / "fit_memory.md").read_text()
  assert text.startswith("# Peak memory of python -m line_jax.fit")
  assert "| all | 40 |" in text and "| all but knn |" in text


def test_a_failing_fit_is_an_error(tmp_path):
  with pytest.raises(RuntimeError, match="exited with"):
    fit_memory.measure_fit(str(tmp_path / "missing"), str(tmp_path / "out"), poll_s=0.1)


def test_runs_without_a_scorer_drop_its_hyperparameters():
  args = ["--hparam", "knn.k=5", "--hparam=vim.dim=4", "--batch-size", "64",
          "--hparam", "knnx.k=1"]
  assert fit_memory._drop_hparams(args, ("knn", "vim")) == [  # pylint: disable=protected-access
      "--batch-size", "64", "--hparam", "knnx.k=1"]
