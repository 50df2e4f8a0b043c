"""line_jax.evaluate end to end on a tiny random network and random images."""

import csv
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from line_jax import evaluate
from line_jax import features
from line_jax import metrics
from line_jax import runs
from line_jax import scorers
from line_jax import suites
from line_jax.models import get_model

MEAN, STD = (0.286,), (0.353,)
QUIET = runs.Runtime(progress=False)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# A few methods keep the test fast; every registered one runs in the default CLI.
METHODS = ("energy", "react", "ash_s", "knn", "line")


def _arrays():
  rng = np.random.default_rng(0)
  model = get_model("resnet_small", 10, num_filters=4)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))

  def images(n, high=256):
    return rng.integers(0, high, (n, 28, 28, 1), dtype=np.uint8)

  return dict(model=model, variables=variables, mean=MEAN, std=STD, train_images=images(120),
              train_labels=np.arange(120) % 10, test_images=images(50),
              test_labels=np.arange(50) % 10,
              ood={"dark": images(30, 60), "noise": images(20)})


def _inputs(**kw):
  return suites.Inputs.from_arrays(**_arrays(), **kw)


def _inputs_of(arrays, **kw):
  return suites.Inputs.from_arrays(**arrays, **kw)


def _evaluate(out=None, *, inputs=None, scorers=(), plots=True, runtime=QUIET, **data):
  """`runs.evaluate.run` of the benchmark `BenchmarkData(**data)` (default: Fashion-MNIST)."""
  config = runs.evaluate.Config(runs.BenchmarkData(**data), tuple(scorers), plots=plots)
  return runs.evaluate.run(config, out, inputs=inputs, runtime=runtime)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  out, extra_dir = tmp_path_factory.mktemp("eval"), tmp_path_factory.mktemp("extra")
  extra = np.random.default_rng(1).integers(0, 256, (25, 28, 28), dtype=np.uint8)
  np.save(extra_dir / "mine.npy", extra)
  arrays = _arrays()
  # This tiny network is shaped like the embedded one: it takes that benchmark's settings.
  result = _evaluate(out, inputs=suites.Inputs.from_arrays(**arrays, settings="fashion_mnist"),
                     extra_ood=(f"mine={extra_dir / 'mine.npy'}",), scorers=METHODS,
                     batch_size=32)
  return out, result, arrays, extra


def test_metrics_json_schema(run):
  out, result, _, _ = run
  with open(out / "metrics.json") as f:
    saved = json.load(f)
  assert saved == result
  assert set(saved) == {"id_accuracy", "settings", "hparams", "methods"}
  assert saved["settings"] == "fashion_mnist"
  assert saved["hparams"] == json.loads((out / "hparams.json").read_text())
  assert 0.0 <= saved["id_accuracy"] <= 1.0
  assert list(saved["methods"]) == list(METHODS)
  for rows in saved["methods"].values():
    assert list(rows) == ["dark", "noise", "mine", "average"]
    for cell in rows.values():
      assert set(cell) == {"fpr95", "auroc", "aupr_in", "aupr_out"}
      assert all(isinstance(v, float) for v in cell.values())
    for m in runs.evaluate.METRICS:
      assert rows["average"][m] == pytest.approx(np.mean([rows[s][m] for s in ("dark", "noise", "mine")]))


def test_metrics_equal_metrics_evaluate_on_the_scores(run):
  _, result, arrays, extra = run
  kw = dict(mean=MEAN, std=STD, batch_size=32, progress=False)
  model, variables = arrays["model"], arrays["variables"]
  train = features.extract(model, variables, arrays["train_images"], **kw)[1]
  logits, test = features.extract(model, variables, arrays["test_images"], **kw)
  mine = features.extract(model, variables, extra[..., None], **kw)[1]
  head = variables["params"]["fc"]
  suite = suites.get("fashion_mnist")
  for method in ("energy", "line", "knn"):
    scorer = scorers.get(method)
    hp = suites.hparams_for(suite, method, None, train)
    state = scorer.fit(train, arrays["train_labels"], head["kernel"], head["bias"], **hp)
    expected = metrics.ood_metrics(scorer.score(state, test), scorer.score(state, mine))
    for key, value in expected.items():
      assert result["methods"][method]["mine"][key] == pytest.approx(value, abs=1e-6)
  assert result["id_accuracy"] == pytest.approx(np.mean(logits.argmax(1) == arrays["test_labels"]))


