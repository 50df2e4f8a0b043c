"""fit, tune and evaluate read a PyTorch state_dict (`--torch-checkpoint PATH
--arch NAME`) as they read the same weights saved as a line_jax checkpoint
(`--checkpoint`, `Backbone.save`): the same states, results and scores, bit for
bit; a network named wrongly is one `error:` line (exit 2) before any work.
"""

import csv
import json
import os

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from line_jax import data
from line_jax import evaluate
from line_jax import fit
from line_jax import runs
from line_jax import tune
from line_jax.features import Backbone
from line_jax.models import get_model

torch = pytest.importorskip("torch")

CLASSES = ("a", "b", "c")
# Scorers with and without fitted statistics, one of two passes (ReAct).
SCORERS = "energy,knn,line,mahalanobis,react"
# Flax leaf -> PyTorch suffix (BatchNorm's scale is torch's weight).
SUFFIX = {("params", "kernel"): "weight", ("params", "scale"): "weight",
          ("params", "bias"): "bias", ("batch_stats", "mean"): "running_mean",
          ("batch_stats", "var"): "running_var"}


def _state_dict(variables) -> dict:
  """A PyTorch state_dict of Flax `variables`, written independently of the
  import: `layer1_0/bn1` is `layer1.0.bn1`, conv HWIO -> OIHW, dense transposed."""
  out = {}
  for (collection, *modules, leaf), value in flax.traverse_util.flatten_dict(variables).items():
    key = ".".join([m.replace("_", ".") for m in modules] + [SUFFIX[collection, leaf]])
    value = np.asarray(value, np.float32)
    value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
    out[key] = torch.from_numpy(value.copy())  # A writable, C-ordered copy.
  return out


def _torch_file(path, num_classes, seed=0):
  """A resnet_small of `num_classes` at random, running statistics too, saved by torch."""
  model = get_model("resnet_small", num_classes)
  variables = model.init(jax.random.key(seed), jnp.zeros((1, 28, 28, 1)))
  rng = np.random.default_rng(seed)
  # Running statistics other than init's (0 and 1), so that they must be read right.
  stats = flax.traverse_util.unflatten_dict({
      path: (rng.uniform(0.5, 1.5, v.shape) if path[-1] == "var" else
             rng.normal(0.0, 0.1, v.shape)).astype(np.float32)
      for path, v in flax.traverse_util.flatten_dict(variables["batch_stats"]).items()})
  variables = {**variables, "batch_stats": stats}
  torch.save(_state_dict(variables), path)
  return str(path), variables


def _images(folder, names, size=28, seed=0):
  rng = np.random.default_rng(seed)
  for name in names:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(path)
  return str(folder)


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
  """The same 3-class weights as a PyTorch file and as a line_jax checkpoint."""
  tmp = tmp_path_factory.mktemp("nets")
  pth, variables = _torch_file(tmp / "small.pth", len(CLASSES))
  Backbone.from_torch(pth, "resnet_small").save(tmp / "ck")
  # The checkpoint holds the weights the file was made of: the import read them all.
  saved = Backbone.from_checkpoint(tmp / "ck").variables
  assert jax.tree.structure(saved) == jax.tree.structure(variables)
  jax.tree.map(np.testing.assert_array_equal, saved, variables)
  return pth, str(tmp / "ck")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """`train/` and `test/` of 3 class folders of 28x28 PNGs."""
  root = tmp_path_factory.mktemp("set")
  _images(root, [f"train/{c}/{i}.png" for c in CLASSES for i in range(8)], seed=1)
  _images(root, [f"test/{c}/{i}.png" for c in CLASSES for i in range(4)], seed=2)
  return str(root)


def _network(kind, nets):
  pth, ck = nets
  return ["--checkpoint", ck] if kind == "checkpoint" else [
      "--torch-checkpoint", pth, "--arch", "resnet_small"]


def _leaves(state):
  return type(state).__name__, [(np.asarray(x).dtype, np.asarray(x).tobytes())
                                for x in jax.tree.leaves(state)]


