"""OpenOOD v1.5's protocol on a small OpenOOD-layout folder written here.

The folder is OpenOOD's layout (`benchmark_imglist/cifar10/*.txt` beside the
image folders its lines name), filled with Fashion-MNIST images as ID data
(read by the committed Fashion-MNIST network) and the embedded OOD sets as
OOD data, so that the list parsing, the rule for absent files, the split
sizes, the validation-only selection and the metrics are tested without
`../shared` (`test_openood_real.py` runs the real files).
"""

import json
import os
import shutil

import numpy as np
import PIL.Image
import pytest

from line_jax import data
from line_jax import evaluate
from line_jax import features
from line_jax import models
from line_jax import suites
from line_jax.runs import openood
from line_jax.runs import Runtime

PROTOCOL = suites.OPENOOD["openood_cifar10"]
CHECKPOINT = models.DEFAULT_CHECKPOINT
SCORERS = ("energy", "line", "react", "knn")
SIZES = {"train_cifar10": 240, "val_cifar10": 60, "test_cifar10": 100, "test_tin": 70,
         "val_tin": 50, "test_mnist": 40, "test_texture": 30}
MISSING_MNIST = 25  # test_mnist lists these too, absent (as MNIST's train entries are).


def _write_set(root, folder, images, labels, list_name, missing=0):
  lines = []
  os.makedirs(os.path.join(root, folder), exist_ok=True)
  for i, (image, label) in enumerate(zip(images, labels)):
    rel = f"{folder}/{i:05d}.png"
    PIL.Image.fromarray(np.asarray(image).squeeze()).save(os.path.join(root, rel))
    lines.append(f"{rel} {label}")
  lines += [f"{folder}/gone_{j}.png -1" for j in range(missing)]
  lists = os.path.join(root, "benchmark_imglist", "cifar10")
  os.makedirs(lists, exist_ok=True)
  with open(os.path.join(lists, f"{list_name}.txt"), "w") as f:
    f.write("\n".join(lines) + "\n")


def build_layout(root, *, tin_seed=0):
  """A small OpenOOD-layout folder: every ID and validation list, near TIN,
  far MNIST (in part) and Textures, CIFAR-100 listed with no file, no SVHN
  or Places365 list at all."""
  train_x, train_y = data.read_fashion_mnist("train")
  test_x, test_y = data.read_fashion_mnist("test")
  n = SIZES
  _write_set(root, "cifar10/train", train_x[:n["train_cifar10"]],
             train_y[:n["train_cifar10"]], "train_cifar10")
  _write_set(root, "cifar10/val", test_x[:n["val_cifar10"]], test_y[:n["val_cifar10"]],
             "val_cifar10")
  _write_set(root, "cifar10/test", test_x[500:500 + n["test_cifar10"]],
             test_y[500:500 + n["test_cifar10"]], "test_cifar10")
  _write_set(root, "tin/test", data.ood_set("letters", n["test_tin"], tin_seed),
             [-1] * n["test_tin"], "test_tin")
  _write_set(root, "tin/val", data.validation_ood(n["val_tin"]), [-1] * n["val_tin"],
             "val_tin")
  _write_set(root, "mnist/test", data.ood_set("digits", n["test_mnist"], 0),
             [-1] * n["test_mnist"], "test_mnist", missing=MISSING_MNIST)
  _write_set(root, "texture", data.ood_set("textures", n["test_texture"], 0),
             [-1] * n["test_texture"], "test_texture")
  with open(os.path.join(root, "benchmark_imglist", "cifar10", "test_cifar100.txt"), "w") as f:
    f.write("cifar100/test/apple/0001.png -1\ncifar100/test/apple/0002.png -1\n")
  return root


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
  return str(build_layout(tmp_path_factory.mktemp("openood")))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("openood_cache"))


def _config(layout, **kw):
  kw = {"plots": False, "scorers": SCORERS, **kw}
  return openood.Config(layout, checkpoint=CHECKPOINT, partial_sets=True, batch_size=64, **kw)


