"""line_jax benchmarks against PyTorch: scorer, end to end, precompute, memory, kernels.

    python -m benchmarks.throughput                   # quick (minutes on a CPU)
    python -m benchmarks.throughput --full --bf16 --out benchmarks/results
    python -m benchmarks.throughput --smoke --json /tmp/r.json   # seconds; tests

Parts (`--parts`, default all), each on identical inputs in both frameworks,
warm-up first, every call synchronised, median of repeats, ratios within
this one run:

* scorer: the LINe scorer alone, features -> scores, at the paper's three
  head shapes (`line_heads.HEADS`, official hyperparameters): line_jax (and
  each strategy), the official-style PyTorch loop (`torch_official`, at
  small batches only: it is slow), the fastest PyTorch we could write
  (`torch_fast_*`); then every registered scorer against its PyTorch version
  (`scorer_throughput.run`).
* end_to_end: images -> scores through ResNet-18 (CIFAR, 32 x 32) and
  ResNet-50 (224 x 224), Energy vs LINe (`end_to_end`).
* precompute: LINe's contributions from training images, official batch-1
  forward + backward vs batched line_jax, extrapolated to ImageNet
  (`precompute`).
* memory, kernels: fitted-state bytes and the compiled scorer's temporary
  bytes vs the official `[C, C, m]` tensor; kernels in the optimised HLO
  (`compiled_stats`).

`--json FILE` / `--out DIR` (`DIR/<device-slug>/results.json`, `results.md`,
`chart.png`; see `report`) write, after every part (a later failure keeps
what came before):

    {"schema": 2,
     "environment": {"device", "backend", "num_devices", "platform",
                     "processor", "versions": {jax, flax, numpy, torch},
                     "threads": {cpu_count, cpu_affinity, torch_intra_op,
                                 [OMP_NUM_THREADS, XLA_FLAGS]},
                     ["torch_device"]},
     "settings": {"mode": "quick" | "full" | "smoke", "bf16": bool, ...},
     "records": [record, ...]}

Every record has "what" and "implementation"; by "what":

* "scorer": classes, features, batch, samples_per_s, suite ("line_head":
  LINe only, also seconds, p_w, p_a, clip; "all_scorers": every method),
  method ("line", "energy", ...);
* "end_to_end": model, image_size, classes, features, batch, dtype
  ("float32" | "bfloat16": the backbone's; scorers are float32),
  samples_per_s (images/s), seconds (per batch);
* "precompute": model, image_size, classes, features, dtype, images,
  batch, devices, samples_per_s, seconds, imagenet_seconds, and on the
  official record max_rel_diff;
* "memory": classes, features, batch, bytes;
* "kernels": classes, features, batch, kernels ({kind: count, "total"});
* "auroc": method, dtype, benchmark, train, test, ood_size, id_accuracy,
  auroc, fpr95 (averages over the OOD sets; fractions), auroc_change on the
  bfloat16 record (`bf16_auroc`, with --bf16-auroc);
* "note": name, text (a figure not measured, and why);
* "error": part, text (a part that failed; the others still ran).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback

import jax
import numpy as np

from benchmarks import line_heads
from benchmarks import report
from benchmarks import timing

HEADS = line_heads.HEADS
PARTS = ("scorer", "all_scorers", "end_to_end", "precompute", "memory", "bf16_auroc")
OFFICIAL_MAX_WORK = 256 * 100 * 342 * 8  # official loop only where one batch stays quick

# Sizes per mode. quick: a few minutes on a 2-core CPU; full: the GPU run;
# smoke: seconds, for tests and for checking the GPU script's path on a CPU.
MODES = {
    "smoke": dict(heads=HEADS[:1], batches=[32], repeats=2,
                  all_scorers=dict(shapes=((10, 342),), batch=32, repeats=1, rounds=1, train=64,
                                   names=("energy", "line")),
                  e2e=[("resnet18_cifar", 2)], e2e_rounds=1,
                  precompute=dict(name="resnet18_cifar", images=8, batch=4, official_images=2),
                  memory_batch=16, memory_heads=HEADS[:1],
                  bf16_auroc=dict(max_train=1_000, max_test=200, ood_size=50)),
    "quick": dict(heads=HEADS, batches=[256], repeats=5,
                  all_scorers=dict(shapes=((10, 342), (1000, 2048)), batch=256, repeats=2,
                                   rounds=1, train=1024),
                  e2e=[("resnet18_cifar", 32), ("resnet50", 8)], e2e_rounds=3,
                  precompute=dict(name="resnet18_cifar", images=256, batch=64,
                                  official_images=32),
                  memory_batch=256, memory_heads=HEADS,
                  bf16_auroc=dict(max_train=10_000, max_test=2_000, ood_size=1_000)),
    "full": dict(heads=HEADS, batches=[256, 1024, 4096], repeats=9,
                 all_scorers=dict(shapes=((10, 342), (100, 342), (1000, 2048)), batch=1024,
                                  repeats=10, rounds=3, train=4096),
                 e2e=[("resnet18_cifar", 1024), ("resnet50", 256)], e2e_rounds=9,
                 precompute=dict(name="resnet50", images=2048, batch=256, official_images=64),
                 memory_batch=256, memory_heads=HEADS,
                 bf16_auroc=dict(max_train=None, max_test=None, ood_size=2_000)),
}


def _torch_sync(device):
  import torch
  if device == "cuda":
    return lambda _: torch.cuda.synchronize()
  return lambda _: None


def measure_head(num_classes, num_features, p_w, p_a, clip, batches, repeats, with_torch=True):
  """LINe scorer records (`what="scorer"`, `suite="line_head"`) at one head shape."""
  from line_jax import line
  kernel, bias, contrib, state = line_heads.problem(num_classes, num_features, p_w, p_a, clip)
  rng = np.random.default_rng(1)
  records = []

  def record(impl, batch, seconds):
    records.append(dict(what="scorer", suite="line_head", method="line", classes=num_classes,
                        features=num_features, batch=batch, implementation=impl,
                        seconds=seconds, samples_per_s=batch / seconds, p_w=p_w, p_a=p_a,
                        clip=clip))

  torch_impls = {}
  if with_torch:
    import torch
    from benchmarks import torch_reference
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = _torch_sync(device)
    args = (kernel.T, bias, clip, np.array(state.weight_floor), np.array(state.neuron_mask))
    torch_impls["torch_fast_grouped"] = torch_reference.FastTorchLine(*args, device=device)
    if num_classes * num_classes * num_features * 4 <= 1 << 30:
      torch_impls["torch_fast_gather"] = torch_reference.FastTorchLine(*args, mode="gather", device=device)
    official = torch_reference.OfficialLine(kernel.T, bias, contrib, p_w=p_w, p_a=p_a, clip=clip,
                                            lazy=True, device=device)

  for batch in batches:
    features_np = np.abs(rng.normal(size=(batch, num_features))).astype(np.float32)
    features = jax.device_put(features_np)
    for strategy in ("auto", "grouped", "dense"):
      if strategy == "dense" and jax.default_backend() == "cpu" and batch * num_classes * num_features > 2**28:
        continue  # XLA:CPU materialises the dense product: gigabytes at this size
      name = "line_jax" if strategy == "auto" else f"line_jax_{strategy}"
      fn = lambda: line.score(state, features, strategy=strategy)  # noqa: E731
      record(name, batch, timing.median_seconds(fn, repeats=repeats))
    if not with_torch:
      continue
    x = torch.as_tensor(features_np, device=device)
    for name, impl in torch_impls.items():
      record(name, batch, timing.median_seconds(lambda: impl(x), repeats=repeats, sync=sync))
    if batch * num_classes * num_features <= OFFICIAL_MAX_WORK or batch == min(batches):
      # Warm-up builds the masks of the classes predicted (excluded: that is fitting).
      record("torch_official", batch,
             timing.median_seconds(lambda: official(x), repeats=max(1, repeats // 3), warmup=1,
                                   sync=sync))
  return records


def _bf16_note() -> dict:
  return dict(what="note", implementation="-", name="TODO_bf16_auroc_change",
              text="AUROC change of a bfloat16 backbone on the embedded Fashion-MNIST benchmark "
                   "not measured in this run (add --bf16-auroc; needs Debian's Fashion-MNIST "
                   "files). Scorers always run in float32.")


def run_parts(settings: dict, parts, *, bf16: bool, with_torch: bool, on_part=None) -> list[dict]:
  """Runs `parts` with `settings` (a `MODES` value); `on_part(records)` after each."""
  from benchmarks import compiled_stats
  from benchmarks import end_to_end
  from benchmarks import precompute
  records: list[dict] = []
  dtype = "bfloat16" if bf16 else "float32"

  def done(part, started):
    print(f"[{part}: {time.perf_counter() - started:.0f} s]", flush=True)
    if on_part:
      on_part(records)

  for part in parts:
    started = time.perf_counter()
    print(f"== {part} ...", flush=True)
    try:
      if part == "scorer":
        for head in settings["heads"]:
          records += measure_head(*head, batches=settings["batches"],
                                  repeats=settings["repeats"], with_torch=with_torch)
        print(report.line_scorer_table(records), flush=True)
      elif part == "all_scorers" and with_torch:
        from benchmarks import scorer_throughput
        rows = scorer_throughput.run(**settings["all_scorers"])
        records += [dict(r, suite="all_scorers") for r in rows]
        print(report.all_scorers_table(records), flush=True)
      elif part == "end_to_end":
        for name, batch in settings["e2e"]:
          records += end_to_end.measure(name, batch, rounds=settings["e2e_rounds"], bf16=bf16,
                                        with_torch=with_torch)
        print(report.end_to_end_table(records), flush=True)
        if bf16 and "bf16_auroc" not in parts:
          records.append(_bf16_note())
      elif part == "precompute":
        records += precompute.measure(**settings["precompute"], with_torch=with_torch)
        print(report.precompute_table(records), flush=True)
      elif part == "memory":  # memory and kernels come from one compilation
        records += compiled_stats.measure(settings["memory_batch"], settings["memory_heads"])
        print(report.memory_table(records) + "\n\n" + report.kernels_table(records), flush=True)
      elif part == "bf16_auroc":
        from benchmarks import bf16_auroc
        records += bf16_auroc.measure(**settings["bf16_auroc"])
        print(report.auroc_table(records), flush=True)
    except Exception:  # pylint: disable=broad-except
      # One failing part must not cost the others' figures (the GPU time is scarce).
      traceback.print_exc()
      records.append(dict(what="error", implementation="-", part=part,
                          text=traceback.format_exc(limit=3)[-2000:]))
    done(part, started)
  del dtype
  return records


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  size = parser.add_mutually_exclusive_group()
  size.add_argument("--full", action="store_true", help="full sizes (GPU; ResNet-50 precompute)")
  size.add_argument("--smoke", action="store_true", help="tiny sizes: checks the path in seconds")
  parser.add_argument("--bf16", action="store_true", help="bfloat16 backbones end to end")
  parser.add_argument("--json", help="write the result (schema 2) to this file")
  parser.add_argument("--out", help="write DIR/<device-slug>/results.{json,md} and chart.png")
  parser.add_argument("--bf16-auroc", action="store_true",
                      help="also the AUROC change of a bfloat16 backbone (Fashion-MNIST)")
  parser.add_argument("--parts", default=",".join(PARTS[:-1]),
                      help=f"comma list of {PARTS}")
  parser.add_argument("--batches", type=int, nargs="+", help="scorer batches (override)")
  parser.add_argument("--no-torch", action="store_true", help="line_jax only")
  args = parser.parse_args(argv)
  mode = "full" if args.full else "smoke" if args.smoke else "quick"
  settings = dict(MODES[mode])
  if args.batches:
    settings["batches"] = args.batches
  parts = [p for p in args.parts.split(",") if p]
  if args.bf16_auroc and "bf16_auroc" not in parts:
    parts.append("bf16_auroc")
  unknown = set(parts) - set(PARTS)
  if unknown:
    parser.error(f"unknown parts {sorted(unknown)}; choose from {PARTS}")
  env = timing.environment()
  print(f"device: {env['device']} ({env['backend']}), threads: {env['threads']}, mode {mode}",
        flush=True)
  result = {"schema": 2, "environment": env,
            "settings": {"mode": mode, "bf16": args.bf16, "parts": parts,
                         "with_torch": not args.no_torch},
            "records": []}

  def save(records):
    result["records"] = records
    if args.json:
      with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    if args.out:
      report.write(args.out, result)

  started = time.perf_counter()
  run_parts(settings, parts, bf16=args.bf16, with_torch=not args.no_torch, on_part=save)
  result["settings"]["wall_seconds"] = round(time.perf_counter() - started, 1)
  save(result["records"])
  print(f"\ntotal {result['settings']['wall_seconds']:.0f} s", flush=True)
  if args.json:
    print(f"wrote {args.json}")
  if args.out:
    print(f"wrote {report.device_slug(env)} results under {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
