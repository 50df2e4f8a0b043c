"""benchmarks.input_pipeline on a tiny folder: its pieces, not its timings."""

import json

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("matplotlib")

# pylint: disable=wrong-import-position
from benchmarks import input_pipeline as bench  # noqa: E402
from line_jax import data  # noqa: E402


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  return bench.make_jpeg_folder(tmp_path_factory.mktemp("bench"), 12, size=(30, 40), classes=3)


def test_made_folder_has_classes_and_both_orientations(folder):
  source = data.ImageFolderSource(folder)
  assert source.classes == ("class_0", "class_1", "class_2") and len(source) == 12
  shapes = {data.Preprocess()(source[i])[0].shape for i in range(len(source))}
  assert shapes == {(30, 40, 3), (40, 30, 3)}


@pytest.mark.parametrize("setting", sorted(bench.SETTINGS))
def test_torch_side_transform_gives_the_pipelines_pixels(folder, setting):
  # The comparison is fair only if both sides compute the same images.
  pre = bench.SETTINGS[setting]
  source = data.ImageFolderSource(folder)
  for path, record in zip(source.paths, source):
    want = pre(record)[0]
    got = bench.torchvision_transform(path, pre)
    np.testing.assert_array_equal(got.reshape(want.shape), want)


def test_every_path_reads_every_image(folder):
  source = data.ImageFolderSource(folder)
  pre = data.Preprocess(8, 10, 1)
  assert bench.run_line_jax(source, pre, workers=2, batch_size=5) == 12
  assert bench.run_torch(source, pre, workers=0, batch_size=5) == 12
  assert bench.run_old(source, pre) == 12
  net = bench.load_checkpoint()
  assert bench.run_features(source, bench.SETTINGS["28 px gray"], workers=2, batch_size=5,
                            net=net) == 12


def test_measure_table_and_chart(folder, tmp_path):
  cases = [{"path": "line_jax", "workers": 2, "folder": "f", "setting": "s", "batch": 4,
            "run": lambda: 10},
           {"path": "torch DataLoader", "workers": 2, "folder": "f", "setting": "s", "batch": 4,
            "run": lambda: 10}]
  records = bench.measure(cases, rounds=2)
  assert [len(r["rates"]) for r in records] == [2, 2]
  assert all(r["images"] == 10 and r["images_per_s"] > 0 for r in records)
  json.dumps(records)  # What the result file holds.
  text = bench.table(records)
  assert text.count("\n") == 3 and "x |" in text.splitlines()[2]
  assert all(r["cpu_ms_per_image"] >= 0 for r in records)
  bench.chart(records, str(tmp_path / "c.png"), "title")
  assert (tmp_path / "c.png").stat().st_size > 0
