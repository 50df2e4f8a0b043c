"""LINe scorer throughput: line_jax against PyTorch, features -> scores.

    python -m benchmarks.throughput [--json FILE] [--batches 256 1024 4096]

Measures the scorer alone at the three head shapes of the paper (CIFAR-10 and
CIFAR-100 DenseNet heads, ImageNet ResNet-50 head) with the official
hyperparameters, on identical inputs, for:

* line_jax (`line_jax.line.score`, and each of its strategies);
* "torch_official": the official code's per-sample loop with dense per-class
  masks and a host argmax (only at small batches: it is slow);
* "torch_fast_*": the fastest PyTorch versions we could write (grouped by
  predicted class; gathered precomputed heads where they fit).

Ratios are taken within this one run. Features are |N(0, 1)| at random with a
random head, so predicted classes spread over all classes.
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import numpy as np

from benchmarks import timing

# (classes, features, p_w, p_a, clip): the official demo scripts' settings.
HEADS = (
    (10, 342, 90, 90, 1.0),
    (100, 342, 90, 10, 1.0),
    (1000, 2048, 10, 10, 0.8),
)
OFFICIAL_MAX_WORK = 256 * 100 * 342 * 8  # official loop only where one batch stays quick


def _problem(num_classes, num_features, p_w, p_a, clip, seed=0):
  from line_jax import line
  rng = np.random.default_rng(seed)
  kernel = (rng.normal(size=(num_features, num_classes)) / np.sqrt(num_features)).astype(np.float32)
  bias = (0.1 * rng.normal(size=num_classes)).astype(np.float32)
  contrib = np.abs(rng.normal(size=(num_classes, num_features))) * rng.normal(size=(num_classes, num_features))
  state = line.fit_from_contributions(contrib, kernel, bias, p_w=p_w, p_a=p_a, clip=clip)
  return kernel, bias, contrib, state


def _torch_sync(device):
  import torch
  if device == "cuda":
    return lambda _: torch.cuda.synchronize()
  return lambda _: None


def measure_head(num_classes, num_features, p_w, p_a, clip, batches, repeats, with_torch=True):
  """Records `{what, classes, features, batch, implementation, samples_per_s}`."""
  from line_jax import line
  kernel, bias, contrib, state = _problem(num_classes, num_features, p_w, p_a, clip)
  rng = np.random.default_rng(1)
  records = []

  def record(impl, batch, seconds):
    records.append(dict(what="scorer", classes=num_classes, features=num_features, batch=batch,
                        implementation=impl, seconds=seconds, samples_per_s=batch / seconds,
                        p_w=p_w, p_a=p_a, clip=clip))

  torch_impls = {}
  if with_torch:
    import torch
    from benchmarks import torch_reference
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = _torch_sync(device)
    args = (kernel.T, bias, clip, np.asarray(state.weight_floor), np.asarray(state.neuron_mask))
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


def summarise(records) -> list[dict]:
  """Per head and batch: line_jax against the best PyTorch and the official style."""
  rows = []
  keys = sorted({(r["classes"], r["features"], r["batch"]) for r in records})
  for c, m, b in keys:
    at = {r["implementation"]: r["samples_per_s"] for r in records
          if (r["classes"], r["features"], r["batch"]) == (c, m, b) and r["what"] == "scorer"}
    fast = max((v for k, v in at.items() if k.startswith("torch_fast")), default=None)
    row = dict(classes=c, features=m, batch=b, line_jax=at.get("line_jax"),
               torch_fast_best=fast, torch_official=at.get("torch_official"))
    row["x_vs_torch_fast"] = at["line_jax"] / fast if fast else None
    row["x_vs_official"] = at["line_jax"] / at["torch_official"] if at.get("torch_official") else None
    rows.append(row)
  return rows


def format_table(records) -> str:
  impls = []
  for r in records:
    if r["implementation"] not in impls:
      impls.append(r["implementation"])
  lines = ["| classes x features | batch | " + " | ".join(impls) + " | vs torch best | vs official |",
           "|---|---|" + "---|" * (len(impls) + 2)]
  for row in summarise(records):
    c, m, b = row["classes"], row["features"], row["batch"]
    at = {r["implementation"]: r["samples_per_s"] for r in records
          if (r["classes"], r["features"], r["batch"]) == (c, m, b)}
    cells = [f"{at[i]:,.0f}" if i in at else "-" for i in impls]
    ratio = lambda v: f"{v:.1f}x" if v else "-"  # noqa: E731
    lines.append(f"| {c} x {m} | {b} | " + " | ".join(cells)
                 + f" | {ratio(row['x_vs_torch_fast'])} | {ratio(row['x_vs_official'])} |")
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--json", help="write all figures with device and versions to this file")
  parser.add_argument("--batches", type=int, nargs="+", default=[256, 1024, 4096])
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--heads", default="all", help="'all' or comma list of classes, e.g. 10,100")
  parser.add_argument("--no-torch", action="store_true", help="line_jax only")
  args = parser.parse_args(argv)
  env = timing.environment()
  print(f"device: {env['device']} ({env['backend']}), threads: {env['threads']}", flush=True)
  heads = HEADS if args.heads == "all" else [h for h in HEADS if str(h[0]) in args.heads.split(",")]
  records = []
  for head in heads:
    print(f"measuring head {head[0]} x {head[1]} ...", flush=True)
    records += measure_head(*head, batches=args.batches, repeats=args.repeats,
                            with_torch=not args.no_torch)
  print("\nsamples/s (median of repeats; higher is better)\n")
  print(format_table(records))
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"schema": 1, "environment": env, "records": records,
                 "summary": summarise(records)}, f, indent=1)
    print(f"\nwrote {args.json}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