@pytest.fixture(scope="module")
def spied_run(layout, cache_dir, tmp_path_factory):
  """One protocol run, recording what the selection was given."""
  seen = []
  real = openood.tune.tune_method
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(openood.tune, "tune_method", lambda name, fx, fy, k, b, vi, vo, **kw: (
        seen.append((name, np.array(fx), np.array(vi), np.array(vo))),
        real(name, fx, fy, k, b, vi, vo, **kw))[1])
    out = tmp_path_factory.mktemp("openood_out")
    result = openood.run(_config(layout, plots=True), out,
                         runtime=Runtime(cache_dir=cache_dir, progress=False))
  return result, seen, out


# ---- image lists --------------------------------------------------------------


def test_read_image_list_parses_openood_lines(tmp_path):
  path = tmp_path / "list.txt"
  path.write_text("a/b.png 3\n\nx/y.jpg -1 {\"extra\": 1}\n")
  paths, labels = data.read_image_list(path)
  assert paths == ["a/b.png", "x/y.jpg"] and list(labels) == [3, -1]
  # The path ends at the first space, as in OpenOOD's ImglistDataset.
  path.write_text("a.png 3\nb c.png 4\n")
  with pytest.raises(ValueError, match=r"list.txt:2: expected '<path> <integer label>'"):
    data.read_image_list(path)
  path.write_text("only_a_path.png\n")
  with pytest.raises(ValueError, match=r":1:"):
    data.read_image_list(path)
  path.write_text("\n\n")
  with pytest.raises(ValueError, match="lists no image"):
    data.read_image_list(path)


def test_read_image_list_labels_exactly(tmp_path):
  path = tmp_path / "list.txt"
  path.write_text("a.png 3\nb.png -1\nc.png 12\n")
  paths, labels = data.read_image_list(path)
  assert paths == ["a.png", "b.png", "c.png"]
  np.testing.assert_array_equal(labels, [3, -1, 12])
  assert labels.dtype == np.int32


def test_image_list_source_counts_what_is_missing(layout):
  path = PROTOCOL.list_path(layout, "test_mnist")
  with pytest.raises(FileNotFoundError, match=f"{MISSING_MNIST} of "
                     f"{SIZES['test_mnist'] + MISSING_MNIST} listed images are absent"):
    data.ImageListSource(path, layout)
  source = data.ImageListSource(path, layout, allow_missing=True)
  assert (len(source), source.listed) == (SIZES["test_mnist"],
                                          SIZES["test_mnist"] + MISSING_MNIST)
  assert len(source.missing) == MISSING_MNIST and source.missing[0] == "mnist/test/gone_0.png"
  image, label = source[3]
  assert image == os.path.join(layout, "mnist/test/00003.png") and label == -1


# ---- the rule for absent files ------------------------------------------------


def test_sets_split_sizes_groups_and_absent_sets(layout):
  found = suites.openood_sets(PROTOCOL, layout, partial=True)
  sizes = {name: len(s) for name, s in found.sources.items()}
  assert sizes == {"train": 240, "val_id": 60, "id": 100, "tin": 70, "mnist": 40,
                   "texture": 30, "val_ood:tin": 50}
  assert list(found.sources) == ["train", "val_id", "id", "tin", "mnist", "texture",
                                 "val_ood:tin"]
  assert {n: c.group for n, c in found.coverage.items()} == {
      "train": "train", "val_id": "val", "id": "test", "tin": "near", "mnist": "far",
      "texture": "far", "val_ood:tin": "val_ood"}
  assert found.coverage["mnist"].describe("mnist") == (
      "mnist: 40 of 65 listed images (test_mnist.txt)")
  assert found.absent["cifar100"] == "all 2 listed images absent (test_cifar100.txt)"
  assert found.absent["svhn"].startswith("no list ") and "places365" in found.absent


def test_a_set_absent_in_part_is_refused_with_its_count(layout):
  with pytest.raises(FileNotFoundError, match=r"--partial-sets.*\n  - mnist: 40 of 65 listed"):
    suites.openood_sets(PROTOCOL, layout)


