"""OpenMax: a float64 reference of OpenOOD's code with libmr's Weibull fit.

The reference fits each class's Weibull by the classic maximum-likelihood
equation for the shape (scipy's `brentq`) on libmr's translated tail
(`d + 10000 - min(tail)`), not by the module's bisection on the
extreme-value form, and scores rows as OpenOOD's `openmax()` does, row by
row. The problem makes the method's choices matter: labels the head gets
wrong (only correct rows count), a class with a single correct row (no
Weibull: w-score 1), a class with fewer correct rows than the tail, and
test rows from near the class means to far off them. The fold (two passes
over uneven batches, merged parts), save / load, NaN rows, a symbolic
batch under `jax.export`, the random problem and the PyTorch baseline.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize

import line_jax
from line_jax import fold as fold_lib
from line_jax import layout
from line_jax.scorers import _openmax
from line_jax.scorers import _registry
from line_jax.scorers._registry import _scorer

pytestmark = pytest.mark.filterwarnings("error")

SCORER = _scorer("openmax", _openmax, _openmax.OpenmaxState)
N, M, C, B = 400, 16, 5, 24
SINGLE, FEW = 3, 4  # a class with one correct training row; one with fewer than 20


def _problem(seed=0):
  rng = np.random.default_rng(seed)
  kernel = rng.normal(size=(M, C)).astype(np.float32)
  bias = rng.normal(size=(C,)).astype(np.float32) * 0.5
  labels = np.arange(N) % C
  train = (rng.normal(size=(N, M)) * 0.6 + 1.5 * kernel.T[labels]).astype(np.float32)
  z = _logits(train, kernel, bias)
  pred = z.argmax(axis=1)
  # Class SINGLE: one row classified correctly; class FEW: 12; the rest mislabelled.
  for cls, keep in ((SINGLE, 1), (FEW, 12)):
    rows = np.flatnonzero((labels == cls) & (pred == cls))
    labels[rows[keep:]] = (cls + 1) % C
  scale = np.linspace(0.3, 3.0, B)[:, None]
  test = (1.5 * kernel.T[np.arange(B) % C] + rng.normal(size=(B, M)) * 0.6 * scale
          ).astype(np.float32)
  # Logits of a few units: probabilities away from 0 and 1.
  return train, labels, kernel * np.float32(0.2), bias * np.float32(0.2), test


def _logits(h, kernel, bias):
  z = h.astype(np.float64) @ kernel.astype(np.float64) + bias.astype(np.float64)
  top = np.sort(z, axis=1)
  assert np.all(top[:, -1] - top[:, -2] > 1e-3)  # float32 ranks the classes alike
  return z


def _distance(z, mu, kind):
  euclid = np.linalg.norm(z - mu, axis=-1)
  cosine = 1.0 - np.sum(z * mu, axis=-1) / (np.linalg.norm(z, axis=-1) * np.linalg.norm(mu))
  return {"euclidean": euclid, "cosine": cosine, "eucos": 0.5 * euclid + cosine}[kind]


def _weibull(tail):
  """libmr's FitHigh: (small, scale, shape) of the translated tail, by the
  shape's likelihood equation; None where libmr's fit fails."""
  if len(tail) < 2 or np.ptp(tail) == 0:
    return None
  small = tail.min()
  x = tail + 10000.0 - small
  logs = np.log(x)

  def equation(k):  # sum x^k log x / sum x^k - 1/k - mean(log x)
    w = np.exp(k * (logs - logs.max()))
    return np.sum(w * logs) / np.sum(w) - 1.0 / k - logs.mean()

  shape = optimize.brentq(equation, 1e-3, 1e12, xtol=1e-12, rtol=1e-15, maxiter=1000)
  scale = np.exp(logs.max() + np.log(np.mean(np.exp(shape * (logs - logs.max())))) / shape)
  return small, scale, shape


def _w_score(model, d):
  if model is None:
    return 1.0
  small, scale, shape = model
  t = d + 10000.0 - small
  return 1.0 - np.exp(-((t / scale) ** shape)) if t > 0 else 0.0


def _reference_fit(train, labels, kernel, bias, tailsize=20, kind="euclidean"):
  z = _logits(train, kernel, bias)
  correct = z.argmax(axis=1) == labels
  means, models = np.zeros((C, C)), []
  for c in range(C):
    rows = z[correct & (labels == c)]
    if len(rows):
      means[c] = rows.mean(axis=0)
    tail = np.sort(_distance(rows, means[c], kind))[-tailsize:] if len(rows) else np.zeros(0)
    models.append(_weibull(tail))
  return means, models


def _reference_score(test, means, models, kernel, bias, alpha=3, kind="euclidean",
                     output="known"):
  """OpenOOD's `openmax()` per row, then the chosen output (OpenOOD: "max")."""
  out = []
  for z in _logits(test, kernel, bias):
    ranked = z.argsort()[::-1][:alpha]
    omega = np.zeros(C)
    omega[ranked] = [(alpha + 1 - i) / alpha for i in range(1, alpha + 1)]
    w = np.array([_w_score(models[c], _distance(z, means[c], kind)) for c in range(C)])
    modified = z * (1 - w * omega)
    unknown = np.sum(z - modified)
    top = max(modified.max(), unknown)
    e, eu = np.exp(modified - top), np.exp(unknown - top)
    p, pu = e / (e.sum() + eu), eu / (e.sum() + eu)
    out.append({"max": max(p.max(), pu), "known": p.max(), "unknown": -pu}[output])
  return np.array(out)


