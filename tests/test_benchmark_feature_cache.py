"""benchmarks.feature_cache on a few images: its three runs and their agreement."""

from benchmarks import feature_cache


def test_three_runs_and_the_cached_states_are_bit_identical():
  result = feature_cache.run(64, scorers=("line", "vim", "energy"), batch_size=32)
  assert [r["run"] for r in result["runs"]] == ["no cache", "cache, empty", "cache, filled"]
  assert all(r["seconds"] > 0 for r in result["runs"])
  assert result["identical"] is True
  assert result["ratio"] == result["runs"][0]["seconds"] / result["runs"][2]["seconds"]
  assert "bit-identical" in feature_cache.table(result)
