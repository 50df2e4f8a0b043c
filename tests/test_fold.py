"""The one fold: every registered scorer is a `Fold`; the fold over disjoint
parts merged pass by pass equals the fold over the whole; a `chain` of every
scorer over one stream fits each as it fits alone; the resumable fold over a
stream equals the plain one.

The merged fold is what a data-parallel fit computes (each process folds its
own batches), so it must hold for every scorer, with exact LINe masks.
"""

import inspect

import chex
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from line_jax import scorers
from line_jax import fold as fold_lib

N, M, C = 150, 10, 4
SMALL = {"knn": {"k": 9}, "vim": {"dim": 5}, "nnguide": {"k": 9}}


def _problem(seed=0):
  rng = np.random.default_rng(seed)
  train = np.abs(rng.normal(size=(N, M))).astype(np.float32)
  labels = rng.permutation(np.arange(N) % C)
  train += np.eye(C, M, dtype=np.float32)[labels]
  # A head that reads the class structure, if not perfectly: temperature
  # scaling has a finite optimum only where the head is better than chance.
  kernel = (rng.normal(size=(M, C)) + 2 * np.eye(M, C)).astype(np.float32)
  bias = rng.normal(size=(C,)).astype(np.float32)
  return train, labels, kernel, bias


def _split(train, labels, edges):
  return [[(train[a:b], labels[a:b])] if b > a else []
          for a, b in zip(edges[:-1], edges[1:])]


@pytest.mark.parametrize("name", scorers.names())
def test_every_scorer_is_a_fold(name):
  scorer = scorers.get(name)
  assert isinstance(scorer.fold, fold_lib.Fold)
  _, _, kernel, bias = _problem()
  assert fold_lib.passes_of(scorer.fold, scorer.fold.init(kernel, bias)) in (1, 2, 3, 4)
  params = inspect.signature(scorer.fold.init).parameters.values()
  assert dict(scorer.defaults) == {
      p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY}
  if not scorer.fold.reads_data:  # Head-only: the accumulator is the state.
    _, _, kernel, bias = _problem()
    state = scorer.fit_from_batches(iter(()), kernel, bias)
    chex.assert_trees_all_equal(state, scorer.fold.init(kernel, bias))