def _close(got, want, rtol=1e-5):
  np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * max(1.0, np.abs(want).max()))


def test_the_problem_exercises_the_methods_choices():
  train, labels, kernel, bias, _ = _problem()
  z = _logits(train, kernel, bias)
  correct = z.argmax(axis=1) == labels
  counts = np.bincount(labels[correct], minlength=C)
  assert counts[SINGLE] == 1 and 2 <= counts[FEW] < 20 and np.mean(~correct) > 0.1
  assert all(count >= 20 for c, count in enumerate(counts) if c not in (SINGLE, FEW))
  state = SCORER.fit(train, labels, kernel, bias)
  np.testing.assert_array_equal(np.asarray(state.valid), np.arange(C) != SINGLE)


@pytest.mark.parametrize("kind", _openmax.DISTANCES)
@pytest.mark.parametrize("output", _openmax.OUTPUTS)
def test_scores_equal_the_float64_reference(kind, output):
  train, labels, kernel, bias, test = _problem()
  state = SCORER.fit(train, labels, kernel, bias, distance=kind, output=output)
  means, models = _reference_fit(train, labels, kernel, bias, kind=kind)
  _close(np.asarray(state.means), means, rtol=1e-6)
  want = _reference_score(test, means, models, kernel, bias, kind=kind, output=output)
  _close(np.asarray(SCORER.score(state, test)), want)


def test_weibull_parameters_equal_the_likelihood_root():
  train, labels, kernel, bias, _ = _problem()
  state = SCORER.fit(train, labels, kernel, bias)
  _, models = _reference_fit(train, labels, kernel, bias)
  for c, model in enumerate(models):
    if model is None:
      continue
    small, scale, shape = model
    np.testing.assert_allclose(float(state.small[c]), small, rtol=1e-6)
    np.testing.assert_allclose(float(state.shape[c]), shape, rtol=1e-6)
    np.testing.assert_allclose(float(state.offset[c]), np.log(scale / 10000.0), rtol=1e-5)


def test_the_w_score_is_the_weibull_cdf_of_the_translated_distance():
  """Rows far from every mean move their logits to the unknown class: the
  w-score rises with the distance, from 0 to 1 across the tail."""
  train, labels, kernel, bias, _ = _problem()
  state = SCORER.fit(train, labels, kernel, bias)
  _, models = _reference_fit(train, labels, kernel, bias)
  c = 0
  small, scale, shape = models[c]
  d = np.linspace(0.0, 2 * small + 5.0, 50).astype(np.float32)
  got = np.asarray(_openmax.w_score(state, jnp.asarray(d), jnp.zeros(50, jnp.int32)))
  want = np.array([_w_score(models[c], float(x)) for x in d])
  np.testing.assert_allclose(got, want, atol=2e-5)
  assert got[0] < 1e-3 and got[-1] > 0.999 and np.all(np.diff(got) >= 0)


