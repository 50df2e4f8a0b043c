"""line_jax.tune: each grid point scores as the registry scorer fitted there.

Every check compares against the registry's own `fit` and `score`, run here
point by point at independently resolved hyperparameters, so a vmapped grid
that drifts from the registry (a wrong kept count, a wrong clip, a state
grafted from the wrong fold) fails.
"""

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import random_problem
from line_jax import data as data_lib
from line_jax import fold as fold_lib
from line_jax import metrics as metrics_lib
from line_jax import scorers
from line_jax.data import _embedded_ood
from line_jax.features import Backbone
from line_jax.runs import tune
from line_jax.scorers import _registry

# Grid values that are percentiles of all training activations.
PERCENTILES = {("line", "clip")}
# Grids this project scores in one vmapped call, and those whose states
# cannot stack (ViM's D sizes its arrays).
VMAPPED = {"line", "react", "dice", "ash_p", "ash_b", "ash_s", "scale", "knn"}
LOOP_ONLY = {"vim"}


def _small(grid):
  """First, middle and last value of each hyperparameter of a registry grid."""
  return {name: tuple(dict.fromkeys((v[0], v[len(v) // 2], v[-1]))) for name, v in grid.items()}


@pytest.fixture(scope="module")
def data():
  train, labels, kernel, bias = random_problem(10, 32, 400, seed=1)
  rng = np.random.default_rng(2)
  # Rounded: many tied activations, which ASH / SCALE break as the registry's
  # top-k does.
  val_id = np.round(np.abs(rng.normal(size=(90, 32))), 1).astype(np.float32)
  val_ood = (1.5 * np.abs(rng.normal(size=(60, 32)))).astype(np.float32)
  return train, labels, kernel, bias, val_id, val_ood


def _registry_hparams(method, point, train):
  """`point` with each percentile turned into the threshold, by NumPy."""
  return {name: (float(np.percentile(train.astype(np.float64), value.percentile))
                 if (method, name) in PERCENTILES and value is not None else value)
          for name, value in point.items()}


def _registry_scores(method, hparams, data):
  train, labels, kernel, bias, val_id, val_ood = data
  scorer = scorers.get(method)
  state = scorer.fit(train, labels, kernel, bias, **hparams)
  return np.asarray(scorer.score(state, np.concatenate([val_id, val_ood])), np.float64)


def test_every_grid_method_is_tested():
  assert set(tune.GRIDS) >= VMAPPED | LOOP_ONLY
  assert all(scorers.get(m).grid == tune.GRIDS[m] for m in tune.GRIDS)


@pytest.mark.parametrize("method", sorted(tune.GRIDS))
def test_each_grid_point_scores_as_the_registry_fitted_there(method, data):
  train, labels, kernel, bias, val_id, val_ood = data
  # ViM's, Residual's and NECO's own grids mostly exceed this 32-feature head
  # (those points are skipped, see below); dims it can take keep several in play.
  narrow = {"vim": {"dim": (4, 16, 24)}, "residual": {"dim": (4, 16, 24)},
            "neco": {"dim": (4, 16, 32)}}
  grid = narrow.get(method) or _small(tune.GRIDS[method])
  points, skipped = tune.feasible(method, tune.grid_points(grid), kernel, bias)
  assert not skipped
  want = [_registry_scores(method, _registry_hparams(method, p, train), data) for p in points]
  val = np.concatenate([val_id, val_ood])

  built = tune.vmapped_grid(method, points, train, labels, kernel, bias)
  if method in VMAPPED:
    assert built is not None, f"{method}: its grid fell back to the loop"
  if method in LOOP_ONLY:
    assert built is None
  if built is not None:
    score_fn, stacked, in_axes = built
    assert score_fn is scorers.get(method).score  # the registry's own, no copy
    vmapped = np.asarray(tune.grid_scores(score_fn, stacked, val, in_axes), np.float64)
    assert vmapped.shape == (len(points), val.shape[0])
    for point, row, expected in zip(points, vmapped, want):
      np.testing.assert_allclose(row, expected, rtol=1e-5, atol=1e-5, err_msg=str(point))
    want = vmapped  # tune_method ranks these: float32 noise must not flip a tie below

  # tune_method's table: each row holds the registry's hyperparameters at its
  # point and the metrics of the scores just checked.
  result = tune.tune_method(method, *data, grid=grid, check=False)
  assert result["grid_size"] == len(points)
  assert (result["vmapped_s"] is not None) == (built is not None)
  n_id = val_id.shape[0]
  for point, row, expected in zip(points, result["grid"], want):
    assert row["hparams"] == pytest.approx(_registry_hparams(method, point, train))
    metrics = metrics_lib.ood_metrics(expected[:n_id], expected[n_id:])
    assert row["metrics"] == pytest.approx(metrics, abs=1e-12), point
  best = max(result["grid"], key=lambda r: (r["metrics"]["auroc"], -r["metrics"]["fpr95"]))
  assert result["best"] == best["hparams"] and result["metrics"] == best["metrics"]


@pytest.mark.parametrize("method", sorted(tune.GRIDS))
def test_best_pastes_into_fit_unchanged(method, data):
  train, n_id = data[0], data[4].shape[0]
  result = tune.tune_method(method, *data, grid=_small(tune.GRIDS[method]), check=True)
  scores = _registry_scores(method, result["best"], data)  # fit(**best), nothing else
  got = metrics_lib.ood_metrics(scores[:n_id], scores[n_id:])
  assert got == pytest.approx(result["metrics"], abs=1e-3)  # ties may flip in float32
  if method == "line":
    clip = result["best"]["clip"]
    percentile = result["best_percentiles"].get("clip_percentile")
    if percentile is None:
      assert clip is None
    else:  # the threshold in feature units, never the percentile itself
      assert clip == pytest.approx(np.percentile(train.astype(np.float64), percentile))
      assert 0 < clip < train.max() and clip != percentile
  else:
    assert result["best_percentiles"] == {}


@pytest.mark.parametrize("method", ["ash_p", "ash_b", "ash_s", "scale"])
def test_shaping_grids_on_an_all_zero_row_are_the_registry_s_finite_scores(method, data):
  # tune's old copies of ASH / SCALE gave NaN there; the registry gives energies.
  train, labels, kernel, bias, val_id, _ = data
  val = np.concatenate([np.zeros((1, val_id.shape[1]), np.float32), val_id[:7]])
  points = tune.grid_points(tune.GRIDS[method])
  score_fn, stacked, in_axes = tune.vmapped_grid(method, points, train, labels, kernel, bias)
  vmapped = np.asarray(tune.grid_scores(score_fn, stacked, val, in_axes))
  assert np.all(np.isfinite(vmapped))
  scorer = scorers.get(method)
  for point, row in zip(points, vmapped):
    want = scorer.score(scorer.fit(train, labels, kernel, bias, **point), val)
    np.testing.assert_allclose(row, np.asarray(want), rtol=1e-5, atol=1e-5, err_msg=str(point))


def test_clip_percentiles_resolve_to_thresholds(data):
  train = data[0]
  points = [{"p_w": 10.0, "p_a": 50.0, "clip": scorers.TrainPercentile(90.0)},
            {"p_w": 10.0, "p_a": 50.0, "clip": None}]
  (clipped, source), (off, none) = tune.resolve(points, train)
  assert clipped == {"p_w": 10.0, "p_a": 50.0,
                     "clip": pytest.approx(np.percentile(train.astype(np.float64), 90.0))}
  assert source == {"clip_percentile": 90.0}
  assert off == points[1] and none == {}
  assert tune.resolve([{"percentile": 90.0}], train) == [({"percentile": 90.0}, {})]
  table = tune.format_table({"line": {
      "best": clipped, "best_percentiles": source, "metrics": {"fpr95": 0.5, "auroc": 0.5},
      "grid_size": 2, "vmapped_s": 0.1, "vmapped_compile_s": 1.0, "loop_s": None}})
  assert f"clip={clipped['clip']!r} (clip_percentile=90.0)" in table


def test_stack_decides_by_leaf_shapes_and_the_score_program(data):
  train, labels, kernel, bias, val_id, _ = data
  features = jax.ShapeDtypeStruct(val_id.shape, jnp.float32)
  knn = scorers.get("knn")
  # The same top-k width: k alone varies, a leaf; the bank is shared, not mapped.
  same = [knn.fit(train, labels, kernel, bias, k=k, k_max=20) for k in (1, 20)]
  stacked, in_axes = tune.stack(knn.score, same, features)
  assert stacked.k.shape == (2,) and in_axes.k == 0
  assert stacked.bank.shape == same[0].bank.shape and in_axes.bank is None
  # Top-k widths that change the program (a bank of several blocks): no stack.
  apart = [knn.fit(train, labels, kernel, bias, k=k, block_rows=128) for k in (1, 20)]
  assert tune.stack(knn.score, apart, features) is None
  wide = [knn.fit(train, labels, kernel, bias, k=k, k_max=20, block_rows=128) for k in (1, 20)]
  assert tune.stack(knn.score, wide, features) is not None
  # LINe's states record p_w / p_a as static fields that change nothing: stack.
  line = scorers.get("line")
  lines = [line.fit(train, labels, kernel, bias, p_w=p, p_a=50.0, clip=None) for p in (10., 90.)]
  assert tune.stack(line.score, lines, features) is not None
  # ViM's D sizes its arrays.
  vim = scorers.get("vim")
  vims = [vim.fit(train, labels, kernel, bias, dim=d) for d in (4, 8)]
  assert tune.stack(vim.score, vims, features) is None
  # Equal states (a grid whose D is capped alike) still get a grid axis.
  _, in_axes = tune.stack(vim.score, [vims[0], vims[0]], features)
  assert sorted(jax.tree.leaves(in_axes)) == [0]


def test_fit_grid_folds_the_data_once_for_line(data, monkeypatch):
  train, labels, kernel, bias, *_ = data
  hparams = [{"p_w": 10.0, "p_a": 50.0, "clip": None}, {"p_w": 90.0, "p_a": 10.0, "clip": 1.0},
             {"p_w": None, "p_a": 90.0, "clip": 0.5}]
  line = scorers.get("line")
  rows = []

  def update(acc, features, labels):
    rows.append(features.shape[0])
    return line.fold.update(acc, features, labels)

  monkeypatch.setitem(_registry._REGISTRY, "line",
                      line._replace(fold=line.fold._replace(update=update)))
  states = tune.fit_grid("line", hparams, train, labels, kernel, bias)
  assert sum(rows) == train.shape[0] + len(hparams) * tune._PROBE_ROWS  # one fold, probes
  for h, state in zip(hparams, states):
    alone = line.fit(train, labels, kernel, bias, **h)
    assert (state.p_w, state.p_a) == (h["p_w"], h["p_a"])
    for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(alone)):
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  with pytest.raises(ValueError, match="unknown hyperparameter"):
    tune.fit_grid("line", [{"p_x": 1.0}], train, labels, kernel, bias)


@flax.struct.dataclass
class _Acc:
  total: jax.Array
  offset: jax.Array  # a hyperparameter held as a leaf
  scale: float = flax.struct.field(pytree_node=False)  # one held as a static field


def _toy(update):
  def init(kernel, bias, *, offset=0.0, scale=1.0):
    del kernel, bias
    return _Acc(jnp.zeros(()), jnp.asarray(offset, jnp.float32), scale)

  fold = fold_lib.Fold(init=init, update=update, finalize=lambda acc: acc,
                       merge=fold_lib.add_fields("total"))
  return scorers.Scorer("toy", fold, lambda state, f: f[:, 0], {"offset": 0.0, "scale": 1.0},
                        _Acc)


def test_fold_once_grafts_only_what_the_update_ignores(data):
  train, labels, kernel, bias, *_ = data
  points = [{"offset": 0.0, "scale": 1.0}, {"offset": 2.0, "scale": 3.0}]
  ignoring = _toy(lambda acc, f, y: acc.replace(total=acc.total + jnp.sum(f)))
  states = tune._fold_once(ignoring, points, train, labels, kernel, bias)
  assert [(float(s.offset), s.scale) for s in states] == [(0.0, 1.0), (2.0, 3.0)]
  assert all(float(s.total) == pytest.approx(float(np.sum(train)), rel=1e-5) for s in states)
  for reads in (lambda acc, f, y: acc.replace(total=acc.total + acc.scale * jnp.sum(f)),
                lambda acc, f, y: acc.replace(total=acc.total + acc.offset + jnp.sum(f))):
    assert tune._fold_once(_toy(reads), points, train, labels, kernel, bias) is None


def test_grid_points_and_validation_set():
  assert tune.grid_points({"a": (1, 2), "b": (3,)}) == [{"a": 1, "b": 3}, {"a": 2, "b": 3}]
  images = data_lib.validation_ood(size=12, seed=0)
  assert images.shape == (12, 28, 28, 1) and images.dtype == np.uint8
  np.testing.assert_array_equal(images, data_lib.validation_ood(size=12, seed=0))
  assert not set(_embedded_ood.VALIDATION_SOURCES) & {
      "brick", "grass", "gravel", "camera", "astronaut", "coffee", "chelsea", "rocket", "coins"}


def test_grid_points_a_model_cannot_take_are_skipped_and_reported(data):
  # ViM's grid (16, 32, 64, 96) on this 32-feature head: 32 and above leave no residual.
  result = tune.tune_method("vim", *data, check=False)
  assert result["grid_size"] == 1 and result["best"] == {"dim": 16}
  assert [s["hparams"]["dim"] for s in result["skipped"]] == [32, 64, 96]
  assert all("must be below the feature count 32" in s["why"] for s in result["skipped"])
  with pytest.raises(ValueError, match="no point of vim's grid works on this model"):
    tune.tune_method("vim", *data, grid={"dim": (40, 50)}, check=False)


# ---- Where it writes: nothing of the user's is replaced -------------------


@pytest.fixture
def small_set(tmp_path):
  """120 images of 28x28 (10 classes) for the committed checkpoint."""
  rng = np.random.default_rng(0)
  folder = tmp_path / "set"
  folder.mkdir()
  np.save(folder / "images.npy", rng.integers(0, 256, (120, 28, 28), dtype=np.uint8))
  np.save(folder / "labels.npy", np.repeat(np.arange(10), 12).astype(np.int32))
  return str(folder)


def _tune(small_set, tmp_path, **kw):
  from line_jax import runs
  config = tune.Config(scorers=("react",), dataset=small_set, val_size=30, ood_size=16,
                       check=False, batch_size=32)
  return tune.run(config, runtime=runs.Runtime(cache_dir=str(tmp_path / "cache"),
                                               progress=False), **kw)


def test_users_files_are_refused_before_any_work_and_kept(small_set, tmp_path, monkeypatch):
  import os

  def no_work(*args, **kwargs):
    raise AssertionError("the checkpoint was loaded before the outputs were checked")

  monkeypatch.setattr(Backbone, "from_checkpoint", no_work)
  folder = tmp_path / "folder"
  folder.mkdir()
  (folder / "notes.txt").write_text("mine")
  with pytest.raises(ValueError, match=f"--out {folder} holds notes.txt"):
    _tune(small_set, tmp_path, workdir=folder)
  (tmp_path / "results.json").write_text('{"mine": 1}')
  with pytest.raises(ValueError, match="results.json exists and is not a results file"):
    _tune(small_set, tmp_path, results_file=tmp_path / "results.json")
  with pytest.raises(ValueError, match="is not a results file"):
    _tune(small_set, tmp_path, results_file=folder)  # A folder where the file goes.
  assert os.listdir(folder) == ["notes.txt"]
  assert (tmp_path / "results.json").read_text() == '{"mine": 1}'


def test_a_rerun_replaces_its_own_results(small_set, tmp_path, capsys):
  import json
  import os
  from line_jax import tune as tune_cli
  out = tmp_path / "results.json"
  args = ["--dataset", small_set, "--methods", "react", "--val-size", "30", "--ood-size",
          "16", "--no-check", "--batch-size", "32", "--quiet", "--out", str(out)]
  for _ in range(2):
    tune_cli.main(args)
    assert "react" in json.loads(out.read_text())
  first = _tune(small_set, tmp_path, workdir=tmp_path / "w")
  again = _tune(small_set, tmp_path, workdir=tmp_path / "w")
  assert again["react"]["best"] == first["react"]["best"]
  assert sorted(os.listdir(tmp_path / "w")) == ["table.md", "tune.json"]
  assert sorted(os.listdir(tmp_path)) == ["cache", "results.json", "set", "w"]  # No temporaries.
  capsys.readouterr()
  (tmp_path / "mine.json").write_text("[]")
  with pytest.raises(SystemExit) as e:
    tune_cli.main([*args[:-1], str(tmp_path / "mine.json")])
  assert e.value.code == 2 and "mine.json exists" in capsys.readouterr().err