def test_id_and_validation_lists_cannot_be_skipped(tmp_path, layout):
  root = tmp_path / "copy"
  shutil.copytree(layout, root)
  os.remove(root / "benchmark_imglist" / "cifar10" / "val_tin.txt")
  shutil.rmtree(root / "cifar10" / "val")
  with pytest.raises(FileNotFoundError, match=r"val_id: all 60 listed images absent.*\n"
                     r"  - val_ood:tin: no list"):
    suites.openood_sets(PROTOCOL, root, partial=True)
  with pytest.raises(FileNotFoundError, match="no benchmark_imglist/cifar10/"):
    suites.openood_sets(PROTOCOL, tmp_path / "nothing_here")


def test_the_network_is_named_and_checked(layout):
  with pytest.raises(ValueError, match="--torch-checkpoint PATH .* or --checkpoint"):
    suites.openood_backbone(PROTOCOL)
  with pytest.raises(ValueError, match="describe a --torch-checkpoint"):
    suites.openood_backbone(PROTOCOL, checkpoint=CHECKPOINT, arch="densenet100")
  backbone, settings = suites.openood_backbone(PROTOCOL, checkpoint=CHECKPOINT)
  assert settings == "none" and backbone.num_classes == 10
  assert PROTOCOL.settings_of("densenet100") == "cifar10"
  assert PROTOCOL.normalization_of("densenet100") == "cifar_line"
  assert PROTOCOL.normalization_of("resnet18_cifar") == "cifar10"


# ---- the run ------------------------------------------------------------------


def _features(layout, list_name):
  """Features of a list through the network, independently of the run."""
  backbone = features.Backbone.from_checkpoint(CHECKPOINT)
  source = data.ImageListSource(PROTOCOL.list_path(layout, list_name), layout,
                                allow_missing=True)
  images = np.stack([backbone.preprocess(source[i])[0] for i in range(len(source))])
  logits, feats = features.extract(backbone.model, backbone.variables, images,
                                   mean=backbone.mean, std=backbone.std, batch_size=64,
                                   progress=False)
  return np.asarray(logits, np.float64), np.asarray(feats)


def _auroc(pos, neg):
  """P(ID score > OOD score) + half the ties: the Mann-Whitney definition."""
  pos, neg = np.asarray(pos)[:, None], np.asarray(neg)[None, :]
  return float(np.mean(pos > neg) + 0.5 * np.mean(pos == neg))


def _fpr95(pos, neg):
  """OOD fraction at or above the largest threshold that keeps >= 95 % of ID."""
  candidates = np.sort(pos)[::-1]
  threshold = candidates[int(np.ceil(0.95 * len(pos))) - 1]
  return float(np.mean(neg >= threshold))


def test_metrics_match_an_independent_computation(spied_run, layout):
  result, _, _ = spied_run
  logits = {name: _features(layout, stem)[0] for name, stem in
            (("id", "test_cifar10"), ("tin", "test_tin"), ("mnist", "test_mnist"),
             ("texture", "test_texture"))}
  energy = {k: np.log(np.exp(v).sum(axis=1)) for k, v in logits.items()}
  rows = result["methods"]["energy"]
  for name in ("tin", "mnist", "texture"):
    assert rows[name]["auroc"] == pytest.approx(_auroc(energy["id"], energy[name]), abs=1e-6)
    assert rows[name]["fpr95"] == pytest.approx(_fpr95(energy["id"], energy[name]), abs=1e-6)
  assert rows["near"] == rows["tin"]  # The only near set present.
  for metric in ("auroc", "fpr95", "aupr_in", "aupr_out"):
    assert rows["far"][metric] == pytest.approx(
        (rows["mnist"][metric] + rows["texture"][metric]) / 2, abs=1e-12)
  labels = data.read_image_list(PROTOCOL.list_path(layout, "test_cifar10"))[1]
  assert result["id_accuracy"] == pytest.approx(
      np.mean(np.argmax(logits["id"], axis=1) == labels), abs=1e-12)