def test_line_uses_the_suites_clip(run):
  out, _, _, _ = run
  with open(out / "hparams.json") as f:
    used = json.load(f)
  # The embedded benchmark's validation-selected settings (suites/_catalog.py).
  assert used["line"]["p_w"] == 10.0 and used["line"]["p_a"] == 10.0
  assert isinstance(used["line"]["clip"], float)  # The resolved value: pastes into fit.
  assert set(used["line"]) == {"p_w", "p_a", "clip"}
  assert used["knn"]["k"] == 1 and used["ash_s"]["percentile"] == 50.0


def test_table_layout(run):
  out, result, _, _ = run
  table = (out / "table.md").read_text()
  assert table == runs.evaluate.format_table(result)
  lines = table.splitlines()
  assert lines[2] == "| method | dark | noise | mine | average |"
  assert lines[3] == "|---|---|---|---|---|"
  rows = lines[4:]
  assert [r.split(" | ")[0][2:] for r in rows] == list(METHODS)
  energy = result["methods"]["energy"]["mine"]
  cell = f"{100 * energy['fpr95']:.2f} / {100 * energy['auroc']:.2f}"
  assert rows[0].split(" | ")[3] == cell


def test_pngs_exist_and_are_valid(run):
  out, _, _, _ = run
  names = ["roc.png"] + [f"hist_{m}.png" for m in METHODS]
  for name in names:
    with open(out / name, "rb") as f:
      assert f.read(8) == PNG_MAGIC, name


# ---- Every input's scores and each scorer's threshold ----------------------


def _read_scores(path):
  """`scores/<set>.csv` as `{column: [values]}` (strings), in file order."""
  with open(path, newline="") as f:
    rows = list(csv.reader(f))
  return {name: [row[i] for row in rows[1:]] for i, name in enumerate(rows[0])}


def test_scores_per_input_are_the_scorers_own_on_each_set(run):
  out, _, arrays, extra = run
  kw = dict(mean=MEAN, std=STD, batch_size=32, progress=False)
  model, variables = arrays["model"], arrays["variables"]
  train = features.extract(model, variables, arrays["train_images"], **kw)[1]
  sets = {"id": (arrays["test_images"], arrays["test_labels"]),
          "dark": (arrays["ood"]["dark"], None), "noise": (arrays["ood"]["noise"], None),
          "mine": (extra[..., None], None)}
  assert sorted(os.listdir(out / "scores")) == sorted(f"{name}.csv" for name in sets)
  head = variables["params"]["fc"]
  for name in ("energy", "knn"):
    scorer = scorers.get(name)
    hp = suites.hparams_for("fashion_mnist", name, None, train)
    state = scorer.fit(train, arrays["train_labels"], head["kernel"], head["bias"], **hp)
    for set_name, (images, labels) in sets.items():
      table = _read_scores(out / "scores" / f"{set_name}.csv")
      assert list(table)[:3] == ["index", "path", "label"]
      assert len(table["index"]) == len(images)  # One row per input, in order.
      assert table["index"] == [str(i) for i in range(len(images))]
      assert set(table["path"]) == {""}  # Pixels: no file.
      want_labels = np.full(len(images), -1) if labels is None else labels
      np.testing.assert_array_equal(np.asarray(table["label"], int), want_labels)
      want = scorer.score_all(state, features.extract(model, variables, images, **kw)[1])
      np.testing.assert_array_equal(np.asarray(table[name], float), want)
      # 50 ID test inputs are too few for a threshold at 95 % TPR: no decision.
      assert set(table[f"{name}_ood"]) == {""}
  # Every metric is recomputed from the files alone (docs/scores.md).
  result = json.loads((out / "metrics.json").read_text())
  ids = np.asarray(_read_scores(out / "scores" / "id.csv")["line"], float)
  for set_name in ("dark", "noise", "mine"):
    ood = np.asarray(_read_scores(out / "scores" / f"{set_name}.csv")["line"], float)
    assert metrics.ood_metrics(ids, ood) == result["methods"]["line"][set_name]
  thresholds = json.loads((out / "thresholds.json").read_text())
  assert list(thresholds) == list(METHODS)
  assert all("too few" in t["refused"] for t in thresholds.values())


