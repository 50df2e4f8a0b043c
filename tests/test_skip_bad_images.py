"""`--skip-bad-images` in every CLI, and class names checked against the checkpoint's.

A folder holding an image that cannot be decoded stops each run, naming the
file and the flag; with the flag the run leaves it out, says so (stderr and
its JSON), and computes what it computes over the folder without it. A
checkpoint that records its classes (`train` writes them) refuses a folder
of other classes before any image is read.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest

from line_jax import evaluate
from line_jax import fit
from line_jax import models
from line_jax import resumable
from line_jax import runs
from line_jax import train as train_cli
from line_jax import tune
from line_jax.models import get_model
from line_jax.runs import train as train_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ("a", "b", "c")
SCORERS = "react,knn,mahalanobis"  # ReAct reads the rows twice: the second pass from disk.
# The pipeline warns about each image it skips as it goes; the runs' own report is tested.
pytestmark = pytest.mark.filterwarnings("ignore:skipped an image that cannot be decoded")


def _checkpoint(path, classes=CLASSES):
  """A 4-wide resnet_small at random, 28x28 gray, that records `classes` (None: none)."""
  model = get_model("resnet_small", 3, num_filters=4)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  config = {"model": "resnet_small", "num_classes": 3, "input_shape": [28, 28, 1],
            "model_kwargs": {"num_filters": 4}, "mean": [0.5], "std": [0.25]}
  if classes is not None:
    config["classes"] = list(classes)
  models.save_checkpoint(path, variables, config)
  return str(path)


def _folder(root, good, bad=()):
  """PNGs at the relative paths `good` (each its own pixels), text files named
  as images at `bad`."""
  for name in good:
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    seed = zlib.crc32(name.encode())  # The same pixels for the same name, in any folder.
    pixels = np.random.default_rng(seed).integers(0, 256, (28, 28), dtype=np.uint8)
    PIL.Image.fromarray(pixels).save(root / name)
  for name in bad:
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    (root / name).write_text("not an image")
  return str(root)


GOOD = [f"{c}/{i}.png" for c in CLASSES for i in range(4)]
# Last, in batches of 4: records 12-16, a batch of bad images only, then one more.
TRAILING = ["c/x.png", "c/y0.png", "c/y1.png", "c/y2.png", "c/y3.png"]
# Inside: records 4-7 (a whole batch of 4) and 10.
INSIDE = ["a/4.png", "a/5.png", "a/6.png", "a/7.png", "b/1x.png"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  return _checkpoint(tmp_path_factory.mktemp("ckpt") / "model")


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
  root = tmp_path_factory.mktemp("sets")
  return {"clean": _folder(root / "clean", GOOD),
          "trailing": _folder(root / "trailing", GOOD, TRAILING),
          "inside": _folder(root / "inside", GOOD, INSIDE)}


def _leaves(state):
  return [(str(np.asarray(x).dtype), np.asarray(x).shape, np.asarray(x).tobytes())
          for x in jax.tree.leaves(state)]


def _exit_2(capsys, main, argv):
  with pytest.raises(SystemExit) as e:
    main(argv)
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and err.count("\n") == 1, err
  return err


def _fit_args(dataset, ckpt, out, *more):
  return ["--out", str(out), "--dataset", dataset, "--checkpoint", ckpt, "--scorers", SCORERS,
          "--batch-size", "4", "--save-every", "1", "--quiet", *more]


# ---- fit --------------------------------------------------------------------


def test_fit_skipping_equals_a_fit_without_the_bad_files(ckpt, sets, tmp_path, capsys):
  cache = ["--cache-dir", str(tmp_path / "cache")]
  err = _exit_2(capsys, fit.main, _fit_args(sets["trailing"], ckpt, tmp_path / "strict"))
  assert f"cannot decode image file {sets['trailing']}/c/x.png" in err
  assert "--skip-bad-images" in err
  fit.main(_fit_args(sets["clean"], ckpt, tmp_path / "clean", "--no-cache"))
  capsys.readouterr()
  fit.main(_fit_args(sets["trailing"], ckpt, tmp_path / "skip", *cache, "--skip-bad-images"))
  err = capsys.readouterr().err
  paths = [os.path.join(sets["trailing"], name) for name in TRAILING]
  assert err.startswith("skipped 5 images that cannot be decoded (--skip-bad-images):\n")
  assert all(f"train: cannot decode image file {p}:" in err for p in paths), err
  skipped = json.loads((tmp_path / "skip" / runs.fit.SKIPPED_FILE).read_text())
  assert [(r["index"], r["path"]) for r in skipped] == list(zip(range(12, 17), paths))
  assert json.loads((tmp_path / "skip" / runs.fit.ARGS_FILE).read_text())["skip_bad_images"]
  # The same rows in the same batches: the same bits, two trailing empty steps or not.
  for name in SCORERS.split(","):
    assert _leaves(runs.fit.load_state(tmp_path / "skip", name)) == _leaves(
        runs.fit.load_state(tmp_path / "clean", name)), name
  for kind in ("features.npy", "labels.npy"):  # Cut to the rows kept: no trailing zeros.
    np.testing.assert_array_equal(np.load(tmp_path / "skip" / kind),
                                  np.load(tmp_path / "clean" / kind))
  # The cache entry lists them too, and a run reading it back says so again.
  (entry,) = (tmp_path / "cache").glob("*.json")
  meta = json.loads(entry.read_text())
  assert meta["images"] == 12 and [s[1] for s in meta["skipped"]] == paths
  fit.main(_fit_args(sets["trailing"], ckpt, tmp_path / "again", *cache, "--skip-bad-images"))
  assert capsys.readouterr().err.startswith("skipped 5 images")
  assert (tmp_path / "again" / runs.fit.CACHED_DIR).is_dir()  # Read back: no network ran.
  for name in SCORERS.split(","):
    assert _leaves(runs.fit.load_state(tmp_path / "again", name)) == _leaves(
        runs.fit.load_state(tmp_path / "clean", name)), name
  # Without the flag the entry with images missing is not read: the run stops at the file.
  err = _exit_2(capsys, fit.main, _fit_args(sets["trailing"], ckpt, tmp_path / "strict", *cache))
  assert f"cannot decode image file {paths[0]}" in err
  assert len(list((tmp_path / "cache").glob("*.json"))) == 1


def test_a_fit_interrupted_and_resumed_reports_every_skipped_image(ckpt, sets, tmp_path,
                                                                   capsys, monkeypatch):
  args = _fit_args(sets["inside"], ckpt, tmp_path / "run", "--no-cache", "--skip-bad-images")
  fit.main(_fit_args(sets["inside"], ckpt, tmp_path / "whole", "--no-cache",
                     "--skip-bad-images"))
  save = resumable._Progress.save  # pylint: disable=protected-access

  def save_then_stop(self, index, *rest):
    save(self, index, *rest)
    if index == 2:  # After the batch of bad images only (step 2, empty).
      raise KeyboardInterrupt

  monkeypatch.setattr(resumable._Progress, "save",  # pylint: disable=protected-access
                      save_then_stop)
  with pytest.raises(SystemExit) as e:
    fit.main(args)
  assert e.value.code == 130
  monkeypatch.undo()
  capsys.readouterr()
  with pytest.warns(UserWarning) as warned:
    fit.main(args)
  # The resumed run read from record 8 on: only b/1x.png was met again ...
  again = [str(w.message) for w in warned if "skipped an image" in str(w.message)]
  assert len(again) == 1 and "b/1x.png" in again[0], again
  # ... and still reports the four it skipped before the interruption.
  paths = [os.path.join(sets["inside"], name) for name in INSIDE]
  skipped = json.loads((tmp_path / "run" / runs.fit.SKIPPED_FILE).read_text())
  assert [(r["index"], r["path"]) for r in skipped] == list(zip((4, 5, 6, 7, 10), paths))
  assert capsys.readouterr().err.startswith("skipped 5 images")
  assert json.loads((tmp_path / "whole" / runs.fit.SKIPPED_FILE).read_text()) == skipped
  for name in SCORERS.split(","):
    assert _leaves(runs.fit.load_state(tmp_path / "run", name)) == _leaves(
        runs.fit.load_state(tmp_path / "whole", name)), name
  assert np.load(tmp_path / "run" / "features.npy").shape == (12, 16)


# ---- evaluate ---------------------------------------------------------------


@pytest.fixture(scope="module")
def benchmark(tmp_path_factory):
  """ID train/ and test/ folders and a flat OOD folder, clean and with bad files."""
  root = tmp_path_factory.mktemp("benchmark")
  id_good = [f"train/{name}" for name in GOOD] + [f"test/{c}/{i}.png" for c in CLASSES
                                                  for i in range(2)]
  ood_good = [f"{i}.png" for i in range(6)]
  return {"clean": (_folder(root / "id", id_good), _folder(root / "ood", ood_good)),
          "bad": (_folder(root / "id_bad", id_good, ["train/a/1x.png", "test/b/0x.png"]),
                  _folder(root / "ood_bad", ood_good, ["2x.png"]))}


def _evaluate_args(ckpt, folders, out, *more):
  id_folder, ood = folders
  return ["--out", str(out), "--checkpoint", ckpt, "--id-folder", id_folder,
          "--extra-ood", f"mine={ood}", "--methods", "energy,react,knn", "--ood-size", "8",
          "--batch-size", "4", "--no-plots", "--quiet", *more]


def test_evaluate_skipping_equals_an_evaluation_without_the_bad_files(ckpt, benchmark,
                                                                     tmp_path, capsys):
  err = _exit_2(capsys, evaluate.main, _evaluate_args(ckpt, benchmark["bad"], tmp_path / "o"))
  assert "train/a/1x.png" in err and "--skip-bad-images" in err
  evaluate.main(_evaluate_args(ckpt, benchmark["clean"], tmp_path / "clean"))
  capsys.readouterr()
  evaluate.main(_evaluate_args(ckpt, benchmark["bad"], tmp_path / "skip", "--skip-bad-images"))
  err = capsys.readouterr().err
  id_folder, ood = benchmark["bad"]
  paths = {"train": os.path.join(id_folder, "train", "a", "1x.png"),
           "id": os.path.join(id_folder, "test", "b", "0x.png"),
           "mine": os.path.join(ood, "2x.png")}
  assert err.startswith("skipped 3 images that cannot be decoded")
  assert all(f"{name}: cannot decode image file {path}" in err for name, path in paths.items())
  want = json.loads((tmp_path / "clean" / "metrics.json").read_text())
  got = json.loads((tmp_path / "skip" / "metrics.json").read_text())
  assert "skipped" not in want
  got_skipped = {name: [(r["index"], r["path"]) for r in records]
                 for name, records in got.pop("skipped").items()}
  assert got_skipped == {"train": [(2, paths["train"])], "id": [(3, paths["id"])],
                         "mine": [(3, paths["mine"])]}
  assert got == want  # Accuracy, every metric, the hyperparameters: the same numbers.


# ---- tune -------------------------------------------------------------------


def _tune_args(dataset, ckpt, out, *more):
  return ["--dataset", dataset, "--checkpoint", ckpt, "--methods", "react,line", "--val-size",
          "3", "--ood-size", "8", "--no-check", "--batch-size", "4", "--quiet", "--out",
          str(out), *more]


def test_tune_skipping_equals_tuning_without_the_bad_files(ckpt, sets, tmp_path, capsys):
  err = _exit_2(capsys, tune.main, _tune_args(sets["inside"], ckpt, tmp_path / "t.json"))
  assert "a/4.png" in err and "--skip-bad-images" in err
  tune.main(_tune_args(sets["clean"], ckpt, tmp_path / "clean.json"))
  capsys.readouterr()
  tune.main(_tune_args(sets["inside"], ckpt, tmp_path / "skip.json", "--skip-bad-images"))
  err = capsys.readouterr().err
  assert err.startswith("skipped 5 images") and "b/1x.png" in err
  want = json.loads((tmp_path / "clean.json").read_text())
  got = json.loads((tmp_path / "skip.json").read_text())
  paths = [os.path.join(sets["inside"], name) for name in INSIDE]
  for name, result in got.items():
    records = result.pop("skipped_images")
    assert [(r["index"], r["path"]) for r in records] == list(zip((4, 5, 6, 7, 10), paths))
    # The hold-out is taken over the images kept: the same rows as the clean folder's.
    for key in ("best", "best_percentiles", "metrics", "grid", "grid_size", "skipped"):
      assert result[key] == want[name][key], (name, key)


# ---- train ------------------------------------------------------------------


def _train_args(dataset, out, *more):
  return ["--out", str(out), "--dataset", dataset, "--epochs", "1", "--batch-size", "4",
          "--seed", "3", "--workers", "0", "--quiet", *more]


def test_train_stops_at_a_bad_first_image_naming_it_and_the_flag(tmp_path, capsys):
  # Its channels are read before the pipeline runs: one line too, not a traceback.
  folder = _folder(tmp_path / "data", GOOD[1:], GOOD[:1])
  err = _exit_2(capsys, train_cli.main, _train_args(folder, tmp_path / "out"))
  assert f"cannot decode image file {os.path.join(folder, GOOD[0])}" in err
  assert "--skip-bad-images" in err and not (tmp_path / "out").exists()


def test_train_skipping_equals_training_without_the_bad_files(tmp_path, sets, narrow, capsys):
  # The first record bad too: the channels come from the first image that opens.
  folder = tmp_path / "data"
  shutil.copytree(sets["inside"], folder)
  (folder / "a" / "0.png").write_text("not an image")
  clean = tmp_path / "clean"
  shutil.copytree(sets["clean"], clean)
  os.remove(clean / "a" / "0.png")
  train_cli.main(_train_args(str(clean), tmp_path / "want"))
  capsys.readouterr()
  train_cli.main(_train_args(str(folder), tmp_path / "got", "--skip-bad-images"))
  err = capsys.readouterr().err
  assert err.startswith("skipped 6 images that cannot be decoded") and "a/0.png" in err
  _, want, want_config = models.load_checkpoint(tmp_path / "want")
  _, got, config = models.load_checkpoint(tmp_path / "got")
  assert _leaves(got) == _leaves(want)
  assert config["classes"] == want_config["classes"] == list(CLASSES)
  assert config["skip_bad_images"] and not want_config["skip_bad_images"]
  records = config["skipped_images"]["train"]
  assert [r["path"] for r in records] == [str(folder / n) for n in ("a/0.png", *INSIDE)]
  assert "skipped_images" not in want_config


# ---- class names ------------------------------------------------------------


def test_a_checkpoint_train_wrote_refuses_a_folder_of_other_classes(tmp_path, sets, narrow,
                                                                    capsys):
  train_cli.main(_train_args(sets["clean"], tmp_path / "model"))
  assert models.read_checkpoint_config(tmp_path / "model")["classes"] == list(CLASSES)
  other = _folder(tmp_path / "other", [f"{c}/0.png" for c in ("a", "b", "d")])
  err = _exit_2(capsys, fit.main, _fit_args(other, str(tmp_path / "model"), tmp_path / "out"))
  assert f"the classes of {other} (3) do not match those of the checkpoint" in err
  assert "but not in" in err and "['c']" in err and "['d']" in err
  assert not (tmp_path / "out").exists()  # Refused before anything was claimed or read.


@pytest.mark.parametrize("cli", ["fit", "tune", "evaluate"])
def test_a_folder_whose_classes_differ_from_the_checkpoints_is_refused(cli, tmp_path, capsys,
                                                                       benchmark):
  ckpt = _checkpoint(tmp_path / "model", ("a", "c", "b"))  # Another order.
  id_folder, ood = benchmark["clean"]
  cache = tmp_path / "cache"
  argv = {"fit": (fit.main, _fit_args(os.path.join(id_folder, "train"), ckpt, tmp_path / "o")),
          "tune": (tune.main, _tune_args(os.path.join(id_folder, "train"), ckpt,
                                         tmp_path / "t.json")),
          "evaluate": (evaluate.main, _evaluate_args(ckpt, (id_folder, ood), tmp_path / "o"))}
  main, args = argv[cli]
  err = _exit_2(capsys, main, [*args, "--cache-dir", str(cache)])
  assert "do not match those of the checkpoint" in err and ckpt in err
  assert "label 1 is 'b' here but 'c' in the checkpoint" in err, err
  assert not cache.exists() or not os.listdir(cache)  # No image was read.


def test_classes_in_a_checkpoint_config_must_be_one_name_per_class(tmp_path):
  with pytest.raises(ValueError, match=r"'classes' must list 3 distinct class names"):
    _checkpoint(tmp_path / "two", ("a", "b"))
  path = _checkpoint(tmp_path / "ok")
  config = json.loads((tmp_path / "ok" / "config.json").read_text())
  (tmp_path / "ok" / "config.json").write_text(json.dumps({**config, "classes": "abc"}))
  with pytest.raises(ValueError, match=r"config.json: 'classes' must list 3"):
    models.read_checkpoint_config(path)


# ---- the row files ----------------------------------------------------------


def test_a_set_of_bad_images_only_is_an_error_naming_it(ckpt, tmp_path):
  from line_jax import data
  from line_jax import features
  source = data.ImageFolderSource(_folder(tmp_path / "bad", [], ["0.png", "1.png", "2.png"]))
  backbone = features.Backbone.from_checkpoint(ckpt)
  with pytest.raises(ValueError, match="gave no image: all 3 were skipped as undecodable"):
    backbone.read(source, cache_dir=tmp_path / "cache", skip_bad_images=True)
  assert not list((tmp_path / "cache").glob("*.json"))  # No entry of an empty set.


def test_cut_rows_keeps_the_first_rows_in_place(tmp_path):
  path = str(tmp_path / "x.npy")
  rows = np.arange(1000 * 7, dtype=np.float32).reshape(1000, 7)
  np.save(path, rows)
  resumable.cut_rows(path, 3)
  np.testing.assert_array_equal(np.load(path), rows[:3])
  assert os.path.getsize(path) == 128 + 3 * 7 * 4  # The header keeps its length.
  np.save(path, np.arange(5, dtype=np.int32))
  resumable.cut_rows(path, 0)
  assert np.load(path).shape == (0,)


# ---- two processes ----------------------------------------------------------


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow  # Three runs in subprocesses.
def test_two_processes_skip_their_own_images_and_write_the_one_process_states(ckpt, sets,
                                                                              tmp_path):
  # Process 0 reads records [0, 8): a good batch, then one of bad images only
  # (an empty step); process 1 reads [8, 17), with one bad image.
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  args = _fit_args(sets["inside"], ckpt, "OUT", "--no-cache", "--skip-bad-images")

  def argv(out):
    return [sys.executable, "-m", "line_jax.fit", *[str(out) if a == "OUT" else a for a in args]]

  subprocess.run(["timeout", "-k", "10", "200", *argv(tmp_path / "one")], cwd=REPO, env=env,
                 check=True, capture_output=True)
  port = _free_port()
  procs = [subprocess.Popen(
      ["timeout", "-k", "10", "200", *argv(tmp_path / "pair"), "--coordinator",
       f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(pid)],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for pid in (0, 1)]
  deadline = time.monotonic() + 220
  while any(p.poll() is None for p in procs):
    if any(p.poll() not in (None, 0) for p in procs) or time.monotonic() > deadline:
      for p in procs:  # One failed or the pair hung: the other would wait forever.
        if p.poll() is None:
          p.send_signal(signal.SIGKILL)
    time.sleep(0.2)
  logs = [p.stdout.read() for p in procs]
  assert [p.returncode for p in procs] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
  one = json.loads((tmp_path / "one" / runs.fit.SKIPPED_FILE).read_text())
  assert json.loads((tmp_path / "pair" / runs.fit.SKIPPED_FILE).read_text()) == one
  assert [r["index"] for r in one] == [4, 5, 6, 7, 10]
  assert "skipped 5 images" in logs[0] and "skipped 5 images" not in logs[1]  # Said once.
  assert np.load(tmp_path / "pair" / "features.p0.npy").shape == (4, 16)
  for name in SCORERS.split(","):
    pair, single = runs.fit.load_state(tmp_path / "pair", name), runs.fit.load_state(
        tmp_path / "one", name)
    for x, y in zip(jax.tree.leaves(pair), jax.tree.leaves(single)):
      x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
      assert x.shape == y.shape and np.max(np.abs(x - y)) <= 1e-6 * max(np.max(np.abs(y)), 1)
