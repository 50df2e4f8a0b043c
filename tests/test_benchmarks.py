"""The benchmark's output: schema 2 on a tiny run, files per device, kernel counts.

Guards what the committed results and the GPU script rely on; measures
nothing (smoke sizes, seconds).
"""

import json
import time

import pytest

pytest.importorskip("torch")
pytest.importorskip("matplotlib")

# pylint: disable=wrong-import-position
from benchmarks import compiled_stats  # noqa: E402
from benchmarks import report  # noqa: E402
from benchmarks import throughput  # noqa: E402

_FIELDS = {
    "scorer": {"classes", "features", "batch", "samples_per_s", "suite", "method"},
    "end_to_end": {"model", "image_size", "classes", "features", "batch", "dtype",
                   "samples_per_s", "seconds"},
    "precompute": {"model", "image_size", "classes", "features", "dtype", "images", "batch",
                   "devices", "samples_per_s", "seconds", "imagenet_seconds"},
    "memory": {"classes", "features", "batch", "bytes"},
    "kernels": {"classes", "features", "batch", "kernels"},
    "note": {"name", "text"},
}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  folder = tmp_path_factory.mktemp("bench")
  path = folder / "r.json"
  assert throughput.main(["--smoke", "--bf16", "--json", str(path), "--out", str(folder)]) == 0
  return json.loads(path.read_text()), folder


def test_schema(smoke):
  result, _ = smoke
  assert result["schema"] == 2
  env = result["environment"]
  for key in ("device", "backend", "num_devices", "versions", "threads"):
    assert key in env
  assert {"jax", "flax", "numpy", "torch"} <= set(env["versions"])
  assert env["threads"]["cpu_count"] >= 1
  assert result["settings"]["mode"] == "smoke" and result["settings"]["bf16"]
  records = result["records"]
  assert not [r for r in records if r["what"] == "error"], records
  assert {r["what"] for r in records} == set(_FIELDS)
  for r in records:
    assert isinstance(r["implementation"], str)
    missing = _FIELDS[r["what"]] - set(r)
    assert not missing, (r, missing)
    for key in ("samples_per_s", "seconds", "bytes"):
      if key in r:
        assert r[key] > 0, r


def test_every_implementation_is_there(smoke):
  records = smoke[0]["records"]
  impls = lambda what: {r["implementation"] for r in records if r["what"] == what}  # noqa: E731
  assert {"line_jax", "torch_fast_grouped", "torch_official"} <= impls("scorer")
  assert impls("end_to_end") == {"line_jax_energy", "line_jax_line", "torch_energy",
                                 "torch_line_fast", "torch_line_official"}
  assert {r["dtype"] for r in records if r["what"] == "end_to_end"} == {"bfloat16"}
  assert impls("precompute") == {"line_jax", "torch_official_batch1"}
  official = next(r for r in records if r["implementation"] == "torch_official_batch1")
  assert official["max_rel_diff"] < 1e-4  # both styles compute the same means
  state, masked = ({r["implementation"]: r["bytes"] for r in records if r["what"] == "memory"}[k]
                   for k in ("line_jax_state", "official_masked_weights"))
  assert masked == 10 * 10 * 342 * 4 and state < masked


