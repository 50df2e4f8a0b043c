"""`python -m line_jax.fit`: killed with SIGKILL and resumed, bit-identical states."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from line_jax import features
from line_jax import fit
from line_jax import resumable
from line_jax import runs
from line_jax import scorers
from line_jax import suites

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 256 images in 8 batches of 32, a checkpoint after each: many kill points.
ARGS = ["--max-examples", "256", "--batch-size", "32", "--save-every", "1",
        "--hparam", "knn.k=10"]


def state_bytes(state):
  """Every leaf as (name, dtype, shape, bytes), plus the static fields."""
  import dataclasses
  out = {}
  for field in dataclasses.fields(state):
    value = getattr(state, field.name)
    if field.metadata.get("pytree_node", True):
      a = np.asarray(value)
      out[field.name] = (str(a.dtype), a.shape, a.tobytes())
    else:
      out[field.name] = value
  return type(state).__name__, out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  out = tmp_path_factory.mktemp("reference")
  fit.main(["--out", str(out), *ARGS])
  return out


def _start(out, log):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.Popen([sys.executable, "-m", "line_jax.fit", "--out", str(out), *ARGS],
                          cwd=REPO, env=env, stdout=log, stderr=log)


def _saved_steps(out):
  try:
    return [int(n) for n in os.listdir(out / resumable.PROGRESS_DIR) if n.isdigit()]
  except FileNotFoundError:
    return []


def _kill_when(proc, ready, timeout=120):
  deadline = time.monotonic() + timeout
  while not ready():
    assert proc.poll() is None, "the run ended before the kill point"
    assert time.monotonic() < deadline, "kill point never reached"
    time.sleep(0.005)
  proc.send_signal(signal.SIGKILL)
  assert proc.wait() == -signal.SIGKILL


def test_sigkill_at_several_points_then_resume_is_bit_identical(reference, tmp_path):
  out = tmp_path / "run"
  kill_points = [
      # Right after the arguments are claimed: during model load or batch 1.
      lambda: (out / runs.fit.ARGS_FILE).exists(),
      # Mid-stream, with some batches saved.
      lambda: max(_saved_steps(out), default=0) >= 3,
      # After the stream, while the states are being written.
      lambda: (out / "msp" / "state.json").exists(),
  ]
  logs = []
  for i, ready in enumerate(kill_points):
    with open(tmp_path / f"log{i}", "w") as log:
      _kill_when(_start(out, log), ready)
    logs.append((tmp_path / f"log{i}").read_text())
  with open(tmp_path / "final", "w") as log:
    assert _start(out, log).wait(timeout=300) == 0
  final_log = (tmp_path / "final").read_text()

  # The second and third runs resumed from a saved batch, not from zero.
  for text in (logs[2], final_log):
    first = re.search(r"features: (\d+)/256", text)
    assert first and int(first.group(1)) > 0, text[-2000:]
  for name in scorers.names():
    assert state_bytes(runs.fit.load_state(out, name)) == state_bytes(
        runs.fit.load_state(reference, name)), name


def test_states_score_like_a_fresh_in_memory_fit(reference):
  """The streamed states are the scorers' own fits on the same features."""
  config = json.loads((reference / runs.fit.ARGS_FILE).read_text())
  features = np.load(reference / resumable.FEATURES_FILE)
  from line_jax import data
  from line_jax import models
  _, variables, _ = models.load_checkpoint(config["checkpoint"])
  # --max-examples 256: the subset rule's rows (every class in proportion), not the first.
  source = data.fashion_mnist_source("train")
  labels = source.labels[data.subset_indices(source, 256)]
  np.testing.assert_array_equal(np.load(reference / "labels.npy"), labels)
  assert np.bincount(labels).tolist() == [26] * 6 + [25] * 4
  kernel = variables["params"]["fc"]["kernel"]
  bias = variables["params"]["fc"]["bias"]
  assert config["benchmark"] == "fashion_mnist"  # --dataset fashion_mnist's own.
  for name in ("line", "mahalanobis", "react", "vim", "knn"):
    scorer = scorers.get(name)
    hparams = suites.hparams_for("fashion_mnist", name, config["hparams"].get(name))
    want = scorer.score(scorer.fit(features, labels, kernel, bias, **hparams), features[:64])
    got = scorer.score(runs.fit.load_state(reference, name), features[:64])
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_resume_with_other_arguments_is_refused(reference, capsys):
  with pytest.raises(SystemExit) as e:
    fit.main(["--out", str(reference), *ARGS[:2], "--batch-size", "64", *ARGS[4:]])
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert "other arguments" in err and "batch_size: 32 -> 64" in err


def test_missing_state_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match="no fitted state 'line'"):
    runs.fit.load_state(tmp_path, "line")


def test_an_out_folder_holding_a_users_files_is_refused_before_any_work(tmp_path, monkeypatch,
                                                                        capsys):
  def no_work(*args, **kwargs):
    raise AssertionError("the checkpoint was loaded before the folder was checked")

  monkeypatch.setattr(features.Backbone, "from_checkpoint", no_work)
  # A name fit writes (hparams.json) is still the user's file where no args.json of fit's is.
  for name in ("notes.txt", "hparams.json"):
    out = tmp_path / name.replace(".", "_")
    out.mkdir()
    (out / name).write_text("{}")
    with pytest.raises(SystemExit) as e:
      fit.main(["--out", str(out), *ARGS])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --out {out} holds {name}") and len(err.splitlines()) == 1
    assert os.listdir(out) == [name] and (out / name).read_text() == "{}"
  (tmp_path / "file").write_text("mine")
  with pytest.raises(ValueError, match="is a file, not a folder"):
    runs.fit.run(runs.fit.Config(), tmp_path / "file")
  assert (tmp_path / "file").read_text() == "mine"


def test_a_finished_run_runs_again_over_its_own_folder(reference, tmp_path, capsys):
  import shutil
  out = tmp_path / "again"
  shutil.copytree(reference, out)
  fit.main(["--out", str(out), *ARGS])
  err = capsys.readouterr().err  # The settings each scorer ran with, said once.
  assert err.count("hyperparameters: the fashion_mnist benchmark's settings") == 1
  assert "  knn: k=10*" in err
  for name in ("knn", "line"):
    assert state_bytes(runs.fit.load_state(out, name)) == state_bytes(
        runs.fit.load_state(reference, name)), name
  (out / "notes.txt").write_text("mine")  # Then it is no longer line_jax's alone.
  with pytest.raises(SystemExit):
    fit.main(["--out", str(out), *ARGS, "--quiet"])
  assert (out / "notes.txt").read_text() == "mine"


def test_only_the_committed_model_takes_the_fashion_mnist_settings_unasked(tmp_path):
  assert runs.fit.Config().resolved().benchmark == "fashion_mnist"
  # Another network on the same data: the registry defaults, not settings tuned for another model.
  assert runs.fit.Config(checkpoint=str(tmp_path)).resolved().benchmark == "none"
  assert runs.fit.Config(checkpoint=str(tmp_path),
                         benchmark="fashion_mnist").resolved().benchmark == "fashion_mnist"
