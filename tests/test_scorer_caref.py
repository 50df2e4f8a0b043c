"""CARef and CADRef: float64 references, streaming, merging, saving, export.

The registry entries are built here (`_scorer`) as the registry builds them.
The problem makes the methods' choices matter: labels that disagree with the
head's predictions (class means are by prediction), a class the head never
predicts (its mean is the overall mean), weights that are exactly 0 (a unit
in neither error part), and 12 classes (GEN reads the 10 largest
probabilities, not all).
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import line_jax
from line_jax import fold as fold_lib
from line_jax import layout
from line_jax.scorers import _caref
from line_jax.scorers import _registry
from line_jax.scorers._registry import _scorer

pytestmark = pytest.mark.filterwarnings("error")

CAREF = _scorer("caref", _caref, _caref.CarefState, fold=_caref.FOLD_CAREF,
                score=_caref.score_caref)
CADREF = _scorer("cadref", _caref, _caref.CadrefState, fold=_caref.FOLD_CADREF,
                 score=_caref.score_cadref, grid=_caref.GRID_CADREF)
N, M, C, B = 240, 16, 12, 20
NEVER = C - 1  # the class the head never predicts


def _problem(seed=0):
  rng = np.random.default_rng(seed)
  labels = rng.permutation(np.arange(N) % C)
  train = np.abs(rng.normal(size=(N, M))).astype(np.float32)
  train += np.eye(C, M, dtype=np.float32)[labels] * 2
  kernel = rng.normal(size=(M, C)).astype(np.float32)
  kernel[rng.random(size=(M, C)) < 0.15] = 0.0
  bias = rng.normal(size=(C,)).astype(np.float32)
  bias[NEVER] = -50.0
  test = np.abs(rng.normal(size=(B, M))).astype(np.float32) * 1.5
  return train, labels, kernel, bias, test


def _logits(h, kernel, bias):
  z = h.astype(np.float64) @ kernel.astype(np.float64) + bias.astype(np.float64)
  top = np.sort(z, axis=1)
  assert np.all(top[:, -1] - top[:, -2] > 1e-4)  # float32 predicts the same class
  return z


def _softmax(z):
  e = np.exp(z - z.max(axis=1, keepdims=True))
  return e / e.sum(axis=1, keepdims=True)


def _confidence(z, logit):
  if logit == "energy":
    top = z.max(axis=1)
    return top + np.log(np.exp(z - top[:, None]).sum(axis=1))
  if logit == "maxlogit":
    return z.max(axis=1)
  p = _softmax(z)
  if logit == "msp":
    return p.max(axis=1)
  top = np.sort(p, axis=1)[:, -max(z.shape[1] // 10, 10):]  # GEN, CADRef.py lines 83-89
  return 1.0 / np.sum(top ** 0.1 * (1.0 - top) ** 0.1, axis=1)


def _reference_fit(train, kernel, bias, logit="energy"):
  """Class means by prediction (the overall mean for an empty class), and the
  mean training logit score."""
  z = _logits(train, kernel, bias)
  pred = z.argmax(axis=1)
  x = train.astype(np.float64)
  means = np.stack([x[pred == c].mean(axis=0) if np.any(pred == c) else x.mean(axis=0)
                    for c in range(kernel.shape[1])])
  return means, _confidence(z, logit).mean()


def _reference_caref(test, means, kernel, bias):
  pred = _logits(test, kernel, bias).argmax(axis=1)
  h = test.astype(np.float64)
  return -np.abs(h - means[pred]).sum(axis=1) / np.abs(h).sum(axis=1)


def _reference_cadref(test, means, mean_confidence, kernel, bias, logit):
  z = _logits(test, kernel, bias)
  pred = z.argmax(axis=1)
  h = test.astype(np.float64)
  d = (h - means[pred]) * np.sign(kernel.T[pred])
  norm = np.abs(h).sum(axis=1)
  positive, negative = np.maximum(d, 0).sum(axis=1) / norm, np.maximum(-d, 0).sum(axis=1) / norm
  return -(positive / _confidence(z, logit) + negative / mean_confidence)


def _close(got, want, rtol=1e-5):
  scale = max(1.0, float(np.max(np.abs(want))))
  np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale)


def test_class_means_are_by_prediction_with_the_overall_mean_for_an_unpredicted_class():
  train, labels, kernel, bias, _ = _problem()
  state = CAREF.fit(train, labels, kernel, bias)
  pred = _logits(train, kernel, bias).argmax(axis=1)
  assert np.mean(pred != labels) > 0.3  # labels would give other means
  np.testing.assert_array_equal(np.asarray(state.counts), np.bincount(pred, minlength=C))
  assert int(state.counts[NEVER]) == 0
  means, _ = _reference_fit(train, kernel, bias)
  _close(np.asarray(state.means), means, rtol=1e-6)
  _close(np.asarray(state.means[NEVER]), train.astype(np.float64).mean(axis=0), rtol=1e-6)


def test_caref_scores_equal_the_reference():
  train, labels, kernel, bias, test = _problem()
  state = CAREF.fit(train, labels, kernel, bias)
  test[0] = state.means[3] * 1.2  # A row predicted near a mean scores high.
  means, _ = _reference_fit(train, kernel, bias)
  want = _reference_caref(test, means, kernel, bias)
  _close(np.asarray(CAREF.score(state, test)), want)
  assert np.argmax(want) == 0


@pytest.mark.parametrize("logit", _caref.LOGITS)
def test_cadref_scores_equal_the_reference(logit):
  train, labels, kernel, bias, test = _problem()
  state = CADREF.fit(train, labels, kernel, bias, logit=logit)
  assert state.logit == logit
  means, mean_confidence = _reference_fit(train, kernel, bias, logit)
  _close(float(state.mean_confidence), mean_confidence, rtol=1e-6)
  want = _reference_cadref(test, means, mean_confidence, kernel, bias, logit)
  _close(np.asarray(CADREF.score(state, test)), want)
  # The decoupling changes the ranking: CADRef is not CARef rescaled.
  caref = _reference_caref(test, means, kernel, bias)
  assert not np.array_equal(np.argsort(want), np.argsort(caref))


def test_cadref_parts_add_up_to_caref_where_no_weight_is_zero():
  """Where S(x) equals the training mean and no weight is 0, E+ + E- is CARef's error."""
  train, labels, kernel, bias, test = _problem()
  kernel = np.where(kernel == 0, 0.5, kernel).astype(np.float32)
  caref = CAREF.fit(train, labels, kernel, bias)
  cadref = CADREF.fit(train, labels, kernel, bias, logit="maxlogit")
  for row in test[:4, None]:
    s = float(np.max(_logits(row, kernel, bias)))
    assert abs(s) > 0.1
    state = cadref.replace(mean_confidence=jnp.float32(s))
    np.testing.assert_allclose(np.asarray(CADREF.score(state, row)),
                               np.asarray(CAREF.score(caref, row)) / s, rtol=1e-5)


