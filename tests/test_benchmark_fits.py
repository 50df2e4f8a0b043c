"""benchmarks.fit_throughput on a tiny problem: records, agreement, table.

Measures nothing (a few dozen samples); guards the fields the committed
results and their table rely on, and that each PyTorch counterpart computes
the statistics its scorer's state holds.
"""

import json

import numpy as np
import pytest

pytest.importorskip("torch")

# pylint: disable=wrong-import-position
from benchmarks import fit_throughput  # noqa: E402
from line_jax import scorers  # noqa: E402

_FIELDS = {"method", "classes", "features", "samples", "hparams", "line_jax_s", "torch_s",
           "ratio", "round_ratios", "checks_s", "agreement", "ood_s", "ood_ratio",
           "ood_accuracy"}


@pytest.fixture(scope="module")
def records():
  return fit_throughput.run((3,), samples=90, features=8, rounds=2, settle_s=0.0,
                            hparams={"knn": {"k": 5}, "vim": {"dim": 4}})


def test_every_registered_scorer_has_a_record(records):
  assert [r["method"] for r in records] == list(scorers.names())
  for r in records:
    assert set(r) == _FIELDS, r
    assert (r["classes"], r["features"], r["samples"]) == (3, 8, 90)
    assert r["line_jax_s"] > 0 and r["checks_s"] > 0
    json.dumps(r)  # the JSON file holds them as they are


@pytest.mark.parametrize("name", ["react", "dice", "mahalanobis", "knn", "vim", "line", "msp"])
def test_torch_side_computes_the_same_statistics(records, name):
  record = next(r for r in records if r["method"] == name)
  assert record["torch_s"] > 0
  assert record["ratio"] == pytest.approx(record["torch_s"] / record["line_jax_s"])
  assert len(record["round_ratios"]) == 2
  assert record["agreement"]["ok"] is True, record["agreement"]


def test_a_scorer_without_counterpart_is_timed_alone(records):
  alone = [r for r in records if fit_throughput.torch_fit(r["method"]) is None]
  for r in alone:
    assert r["torch_s"] is None and r["ratio"] is None and r["agreement"] == {"ok": None}


def test_agreement_catches_a_wrong_statistic():
  x, y, kernel, bias = fit_throughput.problem(90, 8, 3)
  import torch  # pylint: disable=import-outside-toplevel
  state = scorers.get("react").fit(x, y, kernel, bias)
  good = {"threshold": torch.tensor(float(np.percentile(x.astype(np.float64), 90)),
                                    dtype=torch.float32)}
  assert fit_throughput.agreement("react", state, good, kernel, bias, {})["ok"]
  bad = {"threshold": good["threshold"] * 1.001}
  assert not fit_throughput.agreement("react", state, bad, kernel, bias, {})["ok"]


def test_torch_percentile_is_numpys():
  import torch  # pylint: disable=import-outside-toplevel
  values = np.random.default_rng(0).normal(size=1001).astype(np.float32)
  for p in (0.0, 12.5, 50.0, 90.0, 100.0):
    got = float(fit_throughput._torch_percentile(torch.from_numpy(values), p))  # pylint: disable=protected-access
    assert got == np.percentile(values.astype(np.float64), p)


def test_table_has_a_row_per_record(records):
  lines = fit_throughput.table(records).splitlines()
  assert len(lines) == 2 + len(records)
  assert lines[0].startswith("| method | classes |")


def test_sides_agree_past_one_chunk_and_with_many_classes():
  # 4,500 rows: two full 2,048-row chunks of the float64 products and a
  # tail; 40 classes: Mahalanobis centres by gather, not by one-hot.
  records = fit_throughput.run((40,), samples=4500, features=8, rounds=1, settle_s=0.0,
                               names=["mahalanobis", "vim", "react", "dice", "line"],
                               hparams={"vim": {"dim": 3}})
  for r in records:
    assert r["agreement"]["ok"] is True, (r["method"], r["agreement"])
