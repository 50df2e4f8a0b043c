"""Which formulation of a scorer's inner step is fastest on this device.

The scorers pick some formulations by backend (`_select.unrolled`, KNN's
one-block selection, class-major logits on CPU). This benchmark
times the alternatives side by side on one device, with the PyTorch
equivalent, so each choice rests on a measurement of the device it is made
for:

* the k-th largest value per row (ASH, SCALE at 2048 and 342 features, and
  KNN's bank-major affinities): radix selection with rolled or unrolled
  passes (rolled passes counting by a reduction or by a product),
  `lax.top_k`, a full sort; `torch.topk` and `torch.kthvalue`;
* ASH's top-k mask with and without its tie branch;
* the largest logit of a head (all products at float32): as registered,
  over a Flax-layout kernel, with the product kept out of the reduction's
  fusion; PyTorch's
  `linear(...).max(1)`; Energy and MSP against PyTorch for scale. The optimised HLO of the
  registered MaxLogit and Energy is recorded (which fusions XLA chose).

Each variant's result is compared with the first of its group (largest
absolute difference recorded), then all are timed in turns.

    python -m benchmarks.kernel_variants [--out benchmarks/results]

`--out DIR` writes `DIR/<device>/variants.{json,md}`.
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

if __package__ in (None, ""):  # `python benchmarks/kernel_variants.py`
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks import compiled_stats  # pylint: disable=wrong-import-position
from benchmarks import report  # pylint: disable=wrong-import-position
from benchmarks import timing  # pylint: disable=wrong-import-position
from line_jax import _matmul  # pylint: disable=wrong-import-position
from line_jax import scorers  # pylint: disable=wrong-import-position
from line_jax.scorers import _select  # pylint: disable=wrong-import-position
from line_jax.scorers import _shaping  # pylint: disable=wrong-import-position

BATCH = 1024
# (label, rows, columns, k): ASH-P's 90th percentile keeps 205 of 2048 and
# 34 of 342 activations per sample; KNN (k = 50) selects down a bank-major
# `[bank, batch]` affinity block.
SELECTIONS = (("ash 2048", BATCH, 2048, 205), ("ash 342", BATCH, 342, 34),
              ("knn bank 2048", BATCH, 2048, 50),
              ("ash 2048, batch 256", 256, 2048, 205), ("ash 342, batch 256", 256, 342, 34))
HEADS = ((100, 342), (1000, 2048))
_ROLLING = {True: "unrolled", False: "rolled"}


def _torch_device() -> str:
  return "cuda" if torch.cuda.is_available() else "cpu"


def _jax_call(fn, *args):
  jitted = jax.jit(fn)
  return lambda: jitted(*args).block_until_ready(), lambda: np.asarray(jitted(*args))


def _torch_call(fn, *args):
  cuda = _torch_device() == "cuda"

  def call():
    with torch.no_grad():
      out = fn(*args)
    if cuda:
      torch.cuda.synchronize()
    return out

  return call, lambda: call().cpu().numpy()


def _time_group(title: str, variants: dict, samples: int, *, repeats: int,
                rounds: int) -> list[dict]:
  """Compares every variant's result with the first's, then times them in turns.

  A variant that disagrees is still timed; its largest difference is in its
  record and the table (selections should agree exactly; products to float32
  rounding).
  """
  names = list(variants)
  want = variants[names[0]][1]().astype(np.float64)
  differences = {name: float(np.max(np.abs(variants[name][1]().astype(np.float64) - want)))
                 for name in names}
  times = timing.interleaved_blocks([variants[n][0] for n in names], repeats=repeats,
                                    rounds=rounds)
  records = []
  for name, blocks in zip(names, times):
    seconds = statistics.median(t for b in blocks for t in b)
    records.append({"group": title, "variant": name, "samples_per_s": samples / seconds,
                    "microseconds": seconds * 1e6, "max_abs_difference": differences[name]})
  return records


def selections(repeats: int, rounds: int) -> list[dict]:
  """k-th largest per row (per column for KNN's layout), every formulation."""
  rng = np.random.default_rng(0)
  device = _torch_device()
  records = []
  for title, rows, n, k in SELECTIONS:
    x_np = np.abs(rng.normal(size=(rows, n))).astype(np.float32)
    x, xt = jnp.asarray(x_np), torch.from_numpy(x_np).to(device)
    default, other = _select.unrolled(), not _select.unrolled()
    if title.startswith("knn"):  # KNN selects down the columns of `[bank, batch]`
      radix, operand = _select.kth_largest_per_column, jnp.asarray(x_np.T.copy())
    else:
      radix, operand = _select.kth_largest, x
    variants = {
        f"radix {_ROLLING[default]} (registered)": _jax_call(
            lambda v: radix(v, k, unroll=default), operand),
        f"radix {_ROLLING[other]}": _jax_call(
            lambda v: radix(v, k, unroll=other), operand),
        # How the rolled passes count (`_select.COUNT_BY_PRODUCT_COLUMNS`).
        "radix rolled, counts by reduction": _jax_call(
            lambda v: radix(v, k, unroll=False, count_by_product=False), operand),
        "radix rolled, counts by product": _jax_call(
            lambda v: radix(v, k, unroll=False, count_by_product=True), operand),
        # The k-th of `top_k`'s values at a traced index, as KNN reads it: a
        # static slice of them (`[:, -1]`) makes XLA:CPU run a full sort instead.
        "lax.top_k": _jax_call(lambda v, i: jax.lax.dynamic_index_in_dim(
            jax.lax.top_k(v, k)[0], i, axis=1, keepdims=False), x, jnp.int32(k - 1)),
        "lax.top_k, static slice": _jax_call(lambda v: jax.lax.top_k(v, k)[0][:, -1], x),
        "sort": _jax_call(lambda v: jnp.sort(v, axis=1)[:, n - k], x),
        "torch.topk": _torch_call(lambda v: torch.topk(v, k, dim=1).values[:, -1], xt),
        "torch.kthvalue": _torch_call(lambda v: torch.kthvalue(v, n - k + 1, dim=1).values, xt),
    }
    records += _time_group(f"k-th largest, {title}", variants, rows, repeats=repeats,
                           rounds=rounds)
  return records


def masks(repeats: int, rounds: int) -> list[dict]:
  """ASH's exact top-k mask: the tie branch and the unrolling, both ways."""
  rng = np.random.default_rng(1)
  device = _torch_device()
  x_np = np.abs(rng.normal(size=(BATCH, 2048))).astype(np.float32)
  k = 205
  x, xt = jnp.asarray(x_np), torch.from_numpy(x_np).to(device)

  def torch_mask(v):
    return torch.zeros_like(v, dtype=torch.bool).scatter_(1, torch.topk(v, k, dim=1).indices, True)

  rolling = _select.unrolled()
  variants = {}
  for branch, unroll in ((True, rolling), (False, rolling), (True, not rolling)):
    label = f"{'with' if branch else 'without'} tie branch, {_ROLLING[unroll]}"
    variants[label + (" (registered)" if not variants else "")] = _jax_call(
        functools.partial(_shaping.top_k_mask, k=k, branch=branch, unroll=unroll), x)
  variants["torch topk + scatter"] = _torch_call(torch_mask, xt)
  return _time_group("ASH top-k mask, 2048 features", variants, BATCH, repeats=repeats,
                     rounds=rounds)


def _hlo_summary(fn, *args) -> list[str]:
  """The optimised entry computation's instructions, one line each, shortened."""
  bodies, entry = compiled_stats.computations(jax.jit(fn).lower(*args).compile().as_text())
  return [line.strip().split(", metadata=")[0][:200] for line in bodies[entry] if "=" in line]


def heads(repeats: int, rounds: int) -> tuple[list[dict], dict]:
  """The largest logit formulated three ways, and Energy and MSP, each against PyTorch."""
  rng = np.random.default_rng(2)
  device = _torch_device()
  records, hlo = [], {}
  for num_classes, num_features in HEADS:
    kernel = (rng.normal(size=(num_features, num_classes)) / np.sqrt(num_features)).astype(np.float32)
    bias = (0.1 * rng.normal(size=num_classes)).astype(np.float32)
    h_np = np.abs(rng.normal(size=(BATCH, num_features))).astype(np.float32)
    h = jnp.asarray(h_np)
    # Each scorer scores only its own state (the registry checks whose it is).
    states = {name: scorers.get(name).fit(h_np[:num_classes], None, kernel, bias)
              for name in ("maxlogit", "energy", "msp")}
    state = states["maxlogit"]
    k, b = jnp.asarray(kernel), jnp.asarray(bias)
    w_t, b_t, h_t = (torch.from_numpy(a).to(device) for a in (kernel.T.copy(), bias, h_np))

    def barrier(s, v):
      return jnp.max(jax.lax.optimization_barrier(_matmul.dot(v, s.weight.T) + s.bias), axis=1)

    variants = {
        "maxlogit (registered)": _jax_call(scorers.get("maxlogit").score, state, h),
        "maxlogit, kernel [F, C]": _jax_call(
            lambda kk, bb, v: jnp.max(_matmul.dot(v, kk) + bb, axis=1), k, b, h),
        "maxlogit, product unfused": _jax_call(barrier, state, h),
        "torch linear + max": _torch_call(
            lambda v: torch.nn.functional.linear(v, w_t, b_t).max(dim=1).values, h_t),
    }
    title = f"MaxLogit, {num_classes} x {num_features}"
    records += _time_group(title, variants, BATCH, repeats=repeats, rounds=rounds)
    energy = {
        "energy (registered)": _jax_call(scorers.get("energy").score, states["energy"], h),
        "torch linear + logsumexp": _torch_call(
            lambda v: torch.logsumexp(torch.nn.functional.linear(v, w_t, b_t), dim=1), h_t),
    }
    records += _time_group(f"Energy, {num_classes} x {num_features}", energy, BATCH,
                           repeats=repeats, rounds=rounds)
    msp = {
        "msp (registered)": _jax_call(scorers.get("msp").score, states["msp"], h),
        "torch linear + softmax + max": _torch_call(
            lambda v: torch.softmax(torch.nn.functional.linear(v, w_t, b_t), dim=1).max(dim=1).values,
            h_t),
    }
    records += _time_group(f"MSP, {num_classes} x {num_features}", msp, BATCH,
                           repeats=repeats, rounds=rounds)
    for name in ("maxlogit", "energy"):
      hlo[f"{name} {num_classes} x {num_features}"] = _hlo_summary(
          scorers.get(name).score, states[name], h)
  return records, hlo


def table(records: list[dict]) -> str:
  """Markdown: per group, each variant's time and speed relative to the first."""
  lines = ["| group | variant | us per call | samples/s | vs first | max abs difference |",
           "|---|---|---|---|---|---|"]
  first = {}
  for r in records:
    base = first.setdefault(r["group"], r["microseconds"])
    lines.append(f"| {r['group']} | {r['variant']} | {r['microseconds']:,.1f} | "
                 f"{r['samples_per_s']:,.0f} | {base / r['microseconds']:.2f}x | "
                 f"{r['max_abs_difference']:.2g} |")
  return "\n".join(lines)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", help="write <out>/<device>/variants.{json,md}")
  parser.add_argument("--rounds", type=int, default=5, help="blocks per variant")
  parser.add_argument("--repeats", type=int, default=20, help="timed calls per block")
  args = parser.parse_args(argv)
  start = time.perf_counter()
  jax.config.update("jax_cpu_enable_async_dispatch", False)  # as scorer_throughput
  records = selections(args.repeats, args.rounds) + masks(args.repeats, args.rounds)
  head_records, hlo = heads(args.repeats, args.rounds)
  records += head_records
  env = timing.environment()
  markdown = table(records)
  footer = (f"{jax.default_backend()} backend ({env['device']}), batch {BATCH}, rounds "
            f"{args.rounds} x {args.repeats} calls, {time.perf_counter() - start:.0f} s")
  print(markdown + "\n\n" + footer)
  for name, lines in hlo.items():
    print(f"\noptimised HLO, {name}:\n  " + "\n  ".join(lines))
  if args.out:
    folder = report.write_table(
        args.out, "variants",
        {"environment": env, "settings": {"rounds": args.rounds, "repeats": args.repeats,
                                          "batch": BATCH},
         "records": records, "optimised_hlo": hlo},
        title="Formulations of scorer steps, side by side",
        command=f"python -m benchmarks.kernel_variants --out {args.out}",
        footer=footer, table=markdown)
    print(f"wrote {folder}/variants.json and variants.md")


if __name__ == "__main__":
  main()