def test_rows_far_from_the_class_means_score_lower():
  train, labels, kernel, bias, test = _problem()
  for output in ("known", "unknown"):
    state = SCORER.fit(train, labels, kernel, bias, output=output)
    got = np.asarray(SCORER.score(state, test))
    assert got[:4].mean() > got[-4:].mean()
  # OpenOOD's max over C + 1 probabilities: far rows are certain of the unknown
  # class and score 1 (why the default is the known classes' maximum).
  state = SCORER.fit(train, labels, kernel, bias, output="max")
  scores = np.asarray(SCORER.score(state, test * 6))
  np.testing.assert_allclose(scores, 1.0, atol=1e-3)
  default = SCORER.fit(train, labels, kernel, bias)
  assert np.asarray(SCORER.score(default, test * 6)).max() < 0.5


def test_defaults_and_grid_are_openoods():
  assert dict(SCORER.defaults) == {"tailsize": 20, "alpha": 3, "distance": "euclidean",
                                   "output": "known"}
  assert dict(SCORER.grid) == {"tailsize": (10, 20, 25, 50), "alpha": (1, 2, 3, 5, 10)}


@pytest.mark.parametrize("hparams, error, message", [
    ({"tailsize": 1}, ValueError, "tailsize must be at least 2"),
    ({"tailsize": 2.5}, TypeError, "tailsize must be an integer"),
    ({"alpha": 0}, ValueError, "alpha must be at least 1"),
    ({"alpha": C + 1}, ValueError, f"alpha={C + 1} must be at most the class count {C}"),
    ({"alpha": True}, TypeError, "alpha must be an integer"),
    ({"distance": "manhattan"}, ValueError, "distance must be one of"),
    ({"output": "min"}, ValueError, "output must be one of"),
    ({"weibull_tail": 20}, ValueError, "unknown hyperparameter.*valid: tailsize, alpha"),
])
def test_bad_hyperparameters_are_errors_naming_them(hparams, error, message):
  train, labels, kernel, bias, _ = _problem()
  with pytest.raises(error, match=message):
    SCORER.fit(train, labels, kernel, bias, **hparams)


def test_labels_are_required():
  train, _, kernel, bias, _ = _problem()
  with pytest.raises(ValueError, match="labels"):
    SCORER.fit(train, None, kernel, bias)


def test_fit_from_uneven_batches_and_merged_parts_equal_the_whole():
  train, labels, kernel, bias, test = _problem()
  whole = SCORER.fit(train, labels, kernel, bias, tailsize=10, distance="eucos")
  edges = (0, 1, 150, 157, 300, 400)
  batches = [(train[a:b], labels[a:b]) for a, b in zip(edges[:-1], edges[1:])]
  streamed = SCORER.fit_from_batches(batches, kernel, bias, tailsize=10, distance="eucos")
  merged = fold_lib.fit_parts(SCORER.fold, [batches[:2], [], batches[2:]], kernel, bias,
                              tailsize=10, distance="eucos")
  for state in (streamed, merged):
    assert isinstance(state, _openmax.OpenmaxState)
    chex.assert_trees_all_close(state, whole, rtol=1e-6, atol=1e-6)
    _close(np.asarray(SCORER.score(state, test)), np.asarray(SCORER.score(whole, test)),
           rtol=1e-6)


def test_a_generator_is_refused_for_two_passes():
  train, labels, kernel, bias, _ = _problem()
  with pytest.raises(TypeError, match="2 times"):
    SCORER.fit_from_batches(iter([(train, labels)]), kernel, bias)