def test_thresholds_keep_95_percent_of_the_id_scores_and_decide_each_input(tmp_path):
  arrays = _arrays()
  rng = np.random.default_rng(2)
  arrays["test_images"] = rng.integers(0, 256, (230, 28, 28, 1), dtype=np.uint8)
  arrays["test_labels"] = np.arange(230) % 10
  out = tmp_path / "out"
  _evaluate(out, inputs=_inputs_of(arrays), scorers=("energy", "knn"), batch_size=32,
            plots=False)
  thresholds = json.loads((out / "thresholds.json").read_text())
  for name in ("energy", "knn"):
    t = thresholds[name]
    assert t["target"] == "tpr" and t["rate"] == 0.95 and t["count"] == 230
    ids = np.asarray(_read_scores(out / "scores" / "id.csv")[name], float)
    kept = math.ceil(0.95 * ids.size)
    assert kept == 219
    # The 219th highest score: it keeps exactly 219, and more only by its own ties.
    ranked = np.sort(ids)[::-1]
    assert ranked[kept - 1] == t["threshold"]
    assert np.sum(ids >= t["threshold"]) == kept + np.sum(ranked[kept:] == ranked[kept - 1])
    assert t["achieved"] == np.sum(ids >= t["threshold"]) / ids.size
    for set_name in ("id", "dark", "noise"):
      table = _read_scores(out / "scores" / f"{set_name}.csv")
      scores = np.asarray(table[name], float)
      np.testing.assert_array_equal(np.asarray(table[f"{name}_ood"], int),
                                    scores < t["threshold"])


def test_scores_name_each_file_and_leave_out_the_skipped_ones(tmp_path):
  from PIL import Image
  folder = tmp_path / "pngs"
  folder.mkdir()
  rng = np.random.default_rng(0)
  for i in range(7):
    if i == 3:
      (folder / "3.png").write_text("not an image")
    else:
      Image.fromarray(rng.integers(0, 256, (30, 30), dtype=np.uint8)).save(folder / f"{i}.png")
  out = tmp_path / "out"
  with pytest.warns(UserWarning, match="cannot be decoded"):
    _evaluate(out, inputs=_inputs(), extra_ood=(f"pngs={folder}",), skip_bad_images=True,
              scorers=("energy",), batch_size=4, plots=False)
  table = _read_scores(out / "scores" / "pngs.csv")
  kept = [0, 1, 2, 4, 5, 6]
  assert table["index"] == [str(i) for i in kept]
  assert table["path"] == [str(folder / f"{i}.png") for i in kept]
  assert table["label"] == ["-1"] * 6
  skipped = json.loads((out / "metrics.json").read_text())["skipped"]["pngs"]
  assert [(r["index"], r["path"]) for r in skipped] == [(3, str(folder / "3.png"))]


def test_extra_ood_errors(tmp_path):
  inputs = _inputs()
  bad = tmp_path / "bad.npy"
  np.save(bad, np.zeros((3, 28, 28), np.float32))
  with pytest.raises(ValueError, match="uint8"):
    _evaluate(inputs=inputs, extra_ood=(f"x={bad}",))
  wrong = tmp_path / "wrong.npy"
  np.save(wrong, np.zeros((3, 32, 32, 3), np.uint8))
  with pytest.raises(ValueError, match="shape"):
    _evaluate(inputs=inputs, extra_ood=(f"x={wrong}",))
  with pytest.raises(ValueError, match="already taken"):
    _evaluate(inputs=inputs, extra_ood=(f"dark={wrong}",))
  with pytest.raises(ValueError, match="NAME=PATH"):
    _evaluate(inputs=inputs, extra_ood=("nopath",))