def test_files_per_device(smoke):
  result, folder = smoke
  written = folder / report.device_slug(result["environment"])
  assert json.loads((written / "results.json").read_text()) == result
  markdown = (written / "results.md").read_text()
  for title in ("LINe scorer", "Every scorer", "End to end", "Precompute", "Memory", "Kernels",
                "TODO_bf16_auroc_change"):
    assert title in markdown
  assert (written / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_device_slug():
  assert report.device_slug({"backend": "gpu", "device": "NVIDIA H100 80GB HBM3"}) == \
      "nvidia-h100-80gb-hbm3"
  assert report.device_slug({"backend": "cpu", "device": "cpu"}) == "cpu"


_HLO = """HloModule m

%fused_computation (p0: f32[4,3], p1: f32[3,2]) -> f32[4,2] {
  ROOT %dot.1 = f32[4,2]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_computation.1 (p0.1: f32[4,2]) -> f32[4,2] {
  ROOT %exp.1 = f32[4,2]{1,0} exponential(%p0.1)
}

%body (t: (s32[], f32[4,2])) -> (s32[], f32[4,2]) {
  %x = f32[4,2]{1,0} get-tuple-element(%t), index=1
  %e = f32[4,2]{1,0} fusion(%x), kind=kLoop, calls=%fused_computation.1
  ROOT %r = (s32[], f32[4,2]) tuple(%i, %e)
}

%cond (t.1: (s32[], f32[4,2])) -> pred[] {
  ROOT %c = pred[] compare(%i.1, %n), direction=LT
}

ENTRY %main (a: f32[4,3], b: f32[3,2]) -> f32[4,2] {
  %a = f32[4,3]{1,0} parameter(0)
  %ynn_fusion = f32[4,2]{1,0} fusion(%a, %b), kind=kCustom, calls=%fused_computation
  %gemm = (f32[4,2]{1,0}, s8[0]{0}) custom-call(%a, %b), custom_call_target="__cublas$gemm"
  %w = (s32[], f32[4,2]) while(%init), condition=%cond, body=%body
  ROOT %s = f32[4,2]{1,0} sort(%ynn_fusion), dimensions={0}
}
"""


def test_count_kernels_sees_matmuls_and_loop_bodies():
  # CPU wraps dots in library fusions, GPU calls cuBLAS: both are matmuls.
  assert compiled_stats.count_kernels(_HLO) == {
      "matmul": 2, "fusion": 1, "compare": 1, "sort": 1, "total": 5}


def test_network_passes_smoke():
  from benchmarks import network_passes

  record = network_passes.measure("resnet18_cifar", batch=4, rounds=1)
  assert record["images_per_pass"] == 4 and record["max_feature_difference"] < 1e-3
  assert {"one_pass_images_per_s", "passes_images_per_s", "tuned_images_per_s",
          "torch_images_per_s"} <= set(record)
  assert "| resnet18_cifar (32x32) | 4 | 4 |" in network_passes.table([record])


def test_predict_throughput_smoke(tmp_path):
  import numpy as np

  from benchmarks import predict_throughput

  records = predict_throughput.measure("resnet18_cifar", batches=(2,), rounds=1, fit_images=16,
                                       calibrate_images=20, tpr=0.5, workdir=str(tmp_path))
  agreement = [r for r in records if r["what"] == "agreement"]
  timed = [r for r in records if r["what"] == "predict"]
  assert [r["compared"] for r in agreement] == [
      "line_jax_predict vs torch", "line_jax_exported vs torch",
      "line_jax_predict vs line_jax_exported"]
  for r in agreement:  # One detector: the same decisions, scores to float32 precision.
    assert r["images"] == 2 and r["pred_equal"] == 1.0 and r["is_ood_equal"] == 1.0, r
    assert r["max_relative_score_difference"] < 1e-4, r
  assert [r["implementation"] for r in timed] == list(predict_throughput.IMPLEMENTATIONS)
  for r in timed:
    assert (r["model"], r["image_size"], r["classes"], r["features"]) == (
        "resnet18_cifar", 32, 10, 512)
    assert (r["batch"], r["padded_batch"], r["rounds"], r["torch_threads"] >= 1) == (2, 2, 1, True)
    assert np.isfinite(r["threshold"]) and r["clip"] > 0 and r["other_processes_cores"] >= 0
    assert len(r["round_images_per_s"]) == 1 and r["images_per_s"] > 0
  assert "| resnet18_cifar | 32x32 | 2 (2) |" in predict_throughput.table(records)
  assert "| resnet18_cifar | line_jax_predict vs torch | 2 | 100.0 % | 100.0 % |" in (
      predict_throughput.agreement_table(records))
  predict_throughput.chart(records, str(tmp_path / "chart.png"), "smoke")
  assert (tmp_path / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_speed_chart_ratios_and_png(tmp_path):
  import json

  import numpy as np

  from benchmarks import speed_chart

  def rec(method, classes, batch, impl, rate):
    return {"method": method, "classes": classes, "features": 8, "batch": batch,
            "implementation": impl, "samples_per_s": rate}

  scorers_records = [rec("msp", 3, 4, "line_jax", 6.0), rec("msp", 3, 4, "torch", 3.0),
                     rec("knn", 3, 4, "line_jax", 1.0), rec("knn", 3, 4, "torch", 4.0),
                     rec("msp", 5, 4, "line_jax", 2.0)]  # No PyTorch side: NaN.
  methods, columns, grid = speed_chart.scorer_grid(scorers_records)
  assert methods == ["msp", "knn"] and columns == ["3x8\nb4", "5x8\nb4"]
  np.testing.assert_array_equal(grid, [[2.0, np.nan], [0.25, np.nan]])
  passes = [{"model": "net", "batch": 8, "tuned_vs_torch": 1.5}]
  predict = [{"what": "predict", "model": "net", "batch": 1, "implementation": impl,
              "images_per_s": rate} for impl, rate in (("line_jax_predict", 3.0), ("torch", 4.0))]
  assert speed_chart.network_bars(passes, predict) == [("net b8: features", 1.5),
                                                       ("net b1: predict", 0.75)]
  for stem, records in (("scorers", scorers_records), ("network_passes", passes),
                        ("predict_throughput", predict)):
    (tmp_path / f"{stem}.json").write_text(json.dumps({"records": records}))
  out = speed_chart.draw(str(tmp_path))
  assert open(out, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
  with pytest.raises(ValueError, match="no scorers.json"):
    speed_chart.draw(str(tmp_path / "missing"))


def test_interleaved_blocks_wake_each_block_for_wake_s_untimed():
  from benchmarks import timing  # pylint: disable=import-outside-toplevel
  calls = {"a": 0, "b": 0}

  def call(name):
    def fn():
      calls[name] += 1
      time.sleep(0.001)
    return fn

  times = timing.interleaved_blocks([call("a"), call("b")], repeats=3, rounds=2,
                                    settle_s=0.0, wake_s=0.02)
  assert [[len(block) for block in blocks] for blocks in times] == [[3, 3], [3, 3]]
  # Per block: 3 timed calls after at least 0.02 s of untimed ones (each over 1 ms,
  # so at most 20, at least 2); one warm-up call first.
  for name in calls:
    untimed = calls[name] - 1 - 2 * 3
    assert 2 * 2 <= untimed <= 2 * 21, calls
  one = {"a": 0}
  timing.interleaved_blocks([lambda: one.__setitem__("a", one["a"] + 1)], repeats=3, rounds=2,
                            settle_s=0.0)
  assert one["a"] == 1 + 2 * (1 + 3)  # wake_s=0: one untimed call per block