def test_merging_numpy_accumulators_keeps_float64():
  train, labels, kernel, bias, _ = _problem()
  fold = SCORER.fold
  acc = fold.init(kernel, bias)
  for stage in range(2):
    parts = [jax.tree.map(np.asarray, fold.update(acc, train[a:b], labels[a:b]))
             for a, b in ((0, 170), (170, N))]
    acc = fold_lib.merge_all(fold, parts)
    assert acc.sums.dtype == np.float64 and acc.tails.dtype == np.float64
    if stage == 0:
      acc = fold.next_pass(acc)
  direct = fold_lib.fit_parts(fold, [[(train[:170], labels[:170])], [(train[170:], labels[170:])]],
                              kernel, bias)
  chex.assert_trees_all_close(fold.finalize(acc), direct, rtol=1e-7, atol=1e-7)


@pytest.fixture
def registered(monkeypatch):
  """OpenMax in the registry for this test only (`line_jax.save` records the name)."""
  monkeypatch.setitem(_registry._REGISTRY, "openmax", SCORER)
  monkeypatch.setitem(_registry._BY_STATE, _openmax.OpenmaxState, "openmax")


def test_save_load_round_trip_scores_identically(tmp_path, registered):
  del registered
  train, labels, kernel, bias, test = _problem()
  state = SCORER.fit(train, labels, kernel, bias, alpha=2, distance="cosine", output="known")
  line_jax.save(tmp_path / "openmax", state)
  loaded = line_jax.load(tmp_path / "openmax")
  assert type(loaded) is _openmax.OpenmaxState
  chex.assert_trees_all_equal(loaded, state)  # the static fields included
  np.testing.assert_array_equal(np.asarray(SCORER.score(loaded, test)),
                                np.asarray(SCORER.score(state, test)))


def test_nan_rows_score_nan_under_jit():
  train, labels, kernel, bias, test = _problem()
  state = SCORER.fit(train, labels, kernel, bias)
  bad = test.copy()
  bad[[0, 11], 3] = [np.nan, -np.inf]
  got = np.asarray(jax.jit(lambda s, f: SCORER.score_fn(s, f))(state, bad))
  assert np.isnan(got[[0, 11]]).all()
  rest = np.setdiff1d(np.arange(B), [0, 11])
  means, models = _reference_fit(train, labels, kernel, bias)
  _close(got[rest], _reference_score(test, means, models, kernel, bias)[rest])


@pytest.mark.parametrize("output", _openmax.OUTPUTS)
def test_exports_with_a_symbolic_batch(output):
  train, labels, kernel, bias, test = _problem()
  state = SCORER.fit(train, labels, kernel, bias, output=output)
  fn = jax.jit(lambda f: SCORER.score_fn(state, f, layout=layout.ACCELERATOR))
  batch = jax.export.symbolic_shape("b")[0]
  exported = jax.export.export(fn, platforms=("cpu",))(
      jax.ShapeDtypeStruct((batch, M), jnp.float32))
  means, models = _reference_fit(train, labels, kernel, bias)
  for rows in (test, test[:3]):
    _close(np.asarray(exported.call(rows)),
           _reference_score(rows, means, models, kernel, bias, output=output))


def test_random_head_and_labels_fit_and_score(problem):
  """Most classes of a random head have few or no correct rows: no error, no warning."""
  features, labels, kernel, bias = problem(10, 32, 300)
  state = SCORER.fit(features, labels, kernel, bias)
  assert not np.asarray(state.valid).all()
  got = np.asarray(SCORER.score(state, features[:50]))
  assert got.shape == (50,) and np.all(np.isfinite(got)) and np.all((got > 0) & (got <= 1))


@pytest.mark.parametrize("kind", _openmax.DISTANCES)
@pytest.mark.parametrize("output", _openmax.OUTPUTS)
def test_torch_baseline_matches_line_jax(kind, output):
  pytest.importorskip("torch")
  baselines = pytest.importorskip("benchmarks._torch_baselines_density")
  train, labels, kernel, bias, test = _problem()
  state = SCORER.fit(train, labels, kernel, bias, distance=kind, output=output)
  module = baselines.from_state("openmax", state)
  assert not module.training
  np.testing.assert_allclose(baselines.score(module, test),
                             np.asarray(SCORER.score(state, test)), rtol=2e-4, atol=2e-4)