def test_cli_rejects_a_missing_file_before_loading(tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    evaluate.main(["--out", str(tmp_path), "--extra-ood", f"x={tmp_path / 'none.npy'}"])
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and "does not exist" in err and len(err.splitlines()) == 1


def test_paper_benchmark_names_what_is_missing(tmp_path):
  with pytest.raises(FileNotFoundError) as e:
    _evaluate(benchmark="cifar10", data_dir=str(tmp_path))
  message = str(e.value)
  assert "--torch-checkpoint" in message
  assert "'cifar10' is not prepared" in message and "--id-folder" in message
  # CIFAR's OOD sets are optional (offline stand-ins); ImageNet's are not.
  assert "lsun_c" not in message
  with pytest.raises(FileNotFoundError) as e:
    _evaluate(benchmark="imagenet", data_dir=str(tmp_path))
  assert "inaturalist" in str(e.value)
  with pytest.raises(FileNotFoundError, match="no test/ folder"):
    (tmp_path / "id" / "train").mkdir(parents=True)
    _evaluate(benchmark="cifar10", id_folder=str(tmp_path / "id"), torch_checkpoint=__file__)


def test_unknown_method():
  with pytest.raises(ValueError, match="unknown scorer"):
    _evaluate(inputs=_inputs(), scorers=["nope"])


def test_timings_and_cache_reuse(tmp_path):
  arrays = _arrays()
  kw = dict(inputs=suites.Inputs.from_arrays(**arrays), scorers=["energy"], batch_size=32,
            runtime=runs.Runtime(cache_dir=str(tmp_path / "cache"), progress=False),
            plots=False)
  first = _evaluate(tmp_path / "a", **kw)
  with open(tmp_path / "a" / "timings.json") as f:
    timing = json.load(f)
  assert set(timing["extraction"]["sets"]) == {"train", "id", "dark", "noise"}
  assert timing["extraction"]["images"] == timing["extraction"]["extracted_now"] == 220
  assert timing["extraction"]["images_per_s"] > 0
  # One entry per set, named by its key: features, labels, and the .json written last.
  entries = sorted((tmp_path / "cache").glob("*.json"))
  assert len(entries) == 4
  for entry in entries:
    key = entry.name[:-len(".json")]
    assert json.loads(entry.read_text())["key"] == key
    assert (tmp_path / "cache" / f"{key}.features.npy").is_file()
    assert (tmp_path / "cache" / f"{key}.labels.npy").is_file()
  # A second run reads the memmaps back: same result, nothing extracted.
  second = _evaluate(tmp_path / "b", **kw)
  assert second == first
  with open(tmp_path / "b" / "timings.json") as f:
    again = json.load(f)["extraction"]
  assert again["extracted_now"] == 0 and all(s["cached"] for s in again["sets"].values())
  # A cached set reports the extraction time of the run that wrote it.
  assert again["sets"]["train"]["seconds"] == pytest.approx(
      timing["extraction"]["sets"]["train"]["seconds"])
  # Other pixels, another key: extracted again.
  arrays["ood"]["dark"] = arrays["ood"]["dark"] + 1
  kw["inputs"] = suites.Inputs.from_arrays(**arrays)
  _evaluate(tmp_path / "c", **kw)
  with open(tmp_path / "c" / "timings.json") as f:
    assert json.load(f)["extraction"]["extracted_now"] == 30


def test_ablation_variants_and_the_energy_equivalence(tmp_path):
  # The ablation reads the features evaluate put in the cache.
  runtime, inputs = runs.Runtime(cache_dir=str(tmp_path / "cache"), progress=False), _inputs()
  out = tmp_path / "out"  # Its own folder: the cache beside it is not an evaluation's file.
  result = _evaluate(out, inputs=inputs, scorers=["energy", "line"], batch_size=32,
                     runtime=runtime)
  runs.ablation.run(runs.ablation.Config(runs.BenchmarkData(batch_size=32)), out,
                    inputs=inputs, runtime=runtime)
  with open(out / "ablation.json") as f:
    table = json.load(f)
  names = list(table["variants"])
  assert names[0] == "energy (none)" and names[-1] == "LINe (all)" and len(names) == 8
  # All parts off is Energy; all on is the evaluated LINe.
  for key, method in (("energy (none)", "energy"), ("LINe (all)", "line")):
    for ood in ("dark", "noise"):
      for m in runs.evaluate.METRICS:
        assert table["variants"][key]["metrics"][ood][m] == pytest.approx(
            result["methods"][method][ood][m], abs=1e-6), (key, ood, m)
  md = (out / "ablation.md").read_text()
  assert "| clip | x |  |  |" in md
  with open(out / "ablation.png", "rb") as f:
    assert f.read(8) == PNG_MAGIC
  # The evaluation's own --ablation: the same table from the same features.
  config = runs.evaluate.Config(runs.BenchmarkData(batch_size=32), ("energy", "line"),
                                plots=False, ablation=True)
  runs.evaluate.run(config, tmp_path / "one", inputs=inputs, runtime=runtime)
  assert json.loads((tmp_path / "one" / "ablation.json").read_text()) == table


def test_svhn_mat_official_selection_and_paper_sets_replace_offline_ones(tmp_path):
  from scipy import io

  from line_jax.suites import load_svhn_mat
  from line_jax.suites import suite_sets

  rng = np.random.default_rng(0)
  n = 60
  labels = rng.integers(1, 11, n)  # The .mat's labels: 1..10, 10 is the digit 0.
  pixels = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
  (tmp_path / "svhn").mkdir()
  io.savemat(tmp_path / "svhn" / "test_32x32.mat", {"X": pixels, "y": labels[:, None]})
  images, got = load_svhn_mat(tmp_path / "svhn" / "test_32x32.mat", per_label=3)
  keep = suites.first_per_label(labels, 3)
  assert np.array_equal(images, np.moveaxis(pixels, 3, 0)[keep])
  assert np.array_equal(got, labels[keep] % 10) and got.max() <= 9
  assert np.all(np.bincount(got, minlength=10) <= 3)
  sets = suite_sets(suites.get("cifar10"), str(tmp_path))
  assert list(sets) == ["svhn"] and len(sets["svhn"]) == n  # < 1,000 of each label: all.
  assert list(suite_sets(suites.get("cifar10"), None, size=5)) == list(
      suites.get("cifar10").offline_ood)


def test_extra_ood_takes_a_folder_of_images(tmp_path):
  """A folder of PNGs and JPEGs of other sizes and colours is an OOD set."""
  from PIL import Image
  folder = tmp_path / "pngs"
  folder.mkdir()
  rng = np.random.default_rng(0)
  for i in range(12):
    pixels = rng.integers(0, 256, (40 + i, 33, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / f"{i:02d}.{'png' if i % 2 else 'jpg'}")
  result = _evaluate(
      tmp_path / "out", scorers=["energy"], extra_ood=(f"pngs={folder}",), max_train=256,
      max_test=64, ood_size=16, batch_size=64, plots=False)
  assert 0.0 <= result["methods"]["energy"]["pngs"]["auroc"] <= 1.0


# ---- Whose hyperparameters: named, recorded, printed once ----------------


def test_own_inputs_take_the_registry_defaults_and_say_so(tmp_path, capsys):
  result = _evaluate(tmp_path / "out", inputs=_inputs(), scorers=("react", "knn", "line"),
                     batch_size=32, plots=False, runtime=runs.Runtime(progress=True))
  assert result["settings"] == suites.NO_BENCHMARK
  used = result["hparams"]
  # Not the Fashion-MNIST suite's settings (ReAct at 80, LINe's clip at the 80th percentile).
  assert used["react"] == {"percentile": 90.0} == scorers.get("react").defaults
  arrays = _arrays()
  train = features.extract(arrays["model"], arrays["variables"], arrays["train_images"],
                           mean=MEAN, std=STD, batch_size=32, progress=False)[1]
  assert used["line"]["clip"] == pytest.approx(np.percentile(train, 90.0), rel=1e-5)
  assert set(used["knn"]) == set(scorers.get("knn").defaults)
  saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
  assert saved["settings"] == "none" and saved["hparams"] == used
  err = capsys.readouterr().err
  assert err.count("hyperparameters: the registry defaults") == 1, err
  assert f"react: percentile={used['react']['percentile']}" in err


def test_your_hparams_go_over_the_settings_the_run_s_over_the_inputs(capsys):
  inputs = _inputs(settings="fashion_mnist",
                   hparams={"knn": {"k": 3}, "react": {"percentile": 70.0}})
  config = runs.evaluate.Config(runs.BenchmarkData(batch_size=32), ("react", "knn", "ash_s"),
                                hparams={"react": {"percentile": 60.0}}, plots=False)
  result = runs.evaluate.run(config, inputs=inputs, runtime=runs.Runtime(progress=True))
  used = result["hparams"]
  assert used["knn"]["k"] == 3 and used["react"] == {"percentile": 60.0}
  assert used["ash_s"] == {"percentile": 50.0}  # The named benchmark's own.
  err = capsys.readouterr().err
  assert "the fashion_mnist benchmark's settings over the registry defaults" in err
  assert "knn: k=3*" in err and "ash_s: percentile=50.0\n" in err


def test_settings_that_contradict_each_other_or_do_not_exist_are_refused():
  with pytest.raises(ValueError, match=r"BenchmarkData\('cifar10'\) with Inputs whose "
                                       "settings are 'none'"):
    _evaluate(inputs=_inputs(), benchmark="cifar10", scorers=("energy",))
  with pytest.raises(ValueError, match="unknown benchmark 'mnist'"):
    _inputs(settings="mnist")
  with pytest.raises(ValueError, match="unknown hyperparameter"):
    _inputs(hparams={"knn": {"kk": 3}})
  with pytest.raises(ValueError, match="unknown scorer"):
    _inputs(hparams={"nope": {}})


# ---- Nothing of the user's is replaced ------------------------------------


def test_an_out_folder_holding_a_users_file_is_refused_before_any_work(tmp_path, monkeypatch):
  def no_work(*args, **kwargs):
    raise AssertionError("features were read before the folder was checked")

  monkeypatch.setattr(runs.evaluate, "benchmark_sets", no_work)
  monkeypatch.setattr(runs.ablation, "features_of", no_work)
  for name in ("notes.txt", "table.md"):  # A name evaluate writes is still the user's file.
    out = tmp_path / name.replace(".", "_")
    out.mkdir()
    (out / name).write_text("mine")
    with pytest.raises(ValueError, match=str(out)) as e:
      _evaluate(out, inputs=_inputs(), scorers=("energy",))
    assert name in str(e.value)
    with pytest.raises(ValueError, match=name):
      runs.ablation.run(runs.ablation.Config(), out, inputs=_inputs())
    assert os.listdir(out) == [name] and (out / name).read_text() == "mine"


def test_a_rerun_over_its_own_folder_replaces_it(tmp_path):
  kw = dict(inputs=_inputs(), scorers=("energy",), batch_size=32,
            runtime=runs.Runtime(cache_dir=str(tmp_path / "cache"), progress=False))
  out = tmp_path / "out"
  _evaluate(out, **kw)
  before = sorted(os.listdir(out))
  assert before == ["hist_energy.png", "hparams.json", "metrics.json", "roc.png", "scores",
                    "table.md", "thresholds.json", "timings.json"]
  assert sorted(os.listdir(out / "scores")) == ["dark.csv", "id.csv", "noise.csv"]
  again = _evaluate(out, **kw)
  assert json.loads((out / "metrics.json").read_text()) == again
  assert sorted(os.listdir(out)) == before  # Replaced in place; no temporary file left.
  assert sorted(os.listdir(out / "scores")) == ["dark.csv", "id.csv", "noise.csv"]


def test_evaluate_cli_names_the_foreign_file(tmp_path, capsys):
  (tmp_path / "notes.txt").write_text("mine")
  with pytest.raises(SystemExit) as e:
    evaluate.main(["--out", str(tmp_path), "--methods", "energy", "--quiet"])
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert err.startswith("error: --out ") and "notes.txt" in err and len(err.splitlines()) == 1
