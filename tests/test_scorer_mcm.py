"""MCM: the largest softmax at temperature tau, against a float64 reference.

The temperature changes which of two samples ranks first (a small one ranks
by the top-two gap, a large one by the top logit over the rest); tau = 1 is
MSP; the paper's cosine form is the scorer on normalised features and
embeddings. The fold, save / load, bad values, NaN rows, a symbolic batch
under `jax.export` and the PyTorch baseline.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import line_jax
from line_jax import fold as fold_lib
from line_jax import layout
from line_jax import scorers
from line_jax.scorers import _mcm
from line_jax.scorers import _registry
from line_jax.scorers._registry import _scorer

pytestmark = pytest.mark.filterwarnings("error")

SCORER = _scorer("mcm", _mcm, _mcm.McmState)
N, M, C, B = 90, 12, 5, 16


def _problem(seed=0):
  rng = np.random.default_rng(seed)
  train = np.abs(rng.normal(size=(N, M))).astype(np.float32)
  labels = np.arange(N) % C
  kernel = rng.normal(size=(M, C)).astype(np.float32)
  bias = rng.normal(size=(C,)).astype(np.float32)
  test = (np.abs(rng.normal(size=(B, M))) * 1.5).astype(np.float32)
  return train, labels, kernel, bias, test


def _reference(h, kernel, bias, tau):
  """max_c softmax(z / tau)_c in float64, from the definition."""
  z = h.astype(np.float64) @ kernel.astype(np.float64) + bias.astype(np.float64)
  e = np.exp((z - z.max(axis=1, keepdims=True)) / tau)
  return (e / e.sum(axis=1, keepdims=True)).max(axis=1)


@pytest.mark.parametrize("tau", _mcm.GRID["tau"] + (0.3,))
@pytest.mark.parametrize("where", [layout.CPU, layout.ACCELERATOR])
def test_scores_equal_the_float64_reference(tau, where):
  train, labels, kernel, bias, test = _problem()
  state = SCORER.fit(train, labels, kernel, bias, tau=tau)
  np.testing.assert_allclose(np.asarray(SCORER.score(state, test, layout=where)),
                             _reference(test, kernel, bias, tau), rtol=1e-5, atol=1e-7)


def test_the_temperature_decides_which_sample_ranks_first():
  # Identity head: the features are the logits. A: two close top logits far
  # above the rest; B: one logit a little above the rest.
  kernel = np.eye(C + 1, C, dtype=np.float32)
  bias = np.zeros((C,), np.float32)
  pair = np.array([[5.0, 4.9, 0, 0, 0, 0], [1.0, 0, 0, 0, 0, 0]], np.float32)
  ranks = {}
  for tau in (0.01, 10.0):
    state = SCORER.fit(pair, None, kernel, bias, tau=tau)
    got = np.asarray(SCORER.score(state, pair))
    np.testing.assert_allclose(got, _reference(pair, kernel, bias, tau), rtol=1e-5)
    ranks[tau] = got[0] > got[1]
  assert ranks == {0.01: False, 10.0: True}


def test_tau_one_is_msp():
  train, labels, kernel, bias, test = _problem()
  msp = scorers.get("msp")
  np.testing.assert_allclose(
      np.asarray(SCORER.score(SCORER.fit(train, labels, kernel, bias), test)),
      np.asarray(msp.score(msp.fit(train, labels, kernel, bias), test)), rtol=1e-6)


def test_normalised_inputs_give_the_papers_cosine_form():
  rng = np.random.default_rng(1)
  images = rng.normal(size=(B, M)).astype(np.float32)
  texts = rng.normal(size=(C, M)).astype(np.float32)  # one embedding per class
  images_n = images / np.linalg.norm(images, axis=1, keepdims=True)
  texts_n = texts / np.linalg.norm(texts, axis=1, keepdims=True)
  cosine = (images.astype(np.float64) @ texts.T.astype(np.float64)
            / np.linalg.norm(images, axis=1, keepdims=True) / np.linalg.norm(texts, axis=1))
  e = np.exp((cosine - cosine.max(axis=1, keepdims=True)) / 0.01)
  want = (e / e.sum(axis=1, keepdims=True)).max(axis=1)
  state = SCORER.fit(images_n, None, texts_n.T, None, tau=0.01)
  np.testing.assert_allclose(np.asarray(SCORER.score(state, images_n)), want, rtol=1e-4)


def test_fit_from_uneven_batches_and_merged_parts_equal_the_whole():
  train, labels, kernel, bias, test = _problem()
  whole = SCORER.fit(train, labels, kernel, bias, tau=10.0)
  edges = (0, 1, 40, 47, 90)
  batches = [(train[a:b], labels[a:b]) for a, b in zip(edges[:-1], edges[1:])]
  streamed = SCORER.fit_from_batches(batches, kernel, bias, tau=10.0)
  merged = fold_lib.fit_parts(SCORER.fold, [batches[:2], batches[2:]], kernel, bias, tau=10.0)
  halves = SCORER.fold.merge(SCORER.fold.init(kernel, bias, tau=10.0),
                             SCORER.fold.init(kernel, bias, tau=10.0))
  for state in (streamed, merged, halves):
    assert isinstance(state, _mcm.McmState)
    chex.assert_trees_all_equal(state, whole)


@pytest.fixture
def registered(monkeypatch):
  """MCM in the registry for this test only (`line_jax.save` records the name)."""
  monkeypatch.setitem(_registry._REGISTRY, "mcm", SCORER)
  monkeypatch.setitem(_registry._BY_STATE, _mcm.McmState, "mcm")


def test_save_load_round_trip_scores_identically(tmp_path, registered):
  del registered
  train, labels, kernel, bias, test = _problem()
  state = SCORER.fit(train, labels, kernel, bias, tau=0.01)
  line_jax.save(tmp_path / "mcm", state)
  loaded = line_jax.load(tmp_path / "mcm")
  assert type(loaded) is _mcm.McmState
  chex.assert_trees_all_equal(loaded, state)
  np.testing.assert_array_equal(np.asarray(SCORER.score(loaded, test)),
                                np.asarray(SCORER.score(state, test)))


@pytest.mark.parametrize("tau, error", [
    (0.0, ValueError), (-1.0, ValueError), (float("inf"), ValueError),
    (float("nan"), ValueError), ("1", TypeError), (np.ones(2), TypeError)])
def test_bad_tau_is_an_error_naming_it(tau, error):
  train, labels, kernel, bias, _ = _problem()
  with pytest.raises(error, match="tau"):
    SCORER.fit(train, labels, kernel, bias, tau=tau)


def test_unknown_hyperparameter_names_tau():
  train, labels, kernel, bias, _ = _problem()
  with pytest.raises(ValueError, match="valid: tau"):
    SCORER.fit(train, labels, kernel, bias, temperature=2.0)


def test_nan_rows_score_nan_under_jit():
  train, labels, kernel, bias, test = _problem()
  state = SCORER.fit(train, labels, kernel, bias, tau=0.01)
  bad = test.copy()
  bad[[1, 5], 3] = [np.nan, np.inf]
  got = np.asarray(jax.jit(lambda s, f: SCORER.score_fn(s, f))(state, bad))
  assert np.isnan(got[[1, 5]]).all()
  rest = np.setdiff1d(np.arange(B), [1, 5])
  np.testing.assert_allclose(got[rest], _reference(test, kernel, bias, 0.01)[rest], rtol=1e-5)


def test_exports_with_a_symbolic_batch():
  train, labels, kernel, bias, test = _problem()
  state = SCORER.fit(train, labels, kernel, bias, tau=10.0)
  fn = jax.jit(lambda f: SCORER.score_fn(state, f, layout=layout.ACCELERATOR))
  batch = jax.export.symbolic_shape("b")[0]
  exported = jax.export.export(fn, platforms=("cpu",))(
      jax.ShapeDtypeStruct((batch, M), jnp.float32))
  for rows in (test, test[:3]):
    np.testing.assert_allclose(np.asarray(exported.call(rows)),
                               _reference(rows, kernel, bias, 10.0), rtol=1e-5)


def test_torch_baseline_matches_line_jax():
  pytest.importorskip("torch")
  from benchmarks import _torch_baselines_logit as baselines  # pylint: disable=g-import-not-at-top
  train, labels, kernel, bias, test = _problem()
  for tau in _mcm.GRID["tau"]:
    state = SCORER.fit(train, labels, kernel, bias, tau=tau)
    module = baselines.from_state("mcm", state)
    assert not module.training
    np.testing.assert_allclose(baselines.score(module, test),
                               np.asarray(SCORER.score(state, test)), rtol=2e-4, atol=2e-4)