@pytest.mark.parametrize("name", scorers.names())
@pytest.mark.parametrize("edges", [(0, 70, 150), (0, 1, 64, 64, 150), (0, 0, 150)])
def test_merged_parts_equal_the_whole(name, edges):
  train, labels, kernel, bias = _problem()
  scorer = scorers.get(name)
  hparams = SMALL.get(name, {})
  whole = scorer.fit(train, labels, kernel, bias, **hparams)
  merged = fold_lib.fit_parts(scorer.fold, _split(train, labels, edges), kernel, bias,
                               **hparams)
  if name == "line":  # Masks are exact; the contributions' float64 sums differ in order only.
    np.testing.assert_array_equal(merged.neuron_mask, whole.neuron_mask)
    np.testing.assert_array_equal(merged.weight_floor, whole.weight_floor)
  chex.assert_trees_all_close(merged, whole, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", scorers.names())
def test_no_data_in_any_part_is_an_error(name):
  _, _, kernel, bias = _problem()
  scorer = scorers.get(name)
  if not scorer.fold.reads_data:
    pytest.skip(f"{name} reads no data")
  with pytest.raises(ValueError, match="empty"):
    fold_lib.fit_parts(scorer.fold, [[], []], kernel, bias, **SMALL.get(name, {}))


@pytest.mark.parametrize("name", scorers.names())
def test_accumulator_survives_an_orbax_round_trip_mid_stream(name, tmp_path):
  """Stop after the first batches, save, restore, go on: the same state."""
  train, labels, kernel, bias = _problem(seed=1)
  fold = scorers.get(name).fold
  hparams = SMALL.get(name, {})
  acc = fold.init(kernel, bias, **hparams)
  if not fold.reads_data:
    pytest.skip(f"{name} reads no data")
  acc = fold.update(acc, train[:60], labels[:60])
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "acc", acc)
  checkpointer.wait_until_finished()
  restored = checkpointer.restore(tmp_path / "acc", target=jax.tree.map(np.asarray, acc))
  for a in (acc, restored):
    a = fold.update(a, train[60:], labels[60:])
    for _ in range(fold_lib.passes_of(fold, a) - 1):
      a = fold.next_pass(a)
      a = fold.update(fold.update(a, train[:60], labels[:60]), train[60:], labels[60:])
    chex.assert_trees_all_close(fold.finalize(a),
                                scorers.get(name).fit(train, labels, kernel, bias, **hparams),
                                rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", scorers.names())
def test_merging_numpy_accumulators_keeps_float64(name):
  """Accumulators back from other processes are NumPy: merging them is exact."""
  train, labels, kernel, bias = _problem(seed=2)
  scorer = scorers.get(name)
  fold = scorer.fold
  if not fold.reads_data:
    pytest.skip(f"{name} reads no data")
  hparams = SMALL.get(name, {})
  parts = []
  for a, b in ((0, 70), (70, 150)):
    acc = fold.update(fold.init(kernel, bias, **hparams), train[a:b], labels[a:b])
    parts.append(jax.tree.map(np.asarray, acc))  # As `distributed.gather` returns them.
  single = fold_lib.passes_of(fold, fold.init(kernel, bias, **hparams)) == 1
  merged = fold.finalize(fold_lib.merge_all(fold, parts)) if single else None
  if merged is not None:
    direct = fold_lib.fit_parts(fold, _split(train, labels, (0, 70, 150)), kernel, bias,
                                 **hparams)
    chex.assert_trees_all_equal(merged, direct)


def _batches(train, labels, size=40):
  return [(train[i:i + size], labels[i:i + size]) for i in range(0, len(train), size)]


def test_a_chain_of_every_scorer_fits_each_as_it_fits_alone():
  train, labels, kernel, bias = _problem()
  folds = {name: scorers.get(name).fold for name in scorers.names()}
  chained = fold_lib.chain(folds)
  hparams = {name: SMALL.get(name, {}) for name in folds}
  acc = chained.init(kernel, bias, **hparams)
  # Members of one to four passes together: the chain reads the data as often
  # as its longest member (temperature scaling's bracketing).
  assert fold_lib.passes_of(chained, acc) == 4 and chained.needs_labels
  states = chained.finalize(fold_lib.accumulate(chained, acc, _batches(train, labels)))
  for name, state in states.items():
    alone = scorers.get(name).fit_from_batches(_batches(train, labels), kernel, bias,
                                               **hparams[name])
    chex.assert_trees_all_equal(state, alone)


def test_a_chain_of_head_only_scorers_reads_nothing():
  _, _, kernel, bias = _problem()
  chained = fold_lib.chain({n: scorers.get(n).fold for n in ("msp", "energy")})
  assert not chained.reads_data
  states = fold_lib.fit(chained, iter(()), kernel, bias)
  chex.assert_trees_all_equal(states["energy"], scorers.get("energy").fit(
      np.zeros((1, M), np.float32), None, kernel, bias))


def test_a_chain_refuses_hyperparameters_of_a_scorer_it_does_not_hold():
  _, _, kernel, bias = _problem()
  with pytest.raises(ValueError, match="no member knn"):
    fold_lib.chain({"line": scorers.get("line").fold}).init(kernel, bias, knn={"k": 1})


def test_the_resumable_fold_equals_the_plain_fold(tmp_path):
  from line_jax import resumable

  train, labels, kernel, bias = _problem()
  names = ("line", "react", "knn", "vim")  # LINe's and ReAct's, ViM's second passes.
  chained = fold_lib.chain({n: scorers.get(n).fold for n in names})
  hparams = {n: SMALL.get(n, {}) for n in names}
  plain = chained.finalize(fold_lib.accumulate(
      chained, chained.init(kernel, bias, **hparams), _batches(train, labels)))
  stream = resumable.StoredRows(train, labels, batch_size=40)
  acc = resumable.accumulate(chained, chained.init(kernel, bias, **hparams), stream,
                             str(tmp_path), num_features=M, save_every=1)
  for name, state in chained.finalize(acc).items():
    chex.assert_trees_all_equal(state, plain[name])
  # Run again over the same folder: the last step resumes at the end of the stream.
  again = resumable.accumulate(chained, chained.init(kernel, bias, **hparams), stream,
                               str(tmp_path), num_features=M, save_every=1)
  for name, state in chained.finalize(again).items():
    chex.assert_trees_all_equal(state, plain[name])


def test_a_later_pass_that_sees_other_data_is_an_error():
  train, labels, kernel, bias = _problem()

  class Shrinking:
    def __init__(self):
      self.passes = 0

    def __iter__(self):
      self.passes += 1
      return iter(_batches(train, labels)[:2 if self.passes > 1 else None])

  with pytest.raises(ValueError, match="pass 2 over the batches saw"):
    scorers.get("react").fit_from_batches(Shrinking(), kernel, bias)


def test_progress_of_an_older_layout_is_refused_not_misread(tmp_path):
  import json as json_lib

  import flax.serialization
  from line_jax import resumable

  train, labels, kernel, bias = _problem()
  manager = ocp.CheckpointManager(str(tmp_path / resumable.PROGRESS_DIR))
  old = flax.serialization.msgpack_serialize(  # The previous release's step.
      {"accs": {}, "position": json_lib.dumps(None), "rows": 0})
  manager.save(1, args=ocp.args.StandardSave({"p0": np.frombuffer(old, np.uint8)}))
  manager.wait_until_finished()
  manager.close()
  chained = fold_lib.chain({"energy": scorers.get("energy").fold,
                            "react": scorers.get("react").fold})
  with pytest.raises(ValueError, match="progress of an older line_jax"):
    resumable.accumulate(chained, chained.init(kernel, bias), resumable.StoredRows(
        train, labels, 40), str(tmp_path), num_features=M)