def test_outputs_say_what_was_read(spied_run):
  result, _, out = spied_run
  assert result["sets"]["mnist"] == {"list": "test_mnist.txt", "listed": 65, "used": 40,
                                     "group": "far"}
  assert set(result["absent"]) == {"cifar100", "svhn", "places365"}
  written = json.loads((out / "metrics.json").read_text())
  assert written["sets"] == result["sets"] and written["absent"] == result["absent"]
  assert set(written["methods"]["line"]) == {"tin", "mnist", "texture", "near", "far"}
  assert set(written["tuned"]) == {"line", "react", "knn"}  # Energy has no grid.
  table = (out / "table.md").read_text()
  assert "mnist: 40 of 65 listed images (test_mnist.txt)" in table
  assert "cifar100: skipped, all 2 listed images absent" in table
  assert "| line (tuned) |" in table and "| energy |" in table
  assert {"near_far.png", "roc.png", "timings.json"} <= {p.name for p in out.iterdir()}
  stages = json.loads((out / "timings.json").read_text())["stages"]
  assert {"features_s", "untuned_fit_and_score_s", "tuning_s", "tuned_fit_and_score_s",
          "total_s"} <= set(stages)


def test_selection_sees_validation_features_only(spied_run, layout):
  result, seen, _ = spied_run
  assert [name for name, *_ in seen] == ["line", "react", "knn"]
  val_id = _features(layout, "val_cifar10")[1]
  val_ood = _features(layout, "val_tin")[1]
  train = _features(layout, "train_cifar10")[1]
  test_rows = np.concatenate([_features(layout, stem)[1] for stem in (
      "test_cifar10", "test_tin", "test_mnist", "test_texture")])
  for _, fit_x, given_id, given_ood in seen:
    np.testing.assert_allclose(given_id, val_id, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(given_ood, val_ood, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fit_x, train, rtol=1e-5, atol=1e-5)
    given = np.concatenate([given_id, given_ood, fit_x])
    # No test row among them (the nearest test row is far from every given one).
    distance = np.min(np.abs(given[:, None, :] - test_rows[None, :, :]).max(-1), axis=0)
    assert distance.min() > 1e-3
  for record in result["selection"].values():
    assert record["selected_on"] == {"id": "val_cifar10.txt", "ood": ["val_tin.txt"],
                                     "metric": "auroc", "fitted_on": "train_cifar10.txt"}


def test_changing_a_test_set_changes_no_selection(spied_run, tmp_path, cache_dir):
  result, _, _ = spied_run
  other = build_layout(tmp_path / "other_tin", tin_seed=7)  # Other near-OOD test images.
  again = openood.run(_config(str(other)), None,
                      runtime=Runtime(cache_dir=cache_dir, progress=False))
  assert again["methods"]["line"]["tin"] != result["methods"]["line"]["tin"]
  assert {n: s["hparams"] for n, s in again["selection"].items()} == {
      n: s["hparams"] for n, s in result["selection"].items()}


def test_a_validation_image_in_a_test_list_is_refused(tmp_path, layout):
  root = tmp_path / "leaky"
  shutil.copytree(layout, root)
  lists = root / "benchmark_imglist" / "cifar10"
  leaked = (lists / "test_tin.txt").read_text().splitlines()[0]
  with open(lists / "val_tin.txt", "a") as f:
    f.write(leaked + "\n")
  with pytest.raises(ValueError, match="in the validation set val_ood:tin and in the test "
                     "set tin"):
    suites.openood_sets(PROTOCOL, root, partial=True)
  # Without the search no validation list is read, so none is required.
  os.remove(lists / "val_tin.txt")
  found = suites.openood_sets(PROTOCOL, root, partial=True, validation=False)
  assert "val_id" not in found.sources and not found.validation()


def test_pinned_hparams_stay_out_of_the_search(layout, cache_dir):
  result = openood.run(_config(layout, scorers=("react", "energy"),
                               hparams={"react": {"percentile": 50.0}}), None,
                       runtime=Runtime(cache_dir=cache_dir, progress=False))
  assert result["hparams"]["untuned"]["react"]["percentile"] == 50.0
  assert result["hparams"]["tuned"]["react"]["percentile"] == 50.0
  assert result["selection"]["react"]["pinned"] == ["percentile"]
  assert result["selection"]["react"]["grid_size"] == 1
  grid = openood.search_grid("line", {"p_w": 90.0, "p_a": 90.0, "clip": 1.0}, ["p_w"])
  assert grid["p_w"] == [90.0] and len(grid["p_a"]) > 1 and len(grid["clip"]) > 1


def test_bad_runs_are_refused_before_any_image_is_read(layout, tmp_path, monkeypatch):
  def no_reading(*args, **kwargs):
    raise AssertionError("an image was read")

  monkeypatch.setattr(openood, "read_sets", no_reading)
  with pytest.raises(ValueError, match="--ablation is LINe's"):
    openood.run(_config(layout, scorers=("energy",), ablation=True))
  mine = tmp_path / "mine.npy"
  np.save(mine, data.ood_set("faces", 8, 0))
  for name, match in (("val_ood:x", "use letters"), ("tin", "already taken"),
                      ("near", "already taken")):
    with pytest.raises(ValueError, match=f"--near name {name!r}: " if ":" in name else match):
      openood.run(_config(layout, near=(f"{name}={mine}",)))
  root = tmp_path / "no_ood"
  shutil.copytree(layout, root)
  for folder in ("tin/test", "mnist", "texture"):
    shutil.rmtree(root / folder)
  with pytest.raises(FileNotFoundError, match="no near- or far-OOD set"):
    openood.run(_config(str(root)))
  lists = root / "benchmark_imglist" / "cifar10"
  (lists / "train_cifar10.txt").write_text("cifar10/train/00000.png 10\n")
  with pytest.raises(ValueError, match=r"train_cifar10.txt: label 10 .* not a class in \[0, 10\)"):
    openood.run(_config(str(root), near=(f"faces={mine}",)))


def test_without_a_grid_scorer_there_is_no_tuned_row(layout, cache_dir, tmp_path):
  result = openood.run(_config(layout, scorers=("energy", "msp")), tmp_path / "out",
                       runtime=Runtime(cache_dir=cache_dir, progress=False))
  assert result["selection"] == {} and "tuned" not in result
  table = (tmp_path / "out" / "table.md").read_text()
  assert "| msp |" in table and "(tuned)" not in table


def test_skipped_images_are_not_counted_as_read(layout, tmp_path, cache_dir):
  root = tmp_path / "broken"
  shutil.copytree(layout, root)
  (root / "texture" / "00003.png").write_bytes(b"not an image")
  result = openood.run(_config(str(root), scorers=("energy",), skip_bad_images=True), None,
                       runtime=Runtime(cache_dir=cache_dir, progress=False))
  assert result["sets"]["texture"]["used"] == SIZES["test_texture"] - 1
  assert result["sets"]["texture"]["skipped"] == 1
  assert result["skipped"]["texture"][0]["index"] == 3


def test_cli_partial_sets_extra_sets_and_refusals(layout, tmp_path, capsys):
  base = ["--benchmark", "openood_cifar10", "--data-dir", layout, "--checkpoint", CHECKPOINT,
          "--scorers", "energy,react", "--no-plots", "--batch-size", "64"]
  with pytest.raises(SystemExit) as e:
    evaluate.main([*base, "--out", str(tmp_path / "a")])
  assert e.value.code == 2
  assert "mnist: 40 of 65 listed images" in capsys.readouterr().err
  mine = tmp_path / "mine.npy"
  np.save(mine, data.ood_set("faces", 30, 0))
  evaluate.main([*base, "--out", str(tmp_path / "b"), "--partial-sets", "--quiet",
                 "--far", f"faces={mine}", "--no-tune"])
  err = capsys.readouterr().err
  assert "mnist: 40 of 65 listed images (test_mnist.txt)" in err  # Said even --quiet.
  result = json.loads((tmp_path / "b" / "metrics.json").read_text())
  assert result["sets"]["faces"] == {"path": str(mine), "used": 30, "group": "far"}
  assert result["groups"]["far"] == {"sets": ["mnist", "texture"], "absent": ["svhn", "places365"],
                                     "yours": ["faces"]}
  assert "tuned" not in result and "faces" in result["methods"]["react"]
  react = result["methods"]["react"]
  # "far" is OpenOOD's average (its sets only); "far_all" takes yours in too.
  assert react["far"]["auroc"] == pytest.approx(np.mean([react[s]["auroc"]
                                                         for s in ("mnist", "texture")]))
  assert react["far_all"]["auroc"] == pytest.approx(np.mean(
      [react[s]["auroc"] for s in ("mnist", "texture", "faces")]))
  table = (tmp_path / "b" / "table.md").read_text()
  assert "| faces (yours) |" in table and "**far** (2 of 4)" in table
  assert "far, with yours" in table
  with pytest.raises(SystemExit) as e:
    evaluate.main([*base, "--out", str(tmp_path / "c"), "--partial-sets",
                   "--torch-checkpoint", "x.pth"])
  assert e.value.code == 2 and "one of them" in capsys.readouterr().err


@pytest.mark.slow
def test_two_processes_equal_one(layout, tmp_path):
  """Each process extracts its shard of every list; the fits merge, the
  selection sees every process's validation rows, process 0 writes."""
  import socket
  import subprocess
  import sys
  import time

  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  args = ["-m", "line_jax.evaluate", "--benchmark", "openood_cifar10", "--data-dir", layout,
          "--checkpoint", CHECKPOINT, "--partial-sets", "--scorers", "energy,line,knn",
          "--batch-size", "16", "--no-plots", "--quiet", "--no-cache"]
  subprocess.run([sys.executable, *args, "--out", str(tmp_path / "one")], cwd=repo, env=env,
                 check=True, timeout=300, capture_output=True)
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  procs = [subprocess.Popen(
      ["timeout", "-s", "KILL", "300", sys.executable, *args, "--out", str(tmp_path / "pair"),
       "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(pid)],
      cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for pid in (0, 1)]
  deadline = time.monotonic() + 300
  while any(p.poll() is None for p in procs):
    if any(p.poll() not in (None, 0) for p in procs) or time.monotonic() > deadline:
      for p in procs:
        if p.poll() is None:
          p.kill()
    time.sleep(0.2)
  for p in procs:
    assert p.returncode == 0, p.stdout.read()[-3000:]
  want = json.loads((tmp_path / "one" / "metrics.json").read_text())
  got = json.loads((tmp_path / "pair" / "metrics.json").read_text())
  assert got["id_accuracy"] == want["id_accuracy"] and got["sets"] == want["sets"]
  assert {n: s["hparams"] for n, s in got["selection"].items()} == {
      n: s["hparams"] for n, s in want["selection"].items()}
  for kind in ("methods", "tuned"):
    for method, rows in want[kind].items():
      for name, metrics in rows.items():
        for metric, value in metrics.items():
          assert abs(got[kind][method][name][metric] - value) <= 1e-6, (kind, method, name)


def test_a_set_too_small_for_some_process_is_refused_on_every_process(monkeypatch):
  import jax
  from line_jax.runs import _shared

  source = data.ArraySource(np.zeros((30, 4, 4), np.uint8))
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  for index in (0, 1):  # Process 1's shard is whole, and it raises all the same.
    monkeypatch.setattr(jax, "process_index", lambda index=index: index)
    with pytest.raises(ValueError, match="leaves process 0 no batch of 32"):
      _shared.own_shard(source, 32)
  assert len(_shared.own_shard(source, 16)) == 14  # Process 1's: the last 14 rows.


def test_a_list_has_one_cache_key_however_its_folder_is_spelled(layout, monkeypatch):
  from line_jax.features import cache

  monkeypatch.chdir(os.path.dirname(layout))
  relative = os.path.basename(layout)
  keys = {cache.key("b", data.ImageListSource(PROTOCOL.list_path(root, "test_tin"), root))
          for root in (layout, relative, os.path.join(".", relative))}
  assert len(keys) == 1
  other = data.ImageListSource(PROTOCOL.list_path(layout, "val_tin"), layout)
  assert cache.key("b", other) not in keys
