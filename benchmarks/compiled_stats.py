"""What the compiled LINe scorer costs in memory and kernels, per strategy.

    python -m benchmarks.compiled_stats [--json FILE]

For each head shape: bytes of the fitted state, the official code's
`[C, C, m]` masked-weight tensor for comparison, and for each strategy the
compiled scorer's temporary memory (`memory_analysis()`) and the number of
kernels in the optimised HLO (fusions and library calls outside fused
computations, loop bodies included), read from XLA's own output.
"""

from __future__ import annotations

import argparse
import json
import re
import sys

import jax
import numpy as np

from benchmarks import throughput
from benchmarks import timing


def count_kernels(hlo_text: str) -> dict:
  """Kernel-like instructions per kind outside fused computations."""
  counts: dict[str, int] = {}
  in_fused = False
  for line in hlo_text.splitlines():
    header = re.match(r"^\s*(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
    if header and not line.strip().startswith("ROOT"):
      in_fused = header.group(2).startswith(("fused_", "fused.", "wrapped_")) or "fused_computation" in header.group(2)
      continue
    if in_fused:
      continue
    op = re.search(r"=\s*[\w\[\]{},\d\s:()#*]*?\s(fusion|custom-call|sort|dot|convolution|reduce|scatter|gather)\(", line)
    if op:
      counts[op.group(1)] = counts.get(op.group(1), 0) + 1
  counts["total"] = sum(counts.values())
  return counts


def measure(batch: int = 256) -> list[dict]:
  from line_jax import line
  records = []
  for num_classes, num_features, p_w, p_a, clip in throughput.HEADS:
    _, _, _, state = throughput._problem(num_classes, num_features, p_w, p_a, clip)  # pylint: disable=protected-access
    state_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(state))
    base = dict(classes=num_classes, features=num_features, batch=batch)
    records.append(dict(base, what="memory", implementation="line_jax_state", bytes=state_bytes))
    records.append(dict(base, what="memory", implementation="official_masked_weights",
                        bytes=num_classes * num_classes * num_features * 4))
    features = jax.ShapeDtypeStruct((batch, num_features), np.float32)
    for strategy in ("grouped", "dense"):
      compiled = line.score.lower(state, features, strategy=strategy).compile()
      mem = compiled.memory_analysis()
      records.append(dict(base, what="memory", implementation=f"line_jax_{strategy}_temp",
                          bytes=int(mem.temp_size_in_bytes)))
      records.append(dict(base, what="kernels", implementation=f"line_jax_{strategy}",
                          kernels=count_kernels(compiled.as_text())))
  return records


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--json")
  parser.add_argument("--batch", type=int, default=256)
  args = parser.parse_args(argv)
  records = measure(args.batch)
  for r in records:
    value = r.get("bytes", r.get("kernels"))
    if isinstance(value, int):
      value = f"{value / 2**20:,.2f} MiB"
    print(f"{r['classes']:>5} x {r['features']:<5} {r['implementation']:<28} {value}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"schema": 1, "environment": timing.environment(), "records": records}, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
