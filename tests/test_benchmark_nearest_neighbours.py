"""benchmarks.nearest_neighbours and fit_throughput's extra sides, on tiny problems.

Measures nothing; guards the records and tables the committed results rely
on, and that every side scores (or fits) the same thing as line_jax.
"""

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")

# pylint: disable=wrong-import-position
from benchmarks import fit_throughput  # noqa: E402
from benchmarks import nearest_neighbours  # noqa: E402


@pytest.fixture(scope="module")
def records():
  rng = np.random.default_rng(0)
  train = np.abs(rng.normal(size=(600, 12))).astype(np.float32)
  test = np.abs(rng.normal(size=(70, 12))).astype(np.float32)
  kernel = rng.normal(size=(12, 4)).astype(np.float32)
  bias = rng.normal(size=(4,)).astype(np.float32)
  return nearest_neighbours.scoring(train, test, kernel, bias, banks=(200, 600),
                                    batches=(32, None), rounds=2, settle_s=0.0,
                                    knn_k=(1, 7), nnguide_k=(3,))


def test_every_side_scores_what_line_jax_scores(records):
  assert len(records) == 2 * (2 + 1) * 2
  for r in records:
    want = {"torch", "sklearn"} if r["method"] == "knn" else {"torch"}
    assert set(r["rel_diff"]) == want == set(r["ratios"])
    assert r["agree"] is True, r
    assert max(r["rel_diff"].values()) <= nearest_neighbours.RTOL
    assert r["queries"] == 70 and r["batch"] in (32, 70)
    for side, ratio in r["ratios"].items():
      assert ratio == pytest.approx(r["seconds"][side] / r["seconds"]["line_jax"])


def test_scoring_table_has_a_row_per_record(records):
  lines = nearest_neighbours.scoring_table(records).splitlines()
  assert len(lines) == 2 + len(records)
  assert "| nnguide | 600 | 3 | 70 |" in "\n".join(lines)


def test_pytorch_ood_sides_fit_and_say_how_far_float32_lies():
  records = fit_throughput.run((3,), samples=500, features=6, rounds=1, settle_s=0.0,
                               names=["mahalanobis", "rmds", "vim", "knn", "nnguide"],
                               hparams={"vim": {"dim": 3}})
  for r in records:
    assert r["ood_s"] > 0 and r["ood_ratio"] == pytest.approx(r["ood_s"] / r["line_jax_s"])
  by_name = {r["method"]: r for r in records}
  assert by_name["rmds"]["agreement"]["ok"] is True, by_name["rmds"]["agreement"]
  # On a well-conditioned problem pytorch-ood's float32 precision is close
  # (its scatter is not divided by n: ood_accuracy rescales it).
  assert by_name["mahalanobis"]["ood_accuracy"]["precision_rel"] < 1e-3
  assert set(by_name["rmds"]["ood_accuracy"]) == {"precision_rel", "background_precision_rel"}
  assert by_name["knn"]["ood_accuracy"] == {} and by_name["nnguide"]["agreement"] == {"ok": None}


def test_chart_draws_a_bar_per_ratio(records, tmp_path):
  fits = [{"method": "knn", "ratio": 0.9, "ood_ratio": 1.1},
          {"method": "msp", "ratio": 2.0, "ood_ratio": None}]
  rows = nearest_neighbours.chart_rows(fits, records)
  assert rows[:3] == [("fit knn vs PyTorch float64", 0.9),
                      ("fit knn vs pytorch-ood float32", 1.1), ("fit msp vs PyTorch float64", 2.0)]
  assert [r for _, r in rows[3:]] == [v for rec in records for v in rec["ratios"].values()]
  out = nearest_neighbours.chart(fits, records, str(tmp_path / "nn.png"))
  with open(out, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
