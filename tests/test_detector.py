"""The detector: fit, calibrate, decide in one jitted call, save, export, serve.

On the committed Fashion-MNIST network and Debian's Fashion-MNIST images.
Scores are checked against the scorer on features extracted separately;
exports against the in-process detector, in a fresh process that imports no
model or scorer code, at every batch size from 1 to 300.
"""

import json
import os
import subprocess
import sys

import flax.traverse_util
import jax
import numpy as np
import pytest

from line_jax import calibration
from line_jax import data
from line_jax import features
from line_jax import models
from line_jax import scorers
from line_jax.detector import Detector
from line_jax.models import _torch_import

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def backbone():
  return features.Backbone.from_checkpoint(models.DEFAULT_CHECKPOINT)


def _images(split, count):
  source = data.subset_of(data.open_source("fashion_mnist", split), count)
  prep = data.Preprocess(28, None, 1)
  return (np.stack([prep(source[i])[0] for i in range(len(source))]),
          np.asarray(source.labels))


@pytest.fixture(scope="module")
def fmnist(backbone):
  """Training features and labels, and 2,400 test images split in two."""
  train, train_labels = _images("train", 1500)
  _, train_features = features.extract(backbone.model, backbone.variables, train,
                                       mean=backbone.mean, std=backbone.std, progress=False)
  test, test_labels = _images("test", 2400)
  return train_features, train_labels, test, test_labels


@pytest.fixture(scope="module")
def line_detector(backbone, fmnist):
  train_features, train_labels, test, _ = fmnist
  return Detector.fit_features(backbone, train_features, train_labels).calibrate(test[:1200])


def _reference_scores(backbone, state, name, images):
  """The scorer on features extracted by the separate extraction loop."""
  _, feats = features.extract(backbone.model, backbone.variables, images, mean=backbone.mean,
                              std=backbone.std, progress=False)
  return scorers.get(name).score_all(state, feats, nonfinite="nan")


@pytest.mark.parametrize("name", scorers.names())
def test_every_scorer_decides_in_one_call_and_exports(name, backbone, fmnist, tmp_path):
  train_features, train_labels, test, _ = fmnist
  det = Detector.fit_features(backbone, train_features[:600], train_labels[:600],
                              scorer=name).calibrate(test[:400])
  images = test[400:437]  # 37 rows: a padded bucket
  out = det.predict(images)
  want = _reference_scores(backbone, det.state, name, images)
  # Network and scorer are one program compiled with the network's options
  # (`layout.network_jit`), the reference's scorer another: reductions may
  # round apart, and RMDS's difference of two distances magnifies that.
  tol = 1e-4 if name == "rmds" else 2e-5
  np.testing.assert_allclose(out.score, want, rtol=tol, atol=tol * np.std(want))
  np.testing.assert_array_equal(out.is_ood, ~(out.score >= det.threshold))
  det.export(tmp_path / "det")  # lowered for cpu, cuda and tpu; run here on the cpu
  from line_jax import export  # pylint: disable=g-import-not-at-top
  exported = export.load(tmp_path / "det")(images)
  # The export runs one network pass and batch-major logits: float32 agreement.
  np.testing.assert_allclose(exported.score, out.score, rtol=1e-4,
                             atol=1e-4 * max(1.0, float(np.std(out.score))))
  np.testing.assert_array_equal(exported.pred, out.pred)
  close = np.abs(out.score - det.threshold) < 1e-4 * max(1.0, abs(det.threshold))
  np.testing.assert_array_equal(exported.is_ood[~close], out.is_ood[~close])


def test_predict_gives_the_classifiers_own_class(line_detector, backbone, fmnist):
  _, _, test, labels = fmnist
  out = line_detector.predict(test[1200:])
  logits, _ = features.extract(backbone.model, backbone.variables, test[1200:],
                               mean=backbone.mean, std=backbone.std, progress=False)
  np.testing.assert_array_equal(out.pred, logits.argmax(1))
  assert np.mean(out.pred == labels[1200:]) > 0.85
  assert out.score.dtype == np.float32 and out.is_ood.dtype == bool


