"""The PyTorch baselines of the benchmark compute the same scores as line_jax.

Guards `benchmarks/scorer_throughput.py`: a speed comparison is only fair if
both sides compute the same method on the same parameters.
"""

import jax
import numpy as np
import pytest

from line_jax import scorers

torch_baselines = pytest.importorskip("benchmarks.torch_baselines")

N, M, C, B = 90, 16, 6, 24
SMALL = {"knn": {"k": 5}, "vim": {"dim": 8}, "line": {"p_w": 50, "p_a": 30, "clip": 1.2}}


@pytest.mark.parametrize("name", scorers.names())
def test_torch_baseline_matches_line_jax(name):
  rng = np.random.default_rng(3)
  train = np.abs(rng.normal(size=(N, M))).astype(np.float32)
  labels = np.arange(N) % C
  kernel = rng.normal(size=(M, C)).astype(np.float32)
  bias = rng.normal(size=(C,)).astype(np.float32)
  test = np.abs(rng.normal(size=(B, M))).astype(np.float32)
  scorer = scorers.get(name)
  state = scorer.fit(train, labels, kernel, bias, **SMALL.get(name, {}))
  module = torch_baselines.from_state(name, state)
  assert not module.training
  np.testing.assert_allclose(torch_baselines.score(module, test),
                             np.asarray(scorer.score(state, test)), rtol=2e-4, atol=2e-4)


def test_unknown_baseline_is_an_error():
  with pytest.raises(ValueError, match="no PyTorch baseline for 'odin'"):
    torch_baselines.from_state("odin", None)


@pytest.mark.slow  # Full scale.
def test_throughput_benchmark_reports_every_scorer_in_both_implementations():
  throughput = pytest.importorskip("benchmarks.scorer_throughput")
  async_dispatch = jax.config.read("jax_cpu_enable_async_dispatch")
  # 24 training rows: CFOOD's reference set (a tenth) needs at least two.
  records = throughput.run(shapes=((3, 8), (4, 6)), batch=4, repeats=1, rounds=2, train=24,
                           knn_k=2, wake_s=0.0)
  assert len(records) == 2 * 2 * len(scorers.names())
  assert {(r["method"], r["classes"], r["implementation"]) for r in records} == {
      (name, c, impl) for name in scorers.names() for c in (3, 4) for impl in ("line_jax", "torch")}
  for r in records:
    assert (r["what"], r["features"], r["batch"]) == ("scorer", {3: 8, 4: 6}[r["classes"]], 4)
    assert np.isfinite(r["samples_per_s"]) and r["samples_per_s"] > 0
    if r["implementation"] == "line_jax":
      assert len(r["round_ratios"]) == 2 and all(x > 0 for x in r["round_ratios"])
    else:
      assert "round_ratios" not in r
  energy = next(r for r in records if (r["method"], r["implementation"]) == ("energy", "line_jax"))
  low = f"{min(energy['round_ratios']):.2f}"
  assert any(line.startswith("| energy | 3 x 8 | 4 |") and line.endswith(f"| {low} |")
             for line in throughput.table(records).splitlines())
  assert jax.config.read("jax_cpu_enable_async_dispatch") == async_dispatch  # restored


def test_kernel_variants_records_each_variants_difference_from_the_first():
  variants_lib = pytest.importorskip("benchmarks.kernel_variants")
  want, off = np.arange(4.0), np.arange(4.0) + np.array([0.0, 0.5, 0.0, -0.25])
  variants = {"first": (lambda: None, lambda: want), "same": (lambda: None, lambda: want.copy()),
              "off": (lambda: None, lambda: off)}
  records = variants_lib._time_group("toy", variants, 8, repeats=1, rounds=2)
  assert [r["variant"] for r in records] == ["first", "same", "off"]
  assert [r["max_abs_difference"] for r in records] == [0.0, 0.0, 0.5]
  assert all(r["group"] == "toy" and r["samples_per_s"] > 0 for r in records)
  rows = variants_lib.table(records).splitlines()[2:]
  assert rows[0].startswith("| toy | first |") and "| 1.00x | 0 |" in rows[0]
  assert rows[2].endswith("| 0.5 |")
