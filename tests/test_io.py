"""`line_jax.save` / `line_jax.load`: every registered scorer's state round-trips."""

import json

import chex
import numpy as np
import pytest

import line_jax
from line_jax import scorers
from conftest import random_problem

SMALL = {"knn": {"k": 3}, "vim": {"dim": 4}}


@pytest.mark.parametrize("name", scorers.names())
def test_every_state_round_trips_and_scores_identically(name, tmp_path):
  features, labels, kernel, bias = random_problem(4, 12, 80, seed=3)
  scorer = scorers.get(name)
  state = scorer.fit(features, labels, kernel, bias, **SMALL.get(name, {}))
  line_jax.save(tmp_path / name, state)
  loaded = line_jax.load(tmp_path / name)
  assert type(loaded) is type(state)
  chex.assert_trees_all_equal(loaded, state)  # Static fields (hyperparameters) included.
  test = np.abs(np.random.default_rng(1).normal(size=(7, 12))).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(scorer.score(loaded, test)),
                                np.asarray(scorer.score(state, test)))


def test_save_replaces_an_existing_state(tmp_path):
  features, labels, kernel, bias = random_problem(3, 6, 30)
  energy = scorers.get("energy").fit(features, labels, kernel, bias)
  knn = scorers.get("knn").fit(features, labels, kernel, bias, k=2)
  line_jax.save(tmp_path / "s", energy)
  line_jax.save(tmp_path / "s", knn)
  assert line_jax.load(tmp_path / "s").k == 2


def test_foreign_missing_and_corrupt_folders_are_named(tmp_path):
  with pytest.raises(ValueError, match="does not exist"):
    line_jax.load(tmp_path / "nothing")
  (tmp_path / "foreign").mkdir()
  with pytest.raises(ValueError, match="not a saved line_jax state"):
    line_jax.load(tmp_path / "foreign")
  features, labels, kernel, bias = random_problem(3, 6, 30)
  line_jax.save(tmp_path / "s", scorers.get("energy").fit(features, labels, kernel, bias))
  (tmp_path / "s" / "state.json").write_text("{oops")
  with pytest.raises(ValueError, match="state.json: corrupt"):
    line_jax.load(tmp_path / "s")
  (tmp_path / "s" / "state.json").write_text(json.dumps({"format": "other"}))
  with pytest.raises(ValueError, match="not a line_jax.state/2 file"):
    line_jax.load(tmp_path / "s")


def test_only_states_can_be_saved(tmp_path):
  with pytest.raises(TypeError, match="takes a fitted scorer state"):
    line_jax.save(tmp_path / "x", {"a": np.zeros(2)})


def test_state_json_names_the_scorer_and_no_module_path(tmp_path):
  features, labels, kernel, bias = random_problem(3, 6, 30)
  for name in ("energy", "msp", "ash_b", "line"):
    line_jax.save(tmp_path / name, scorers.get(name).fit(features, labels, kernel, bias))
    meta = json.loads((tmp_path / name / "state.json").read_text())
    assert meta["format"] == "line_jax.state/2" and meta["scorer"] == name
    assert meta["state"]["class"] == scorers.get(name).state_type.__name__
    assert "line_jax" not in json.dumps(meta["state"])  # No module path anywhere.
    assert scorers.name_of(line_jax.load(tmp_path / name)) == name


def test_save_replaces_only_a_saved_state(tmp_path):
  features, labels, kernel, bias = random_problem(3, 6, 30)
  state = scorers.get("energy").fit(features, labels, kernel, bias)
  (tmp_path / "notes").mkdir()
  (tmp_path / "notes" / "keep.txt").write_text("x")
  (tmp_path / "file").write_text("y")
  for path in (tmp_path / "notes", tmp_path / "file"):
    with pytest.raises(ValueError, match="exists and is not a saved line_jax state"):
      line_jax.save(path, state)
  assert (tmp_path / "notes" / "keep.txt").read_text() == "x"
  assert (tmp_path / "file").read_text() == "y"


def test_a_state_whose_class_is_not_its_scorers_is_refused(tmp_path):
  features, labels, kernel, bias = random_problem(3, 6, 30)
  line_jax.save(tmp_path / "s", scorers.get("energy").fit(features, labels, kernel, bias))
  meta = json.loads((tmp_path / "s" / "state.json").read_text())
  meta["scorer"] = "msp"  # An EnergyState is not MSP's.
  (tmp_path / "s" / "state.json").write_text(json.dumps(meta))
  with pytest.raises(ValueError, match="its EnergyState is not a state of scorer .msp."):
    line_jax.load(tmp_path / "s")