@pytest.mark.parametrize("scorer", [CAREF, CADREF], ids=lambda s: s.name)
def test_streamed_fit_over_uneven_batches_equals_the_whole(scorer):
  train, labels, kernel, bias, test = _problem()
  edges = np.cumsum((0, 1, 90, 7, 62, 80))
  batches = [(train[a:b], labels[a:b]) for a, b in zip(edges[:-1], edges[1:])]
  whole = scorer.fit(train, labels, kernel, bias)
  streamed = scorer.fit_from_batches(iter(batches), kernel, bias)  # one pass: one-shot is fine
  chex.assert_trees_all_close(streamed, whole, rtol=1e-6, atol=1e-6)
  _close(np.asarray(scorer.score(streamed, test)), np.asarray(scorer.score(whole, test)))


@pytest.mark.parametrize("scorer", [CAREF, CADREF], ids=lambda s: s.name)
@pytest.mark.parametrize("edges", [(0, 120, 240), (0, 1, 100, 100, 240), (0, 0, 240)])
def test_merged_parts_equal_the_whole(scorer, edges):
  train, labels, kernel, bias, _ = _problem()
  parts = [[(train[a:b], labels[a:b])] if b > a else [] for a, b in zip(edges[:-1], edges[1:])]
  hparams = {"logit": "gen"} if scorer is CADREF else {}
  merged = fold_lib.fit_parts(scorer.fold, parts, kernel, bias, **hparams)
  chex.assert_trees_all_close(merged, scorer.fit(train, labels, kernel, bias, **hparams),
                              rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("scorer", [CAREF, CADREF], ids=lambda s: s.name)
def test_save_load_round_trip(scorer, tmp_path, monkeypatch):
  monkeypatch.setitem(_registry._REGISTRY, scorer.name, scorer)
  monkeypatch.setitem(_registry._BY_STATE, scorer.state_type, scorer.name)
  train, labels, kernel, bias, test = _problem()
  hparams = {"logit": "msp"} if scorer is CADREF else {}
  state = scorer.fit(train, labels, kernel, bias, **hparams)
  line_jax.save(tmp_path / scorer.name, state)
  loaded = line_jax.load(tmp_path / scorer.name)
  assert type(loaded) is scorer.state_type
  chex.assert_trees_all_equal(loaded, state)  # the static logit included
  np.testing.assert_array_equal(np.asarray(scorer.score(loaded, test)),
                                np.asarray(scorer.score(state, test)))


def test_bad_hyperparameters_are_named():
  train, labels, kernel, bias, _ = _problem()
  for bad in ("Energy", "odin", 3, None):
    with pytest.raises(ValueError, match="logit must be one of"):
      CADREF.fit(train, labels, kernel, bias, logit=bad)
  with pytest.raises(ValueError, match="unknown hyperparameter.*logit.*'caref'"):
    CAREF.fit(train, labels, kernel, bias, logit="energy")
  assert dict(CAREF.defaults) == {} and dict(CADREF.defaults) == {"logit": "energy"}
  assert dict(CADREF.grid) == {"logit": ("energy", "maxlogit", "msp", "gen")}


def test_a_state_of_the_other_scorer_is_refused():
  train, labels, kernel, bias, test = _problem()
  with pytest.raises(TypeError, match="cannot score a CadrefState"):
    CAREF.score(CADREF.fit(train, labels, kernel, bias), test)


@pytest.mark.parametrize("scorer", [CAREF, CADREF], ids=lambda s: s.name)
def test_a_nan_row_scores_nan(scorer):
  train, labels, kernel, bias, test = _problem()
  state = scorer.fit(train, labels, kernel, bias)
  bad = test.copy()
  bad[2, 5] = np.nan
  got = np.asarray(scorer.score(state, bad))
  assert np.isnan(got[2]) and np.all(np.isfinite(np.delete(got, 2)))
  np.testing.assert_array_equal(np.delete(got, 2),
                                np.delete(np.asarray(scorer.score(state, test)), 2))


@pytest.mark.parametrize("logit", [None, *_caref.LOGITS])
def test_an_all_zero_row_scores_finite_far_below_every_real_row(logit):
  """The code's 0 / 0; with the norm floored (pytorch-ood's 1e-12) it is finite."""
  train, labels, kernel, bias, test = _problem()
  scorer = CAREF if logit is None else CADREF
  state = scorer.fit(train, labels, kernel, bias, **({} if logit is None else {"logit": logit}))
  test[0] = 0.0
  got = np.asarray(scorer.score(state, test))
  assert np.all(np.isfinite(got)) and got[0] < 1e6 * got[1:].min()
  pred = int(np.argmax(bias))
  means = np.asarray(state.means, np.float64)
  if logit is None:
    _close(got[0], -np.abs(means[pred]).sum() / 1e-12)


@pytest.mark.parametrize("logit", [None, *_caref.LOGITS])
def test_export_with_a_symbolic_batch(logit):
  train, labels, kernel, bias, test = _problem()
  scorer = CAREF if logit is None else CADREF
  state = scorer.fit(train, labels, kernel, bias, **({} if logit is None else {"logit": logit}))
  batch = jax.export.symbolic_shape("b")[0]
  exported = jax.export.export(
      jax.jit(lambda f: scorer.score_fn(state, f, layout=layout.ACCELERATOR)),
      platforms=("cpu",))(jax.ShapeDtypeStruct((batch, M), jnp.float32))
  for rows in (test, test[:3]):
    _close(np.asarray(exported.call(rows)), np.asarray(scorer.score(state, rows)))


@pytest.mark.parametrize("logit", [None, *_caref.LOGITS])
def test_torch_baseline_matches(logit):
  baselines = pytest.importorskip("benchmarks._torch_baselines_shaping")
  train, labels, kernel, bias, test = _problem()
  scorer = CAREF if logit is None else CADREF
  state = scorer.fit(train, labels, kernel, bias, **({} if logit is None else {"logit": logit}))
  module = baselines.from_state(scorer.name, state)
  assert not module.training
  test[0] = 0.0  # floored alike
  np.testing.assert_allclose(baselines.score(module, test),
                             np.asarray(scorer.score(state, test)), rtol=2e-4, atol=2e-4)
