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

from benchmarks import line_heads
from benchmarks import timing


# Instructions that launch no kernel of their own (bookkeeping, control flow
# whose bodies are counted separately).
_NOT_KERNELS = frozenset((
    "parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while",
    "conditional", "call", "after-all", "partition-id", "replica-id",
    "opt-barrier", "add-dependency", "domain", "iota"))
_MATMUL_OPS = ("dot(", "convolution(", "__cublas", "__cudnn", "gemm", "matmul")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*.*?\s([a-z][\w\-]*)\(")
_CALLEES = re.compile(
    r"(?:body|condition|to_apply|true_computation|false_computation)=%?([\w.\-]+)"
    r"|branch_computations=\{([^}]*)\}|\bcall\(.*calls=%?([\w.\-]+)")


def computations(hlo_text: str) -> tuple[dict[str, list[str]], str]:
  """Computation name -> instruction lines, and the entry computation's name."""
  bodies: dict[str, list[str]] = {}
  entry, current = "", None
  for line in hlo_text.splitlines():
    header = re.match(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
    if header and "=" not in line.split("(")[0]:
      current = header.group(2)
      bodies[current] = []
      if header.group(1):
        entry = current
    elif line.strip() == "}":
      current = None
    elif current is not None:
      bodies[current].append(line)
  return bodies, entry


def count_kernels(hlo_text: str) -> dict:
  """Kernels the optimised HLO launches per call, by kind (static count).

  Walks the computations that run on their own: the entry, loop bodies and
  conditions, conditional branches and called computations; a fusion's
  computation is one kernel and is not entered. A while loop's body counts
  once, however many times it runs. Fusions that wrap a matrix product
  (XLA:CPU's "ynn"/"onednn" library fusions, GPU's cuBLAS/Triton GEMM
  fusions) and library calls (cuBLAS custom calls) count as "matmul"; other
  fusions as "fusion"; anything else that runs (an unfused sort, copy,
  reduce, ...) under its own op name.

  Args:
    hlo_text: `compiled.as_text()` of a jitted function.

  Returns:
    `{kind: count, ..., "total": count}`.
  """
  bodies, entry = computations(hlo_text)
  counts: dict[str, int] = {}
  seen, todo = set(), [entry]
  while todo:
    name = todo.pop()
    if name in seen or name not in bodies:
      continue
    seen.add(name)
    for line in bodies[name]:
      op = _INSTRUCTION.match(line)
      if not op:
        continue
      kind = op.group(1)
      for match in _CALLEES.finditer(line):
        if match.group(2):
          todo += [c.strip().lstrip("%") for c in match.group(2).split(",")]
        else:
          todo.append(match.group(1) or match.group(3))
      if kind in _NOT_KERNELS:
        continue
      if kind == "fusion":
        callee = re.search(r"calls=%?([\w.\-]+)", line)
        inner = "\n".join(bodies.get(callee.group(1), [])) if callee else ""
        kind = "matmul" if any(t in inner or t in line for t in _MATMUL_OPS[:2]) else "fusion"
        if kind == "fusion" and re.search(r"kind=kCustom.*(gemm|matmul)", line):
          kind = "matmul"
      elif kind in ("dot", "convolution") or (
          kind == "custom-call" and any(t in line for t in _MATMUL_OPS[2:])):
        kind = "matmul"
      counts[kind] = counts.get(kind, 0) + 1
  counts["total"] = sum(counts.values())
  return counts


def measure(batch: int = 256, heads=line_heads.HEADS) -> list[dict]:
  """Memory and kernel records for each head of `heads` at `batch`.

  Returns:
    `what="memory"` records (implementation line_jax_state,
    official_masked_weights, line_jax_<strategy>_temp; `bytes`) and
    `what="kernels"` records (implementation line_jax_<strategy>; `kernels`:
    `count_kernels`'s dict), each with classes, features, batch.
  """
  from line_jax import line
  records = []
  for num_classes, num_features, p_w, p_a, clip in heads:
    _, _, _, state = line_heads.problem(num_classes, num_features, p_w, p_a, clip)
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
      json.dump({"schema": 2, "environment": timing.environment(), "records": records}, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