def _saved(tmp_path, name="line"):
  features, labels, kernel, bias = random_problem(3, 6, 30)
  line_jax.save(tmp_path / "s", scorers.get(name).fit(features, labels, kernel, bias))
  return tmp_path / "s"


def test_flipped_bytes_in_any_array_file_are_named_not_scored(tmp_path):
  folder = _saved(tmp_path)
  files = sorted(p for p in (folder / "state").rglob("*") if p.is_file())
  meta = json.loads((folder / "state.json").read_text())
  assert sorted(meta["checksums"]) == sorted(
      str(p.relative_to(folder / "state")) for p in files)
  for path in files:
    original = path.read_bytes()
    flipped = bytearray(original)
    flipped[len(flipped) // 2] ^= 0x01
    path.write_bytes(bytes(flipped))
    relative = str(path.relative_to(folder / "state"))
    with pytest.raises(ValueError, match=f"corrupt or truncated state: {relative} changed"):
      line_jax.load(folder)
    path.write_bytes(original[:-1])  # Truncated.
    with pytest.raises(ValueError, match=f"{relative} changed"):
      line_jax.load(folder)
    path.write_bytes(original)
  line_jax.load(folder)  # Restored bytes load again.
  (folder / "state" / "extra").write_text("x")
  with pytest.raises(ValueError, match="extra not written by save"):
    line_jax.load(folder)


def test_a_state_saved_without_checksums_still_loads(tmp_path):
  folder = _saved(tmp_path)
  meta = json.loads((folder / "state.json").read_text())
  del meta["checksums"]
  (folder / "state.json").write_text(json.dumps(meta))
  assert scorers.name_of(line_jax.load(folder)) == "line"


def test_loading_a_file_says_a_state_is_a_folder(tmp_path):
  folder = _saved(tmp_path)
  with pytest.raises(ValueError, match="state.json is a file, not a saved line_jax state"):
    line_jax.load(folder / "state.json")


def test_save_keeps_a_users_file_inside_a_state_folder_and_a_foreign_temp_folder(tmp_path):
  folder = _saved(tmp_path, "energy")
  state = line_jax.load(folder)
  (folder / "notes.txt").write_text("mine")
  with pytest.raises(ValueError, match="holds notes.txt, which line_jax.save did not write"):
    line_jax.save(folder, state)
  assert (folder / "notes.txt").read_text() == "mine"
  (folder / "notes.txt").unlink()
  temp = tmp_path / "s.line_jax-saving"
  temp.mkdir()
  (temp / "keep").write_text("mine")
  with pytest.raises(ValueError, match="s.line_jax-saving exists and was not written by"):
    line_jax.save(folder, state)
  assert (temp / "keep").read_text() == "mine"
  (temp / "keep").unlink()
  (temp / ".written-by-line_jax-save").write_text("")  # An interrupted save's leftover.
  line_jax.save(folder, state)
  assert not temp.exists() and scorers.name_of(line_jax.load(folder)) == "energy"


@pytest.mark.parametrize("left", [(), ("state",), ("state", "state.json")])
def test_a_save_killed_at_any_point_is_replaced_on_the_next(tmp_path, left):
  """A kill after the temporary folder is made and before its mark is written
  leaves it empty; one after the mark is removed and before the rename leaves
  only what a save writes. Both are the save's own: the next save replaces them."""
  folder = _saved(tmp_path, "energy")
  state = line_jax.load(folder)
  temp = tmp_path / "s.line_jax-saving"
  temp.mkdir()
  for name in left:
    (temp / name).mkdir() if name == "state" else (temp / name).write_text("{")
  line_jax.save(folder, state)
  assert not temp.exists() and scorers.name_of(line_jax.load(folder)) == "energy"


def test_a_changed_hyperparameter_in_state_json_is_refused(tmp_path):
  features, labels, kernel, bias = random_problem(3, 6, 30)
  line_jax.save(tmp_path / "s", scorers.get("knn").fit(features, labels, kernel, bias, k=2))
  meta = json.loads((tmp_path / "s" / "state.json").read_text())
  meta["state"]["static"]["k"] = 3  # Parses, and would score with another k.
  (tmp_path / "s" / "state.json").write_text(json.dumps(meta))
  with pytest.raises(ValueError, match=r"state.json: corrupt: .* differ .* \(digest mismatch\)"):
    line_jax.load(tmp_path / "s")