def test_fit_of_a_torch_file_equals_fit_of_its_checkpoint(nets, folder, tmp_path):
  outs = {}
  for kind in ("torch", "checkpoint"):
    outs[kind] = tmp_path / kind
    fit.main(["--out", str(outs[kind]), "--dataset", os.path.join(folder, "train"),
              *_network(kind, nets), "--scorers", SCORERS, "--hparam", "knn.k=3",
              "--batch-size", "8", "--no-cache", "--quiet"])
  for name in SCORERS.split(","):
    got = runs.fit.load_state(outs["torch"], name)
    assert _leaves(got) == _leaves(runs.fit.load_state(outs["checkpoint"], name)), name
  records = {k: json.loads((out / runs.fit.ARGS_FILE).read_text()) for k, out in outs.items()}
  assert records["torch"]["network"] == {"torch_checkpoint": nets[0], "arch": "resnet_small",
                                        "normalization": "fashion_mnist"}  # its default, named
  assert records["torch"]["checkpoint"] is None
  # A line_jax checkpoint's record is what it was before networks: old runs resume.
  assert set(records["checkpoint"]) == {"checkpoint", "dataset", "scorers", "benchmark",
                                        "hparams", "batch_size", "save_every", "max_examples"}
  assert records["checkpoint"]["checkpoint"] == nets[1]
  # Run again with the same flags: the finished run is taken again, not refused.
  fit.main(["--out", str(outs["torch"]), "--dataset", os.path.join(folder, "train"),
            *_network("torch", nets), "--scorers", SCORERS, "--hparam", "knn.k=3",
            "--batch-size", "8", "--no-cache", "--quiet"])
  assert _leaves(runs.fit.load_state(outs["torch"], "line")) == _leaves(
      runs.fit.load_state(outs["checkpoint"], "line"))


def test_a_checkpoint_given_either_way_has_the_record_it_had(nets):
  _, ck = nets
  old = runs.fit.Config(checkpoint=ck, dataset="fashion_mnist").resolved()
  new = runs.fit.Config(network=runs.Network(checkpoint=ck), dataset="fashion_mnist").resolved()
  assert old == new and old.network is None
  assert old.record() == new.record() and "network" not in old.record()
  assert runs.fit.Config().resolved().record()["benchmark"] == "fashion_mnist"


def test_tune_of_a_torch_file_equals_tune_of_its_checkpoint(nets, folder, tmp_path):
  results = {}
  for kind in ("torch", "checkpoint"):
    out = tmp_path / f"{kind}.json"
    tune.main(["--dataset", os.path.join(folder, "train"), *_network(kind, nets),
               "--methods", "react,ash_b", "--val-size", "6", "--ood-size", "16", "--no-check",
               "--batch-size", "8", "--no-cache", "--quiet", "--out", str(out)])
    results[kind] = json.loads(out.read_text())
  for name in ("react", "ash_b"):
    for key in ("best", "metrics", "grid"):
      assert results["torch"][name][key] == results["checkpoint"][name][key], (name, key)


def _read_csv(path):
  with open(path, newline="") as f:
    rows = list(csv.DictReader(f))
  return {k: [r[k] for r in rows] for k in rows[0]}


def test_evaluate_of_a_torch_file_equals_evaluate_of_its_checkpoint(nets, folder, tmp_path):
  for kind in ("torch", "checkpoint"):
    evaluate.main(["--out", str(tmp_path / kind), "--id-folder", folder,
                   *_network(kind, nets), "--methods", "energy,knn", "--hparam", "knn.k=3",
                   "--max-test", "9", "--ood-size", "16", "--batch-size", "8", "--no-plots",
                   "--no-cache", "--quiet"])
  for name in ("metrics.json", "thresholds.json"):
    assert (tmp_path / "torch" / name).read_text() == (tmp_path / "checkpoint" / name).read_text()
  sets = sorted(os.listdir(tmp_path / "torch" / "scores"))
  assert "id.csv" in sets and len(sets) == 8  # ID test and the 7 embedded OOD sets.
  for name in sets:
    assert (tmp_path / "torch" / "scores" / name).read_bytes() == (
        tmp_path / "checkpoint" / "scores" / name).read_bytes()
  # --max-test 9 of 12: each row names its image, by index in the test folder and its file.
  test = data.ImageFolderSource(os.path.join(folder, "test"), flat=False)
  subset = data.subset_of(test, 9)
  table = _read_csv(tmp_path / "torch" / "scores" / "id.csv")
  assert table["index"] == [str(i) for i in subset.indices]
  assert table["path"] == [test.paths[i] for i in subset.indices]
  assert table["label"] == [str(test.labels[i]) for i in subset.indices]