def test_a_detector_is_a_pytree_that_decides_inside_your_jit(line_detector, fmnist):
  _, _, test, _ = fmnist
  leaves = jax.tree.leaves(line_detector)
  assert len(leaves) == (len(jax.tree.leaves(line_detector.backbone.variables))
                         + len(jax.tree.leaves(line_detector.state)))
  placed = jax.device_put(line_detector)
  assert placed.calibration == line_detector.calibration and placed.scorer == "line"
  decided = jax.jit(lambda det, x: det.decide(x))(placed, test[:64])
  want = line_detector.predict(test[:64])
  np.testing.assert_allclose(np.asarray(decided.score), want.score, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(decided.pred), want.pred)
  doubled = jax.tree.map(lambda x: x, line_detector)  # unflattened: a working Detector
  for a, b in zip(doubled.predict(test[:8]), line_detector.predict(test[:8])):
    np.testing.assert_array_equal(a, b)


def test_calibrated_tpr_holds_on_fresh_id_images(line_detector, fmnist):
  _, _, test, _ = fmnist
  cal = line_detector.calibration
  assert cal.count == 1200 and cal.target == "tpr"
  kept = np.mean(~line_detector.predict(test[1200:]).is_ood)
  low, high = cal.interval
  assert low <= kept <= high, (kept, cal)


def test_calibration_at_an_fpr_on_validation_ood(backbone, fmnist):
  train_features, train_labels, test, _ = fmnist
  det = Detector.fit_features(backbone, train_features, train_labels)
  noise = np.random.default_rng(0).integers(0, 256, (400, 28, 28, 1), dtype=np.uint8)
  det = det.calibrate(test[:600], ood_images=noise, fpr=0.05)
  ood_scores = det.scores(noise)
  assert np.mean(ood_scores >= det.threshold) <= 0.05
  assert det.calibration.tpr == pytest.approx(np.mean(det.scores(test[:600]) >= det.threshold))


def test_a_stream_of_batch_sizes_compiles_a_handful_of_times(line_detector, fmnist):
  _, _, test, _ = fmnist
  compiled = []

  def listener(event, duration, **kwargs):
    del duration, kwargs
    if event == "/jax/core/compile/backend_compile_duration":
      compiled.append(event)

  sizes = list(range(1, 70))
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    outs = [line_detector.predict(test[:n]) for n in sizes]
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert [len(o.score) for o in outs] == sizes
  assert len(compiled) <= 9, len(compiled)  # buckets 1, 2, 4, 8, 16, 32, 64, 128
  np.testing.assert_allclose(outs[0].score, outs[-1].score[:1], rtol=1e-5)


def test_predict_refuses_before_calibration_and_bad_images(backbone, fmnist):
  train_features, train_labels, test, _ = fmnist
  det = Detector.fit_features(backbone, train_features, train_labels)
  with pytest.raises(ValueError, match="no threshold"):
    det.predict(test[:4])
  with pytest.raises(ValueError, match="calibrate the detector before exporting"):
    det.export("unused")
  cal = det.calibrate(test[:400])
  with pytest.raises(ValueError, match=r"\[n, 28, 28, 1\]"):
    cal.predict(np.zeros((2, 32, 32, 1), np.uint8))
  with pytest.raises(ValueError, match="uint8"):
    cal.predict(test[:2].astype(np.float32))
  with pytest.raises(ValueError, match="too few"):
    det.calibrate(test[:100])


def test_save_and_load_give_the_same_decisions(line_detector, fmnist, tmp_path):
  _, _, test, _ = fmnist
  line_detector.save(tmp_path / "saved")
  again = Detector.load(tmp_path / "saved")
  assert again.calibration == line_detector.calibration
  want, got = line_detector.predict(test[:50]), again.predict(test[:50])
  for a, b in zip(want, got):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="already exists"):
    line_detector.save(tmp_path / "saved")


