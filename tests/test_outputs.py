"""Where runs write: `cache.refuse_foreign` and the atomic writers of `runs._shared`."""

import json
import os

import pytest

from line_jax.features import cache
from line_jax.runs import _shared

OWNED = ("metrics.json", "hist_*.png", "progress")
MARKS = {"metrics.json": _shared.has_keys("methods")}


def test_a_missing_an_empty_or_an_own_folder_passes(tmp_path):
  cache.refuse_foreign(tmp_path / "absent", OWNED, what="--out", marks=MARKS)
  cache.refuse_foreign(tmp_path, OWNED, what="--out", marks=MARKS)
  (tmp_path / "metrics.json").write_text('{"methods": {}}')
  for name in ("hist_knn.png", "hist_knn.tmp.png", "metrics.json.tmp", "progress"):
    (tmp_path / name).mkdir() if name == "progress" else (tmp_path / name).write_text("")
  (tmp_path / "progress" / "anything").write_text("")  # Inside an owned folder: not looked at.
  cache.refuse_foreign(tmp_path, OWNED, what="--out", marks=MARKS)


def test_foreign_entries_are_named(tmp_path):
  (tmp_path / "metrics.json").write_text('{"methods": {}}')
  for name in ("notes.txt", "metrics.txt", "hist_knn.jpg"):
    (tmp_path / name).write_text("")
  with pytest.raises(ValueError) as e:
    cache.refuse_foreign(tmp_path, OWNED, what="--out", marks=MARKS)
  assert str(e.value).startswith(f"--out {tmp_path} holds hist_knn.jpg, metrics.txt, notes.txt")


@pytest.mark.parametrize("text", ["[]", '{"other": 1}', "not json"])
def test_an_own_name_without_the_mark_is_the_users(tmp_path, text):
  (tmp_path / "metrics.json").write_text(text)
  with pytest.raises(ValueError, match="but no metrics.json of line_jax's"):
    cache.refuse_foreign(tmp_path, OWNED, what="--out", marks=MARKS)
  # Temporaries alone (a run killed while writing) are line_jax's.
  os.remove(tmp_path / "metrics.json")
  (tmp_path / "metrics.json.tmp").write_text(text)
  cache.refuse_foreign(tmp_path, OWNED, what="--out", marks=MARKS)


def test_a_file_where_the_folder_goes_is_refused(tmp_path):
  (tmp_path / "out").write_text("mine")
  with pytest.raises(ValueError, match="is a file, not a folder"):
    cache.refuse_foreign(tmp_path / "out", OWNED, what="--out")


def test_the_cache_holds_only_entries(tmp_path):
  key = cache.fingerprint("x")
  for suffix in (".features.npy", ".labels.npy", ".json", ".json.tmp"):
    (tmp_path / f"{key}{suffix}").write_text("")
  cache.check_folder(tmp_path)
  (tmp_path / "config.json").write_text("")
  with pytest.raises(ValueError, match="feature cache folder .* holds config.json"):
    cache.check_folder(tmp_path)


@pytest.mark.parametrize("unique", [False, True])
def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, unique):
  path = tmp_path / "metrics.json"
  _shared.write_json(path, {"a": 1}, unique=unique)
  with pytest.raises(TypeError):
    _shared.write_json(path, {"a": object()}, unique=unique)
  with pytest.raises(RuntimeError):
    with _shared.atomic_file(path, unique=unique) as tmp:
      with open(tmp, "w") as f:
        f.write("{half")
      raise RuntimeError("killed mid-write")
  assert json.loads(path.read_text()) == {"a": 1}
  assert os.listdir(tmp_path) == ["metrics.json"]
  _shared.write_json(path, {"a": 2}, unique=unique)
  assert json.loads(path.read_text()) == {"a": 2} and os.listdir(tmp_path) == ["metrics.json"]