def test_a_paper_benchmark_reads_your_network_with_arch_and_its_own_without(tmp_path, nets,
                                                                            capsys):
  pth, _ = _torch_file(tmp_path / "ten.pth", 10, seed=3)
  Backbone.from_torch(pth, "resnet_small").save(tmp_path / "ck")
  cifar = _images(tmp_path / "cifar", [f"{split}/{c}/0.png" for split in ("train", "test")
                                       for c in "abcdefghij"], size=32)
  common = ["--benchmark", "cifar10", "--id-folder", cifar, "--methods", "energy",
            "--ood-size", "4", "--batch-size", "8", "--no-plots", "--no-cache", "--quiet"]
  evaluate.main(["--out", str(tmp_path / "torch"), *common, "--torch-checkpoint", pth,
                 "--arch", "resnet_small"])
  evaluate.main(["--out", str(tmp_path / "checkpoint"), *common, "--checkpoint",
                 str(tmp_path / "ck")])
  capsys.readouterr()
  got = json.loads((tmp_path / "torch" / "metrics.json").read_text())
  assert got == json.loads((tmp_path / "checkpoint" / "metrics.json").read_text())
  assert got["settings"] == "cifar10"
  # Without --arch, --torch-checkpoint is the benchmark's own network (DenseNet-BC-100).
  with pytest.raises(SystemExit) as e:
    evaluate.main(["--out", str(tmp_path / "own"), *common, "--torch-checkpoint", pth])
  err = capsys.readouterr().err
  assert e.value.code == 2 and "DenseNet" in err and len(err.splitlines()) == 1
  # Yours must have the benchmark's classes.
  with pytest.raises(SystemExit) as e:
    evaluate.main(["--out", str(tmp_path / "three"), *common, *_network("torch", nets)])
  err = capsys.readouterr().err
  assert e.value.code == 2 and len(err.splitlines()) == 1
  assert "the network has 3 classes; benchmark 'cifar10' has 10" in err


def _fit_args(nets, folder, out):
  return ["--out", str(out), "--dataset", os.path.join(folder, "train"), "--quiet"]


def _tune_args(nets, folder, out):
  return ["--dataset", os.path.join(folder, "train"), "--out", str(out), "--quiet"]


def _evaluate_args(nets, folder, out):
  return ["--out", str(out), "--id-folder", folder, "--quiet"]


@pytest.mark.parametrize("cli", ["fit", "tune", "evaluate"])
@pytest.mark.parametrize("flags, message", [
    (["--torch-checkpoint", "{pth}"], "--torch-checkpoint needs --arch NAME, the network it "
                                      "holds: densenet100, resnet101"),
    (["--torch-checkpoint", "{pth}", "--arch", "nope"], "argument --arch: invalid choice: "
                                                        "'nope'"),
    (["--checkpoint", "{ck}", "--torch-checkpoint", "{pth}", "--arch", "resnet_small"],
     "give --checkpoint or --torch-checkpoint, not both"),
    (["--arch", "resnet_small"], "--arch and --normalization describe a --torch-checkpoint"),
    (["--normalization", "cifar10"], "--arch and --normalization describe a --torch-checkpoint"),
    (["--torch-checkpoint", "{pth}.absent", "--arch", "resnet_small"], ".absent: no such file"),
], ids=["no-arch", "unknown-arch", "both", "arch-alone", "normalization-alone", "no-file"])
def test_a_network_named_wrongly_is_one_error_line_before_any_work(cli, flags, message, nets,
                                                                   folder, tmp_path, capsys,
                                                                   monkeypatch):
  def no_work(*args, **kwargs):
    raise AssertionError("a network was loaded")

  monkeypatch.setattr(Backbone, "from_torch", no_work)
  monkeypatch.setattr(Backbone, "from_checkpoint", no_work)
  main, args = {"fit": (fit.main, _fit_args), "tune": (tune.main, _tune_args),
                "evaluate": (evaluate.main, _evaluate_args)}[cli]
  out = tmp_path / "out"
  flags = [f.format(pth=nets[0], ck=nets[1]) for f in flags]
  with pytest.raises(SystemExit) as e:
    main([*args(nets, folder, out), *flags])
  err = capsys.readouterr().err
  assert e.value.code == 2 and err.startswith("error: ") and len(err.splitlines()) == 1, err
  assert message in err, err
  assert not out.exists()