def test_a_network_of_your_own_exports_but_does_not_save(fmnist, tmp_path):
  _, _, test, _ = fmnist
  backbone = _tiny_backbone()
  _, feats = features.extract(backbone.model, backbone.variables, test[:600], mean=(0.5,),
                              std=(0.5,), progress=False)
  det = Detector.fit_features(backbone, feats, np.arange(600) % 10).calibrate(test[600:1000])
  with pytest.raises(ValueError, match="not a registered line_jax model"):
    det.save(tmp_path / "saved")
  det.export(tmp_path / "exp", platforms=("cpu",))
  from line_jax import export  # pylint: disable=g-import-not-at-top
  np.testing.assert_allclose(export.load(tmp_path / "exp")(test[:9]).score,
                             det.predict(test[:9]).score, rtol=1e-5)


def test_export_lowers_for_cuda_and_tpu_too(line_detector, tmp_path):
  line_detector.export(tmp_path / "det")  # The default: cpu, cuda, tpu.
  manifest = json.loads((tmp_path / "det" / "manifest.json").read_text())
  assert manifest["platforms"] == ["cpu", "cuda", "tpu"]
  assert manifest["threshold"] == line_detector.threshold
  assert manifest["input"] == {**manifest["input"], "height": 28, "width": 28, "channels": 1}
  assert set(manifest["versions"]) >= {"jax", "line_jax", "flax"}


_FRESH = """
import json, sys
import numpy as np
import line_jax.export
out = {}
for name in ("tiny", "resnet"):
  detector = line_jax.export.load(sys.argv[1] + "/" + name)
  images = np.load(sys.argv[2])
  sizes = range(1, 301) if name == "tiny" else (1, 3, 7, 64, 300)
  rows = {"score": [], "is_ood": [], "pred": []}
  for n in sizes:
    decided = detector(images[:n])
    assert decided.score.shape == (n,), decided.score.shape
    for key in rows:
      rows[key].append(getattr(decided, key)[n - 1].item())
  out[name] = rows
heavy = sorted(m for m in sys.modules if m.startswith(("flax", "line_jax.models",
               "line_jax.scorers", "line_jax.line", "line_jax.features", "torch", "orbax")))
print(json.dumps({"out": out, "heavy": heavy}))
"""


def _tiny_backbone():
  """A Linen network of the test's own (dense layers: fast at every batch size)."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top

  class Tiny(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.relu(nn.Dense(16, name="body")(x.reshape(x.shape[0], -1)))
      return nn.Dense(10, name="fc")(h), h

  model = Tiny()
  variables = model.init(jax.random.key(0), np.zeros((1, 28, 28, 1), np.float32))
  return features.Backbone(model, variables, (0.5,), (0.5,), data.Preprocess(28, None, 1))


@pytest.mark.slow
def test_a_fresh_process_serves_the_export_at_every_batch_size(line_detector, fmnist, tmp_path):
  _, _, test, _ = fmnist
  tiny = _tiny_backbone()
  _, feats = features.extract(tiny.model, tiny.variables, test[:600], mean=tiny.mean,
                              std=tiny.std, progress=False)
  tiny_detector = Detector.fit_features(tiny, feats, np.arange(600) % 10).calibrate(
      test[600:1200])
  images = test[1200:1500]
  for name, det in (("tiny", tiny_detector), ("resnet", line_detector)):
    det.export(tmp_path / "det" / name, platforms=("cpu",))
  np.save(tmp_path / "images.npy", images)
  run = subprocess.run([sys.executable, "-c", _FRESH, str(tmp_path / "det"),
                        str(tmp_path / "images.npy")], capture_output=True, text=True,
                       cwd=ROOT, timeout=600, check=False)
  assert run.returncode == 0, run.stderr[-3000:]
  result = json.loads(run.stdout.strip().splitlines()[-1])
  assert result["heavy"] == []  # neither the model's code nor any scorer module
  for name, det, rows in (("tiny", tiny_detector, np.arange(300)),
                          ("resnet", line_detector, np.array([0, 2, 6, 63, 299]))):
    want = det.predict(images)
    got = result["out"][name]
    # Row n - 1 of the batch of n rows, for every batch size n served.
    np.testing.assert_allclose(got["score"], want.score[rows], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got["pred"], want.pred[rows])
    np.testing.assert_array_equal(got["is_ood"], want.is_ood[rows])


def test_corrupt_exports_are_named(line_detector, tmp_path):
  from line_jax import export  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="not an exported line_jax detector"):
    export.load(tmp_path)
  line_detector.export(tmp_path / "det", platforms=("cpu",))
  weights = tmp_path / "det" / "weights.npz"
  weights.write_bytes(weights.read_bytes()[:100])
  with pytest.raises(ValueError, match="corrupt or truncated weights"):
    export.load(tmp_path / "det")
  (tmp_path / "det" / "function.stablehlo").write_bytes(b"garbage")
  with pytest.raises(ValueError, match="cannot read the exported function"):
    export.load(tmp_path / "det")


# --- the CLIs --------------------------------------------------------------------------------


def _torch_state_dict(variables) -> dict:
  """line_jax variables -> a PyTorch state_dict (the import's key rule, inverted)."""
  import torch  # pylint: disable=g-import-not-at-top
  out = {}
  for path, value in flax.traverse_util.flatten_dict(jax.device_get(variables)).items():
    value = np.asarray(value)
    value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
    out[_torch_import._torch_key(path)] = torch.from_numpy(np.ascontiguousarray(value))
  return out


def _write_folder(root, images, labels=None):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  for i, image in enumerate(images):
    folder = root if labels is None else root / data.FASHION_MNIST_CLASSES[labels[i]]
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image[..., 0]).save(folder / f"{i:04d}.png")


def _cli(module, *args):
  return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True,
                        text=True, cwd=ROOT, timeout=600, check=False)


@pytest.mark.slow
def test_export_and_predict_clis_from_a_pytorch_checkpoint(backbone, fmnist, tmp_path):
  import torch  # pylint: disable=g-import-not-at-top
  train, train_labels = _images("train", 600)
  _, _, test, _ = fmnist
  _write_folder(tmp_path / "train", train, train_labels)
  _write_folder(tmp_path / "held_out", test[:400])
  _write_folder(tmp_path / "inputs", test[400:430])
  (tmp_path / "inputs" / "broken.png").write_bytes(b"not an image")
  torch.save(_torch_state_dict(backbone.variables), tmp_path / "net.pth")

  made = _cli("line_jax.export", "--out", tmp_path / "det", "--dataset", tmp_path / "train",
              "--calibrate", tmp_path / "held_out", "--torch-checkpoint", tmp_path / "net.pth",
              "--arch", "resnet_small", "--platforms", "cpu", "--quiet")
  assert made.returncode == 0, made.stderr[-3000:]
  served = _cli("line_jax.predict", tmp_path / "det", tmp_path / "inputs", "--output",
                tmp_path / "out.csv", "--quiet")
  assert served.returncode == 1, served.stderr  # one input could not be read
  assert "broken.png" in served.stderr
  import csv  # pylint: disable=g-import-not-at-top
  rows = list(csv.DictReader(open(tmp_path / "out.csv")))
  assert len(rows) == 31 and set(rows[0]) >= {"path", "score", "is_ood", "pred"}
  broken = [r for r in rows if r["path"].endswith("broken.png")]
  assert broken[0]["score"] == "" and "cannot" in broken[0]["error"]

  # The same detector in Python: the torch import is the committed network.
  det = Detector.fit(backbone, data.open_source(str(tmp_path / "train")))
  det = det.calibrate(data.open_source(str(tmp_path / "held_out"), "test"))
  want = det.predict(test[400:430])
  good = [r for r in rows if not r["error"]]
  np.testing.assert_allclose([float(r["score"]) for r in good], want.score, rtol=1e-4)
  assert [int(r["pred"]) for r in good] == want.pred.tolist()
  jsonl = _cli("line_jax.predict", tmp_path / "det", tmp_path / "inputs" / "0000.png",
               "--output", tmp_path / "out.jsonl", "--quiet")
  assert jsonl.returncode == 0, jsonl.stderr
  assert json.loads((tmp_path / "out.jsonl").read_text())["score"] == pytest.approx(
      float(good[0]["score"]), rel=1e-6)


def test_export_cli_refuses_calibrating_on_training_images(tmp_path):
  train, labels = _images("train", 60)
  _write_folder(tmp_path / "train", train, labels)
  made = _cli("line_jax.export", "--out", tmp_path / "det", "--dataset", tmp_path / "train",
              "--calibrate", tmp_path / "train", "--quiet")
  assert made.returncode == 2 and "held-out" in made.stderr, made.stderr
  assert not (tmp_path / "det").exists()


def test_calibration_intervals_cover_fresh_data():
  """Clopper-Pearson: the TPR on fresh data lies in the interval at least as
  often as the confidence says (200 calibrations of 400 normal scores)."""
  rng = np.random.default_rng(0)
  covered = 0
  for _ in range(200):
    cal = calibration.at_tpr(rng.normal(size=400), 0.95)
    true_tpr = 1.0 - _normal_cdf(cal.threshold)
    covered += cal.interval[0] <= true_tpr <= cal.interval[1]
  assert covered >= 0.93 * 200, covered


def _normal_cdf(x):
  from scipy import stats  # pylint: disable=g-import-not-at-top
  return float(stats.norm.cdf(x))


def test_calibration_thresholds_are_exact():
  scores = np.arange(1000, dtype=np.float64)[::-1]  # 999 ... 0
  cal = calibration.at_tpr(scores, 0.95)
  assert cal.threshold == 50.0 and cal.achieved == 0.95  # keeps 999 ... 50: 950 scores
  ood = np.arange(400, dtype=np.float64)
  fpr = calibration.at_fpr(scores, ood, 0.05)
  assert np.sum(ood >= fpr.threshold) == 20 and fpr.threshold > 379  # 380 ... 399 let through
  tied = np.r_[np.zeros(300), np.ones(700)]
  assert calibration.at_tpr(tied, 0.95).achieved == 1.0  # ties keep every equal score
  with pytest.raises(ValueError, match="NaN"):
    calibration.at_tpr(np.r_[scores, np.nan])
  with pytest.raises(ValueError, match="strictly between"):
    calibration.at_tpr(scores, 1.0)
  with pytest.raises(ValueError, match="give at least 1,000"):
    calibration.at_tpr(scores[:500], 0.99)


def test_refusals_of_the_export_and_predict_paths(line_detector, backbone, fmnist, tmp_path):
  _, _, test, _ = fmnist
  from line_jax import export  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="needs both fpr= and ood_images="):
    line_detector.calibrate(test[:400], fpr=0.05)
  line_detector.export(tmp_path / "gpu_only", platforms=("cuda",))
  with pytest.raises(ValueError, match="exported for cuda, not cpu"):
    export.load(tmp_path / "gpu_only")
  with pytest.raises(ValueError, match="already exists"):
    line_detector.export(tmp_path / "gpu_only")
  with pytest.raises(ValueError, match="cannot export for platforms nowhere: choose among cpu"):
    line_detector.export(tmp_path / "nowhere", platforms=("nowhere",))
  assert not (tmp_path / "nowhere").exists()
  line_detector.export(tmp_path / "det", platforms=("cpu",))
  served = export.load(tmp_path / "det")
  with pytest.raises(ValueError, match=r"must be \[n, 28, 28, 1\]"):
    served(np.zeros((2, 32, 32, 3), np.uint8))
  with pytest.raises(ValueError, match="uint8"):
    served(np.zeros((2, 28, 28, 1), np.float32))
  from line_jax.runs import predict  # pylint: disable=g-import-not-at-top
  with pytest.raises(FileNotFoundError, match="no such file or folder"):
    predict.image_paths([str(tmp_path / "absent.png")])
  with pytest.raises(ValueError, match=r"must end in \.csv or \.jsonl"):
    predict.write([], str(tmp_path / "out.txt"))
  with pytest.raises(ValueError, match="--fpr and --calibrate-ood go together"):
    from line_jax.runs import export as export_run  # pylint: disable=g-import-not-at-top
    export_run.run(export_run.Config("fashion_mnist", "fashion_mnist", fpr=0.05),
                   tmp_path / "never")
