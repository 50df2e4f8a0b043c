"""What a bfloat16 backbone costs in detection quality (embedded benchmark).

Runs `line_jax.runs.evaluate.run` on the default Fashion-MNIST
benchmark (committed checkpoint, embedded OOD sets) twice, with the network
computing in float32 and in bfloat16 (`dtype`), the scorers in float32 both
times, and records each method's average AUROC and FPR95 and the change.
Needs Debian's Fashion-MNIST files (`make system-deps`).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp


def measure(methods=("energy", "line"), *, max_train: int | None = 10_000,
            max_test: int | None = 2_000, ood_size: int = 1_000) -> list[dict]:
  """`what="auroc"` records: method, dtype, auroc, fpr95 (averages over OOD sets),
  auroc_change (bfloat16 minus float32, on the bfloat16 record), and the sizes."""
  from line_jax import runs
  from line_jax import suites
  inputs = suites.fashion_mnist_inputs(max_train=max_train, max_test=max_test,
                                       ood_size=ood_size)
  config = runs.evaluate.Config(runs.BenchmarkData(batch_size=512), scorers=tuple(methods),
                                plots=False)
  results = {}
  for dtype in ("float32", "bfloat16"):
    backbone = inputs.backbone
    run = dataclasses.replace(inputs, backbone=dataclasses.replace(
        backbone, model=backbone.model.clone(dtype=getattr(jnp, dtype))))
    results[dtype] = runs.evaluate.run(config, None, inputs=run,
                                       runtime=runs.Runtime(progress=False))
  records = []
  for method in methods:
    for dtype, result in results.items():
      average = result["methods"][method]["average"]
      record = dict(what="auroc", implementation=f"line_jax_{dtype}", method=method, dtype=dtype,
                    benchmark="fashion_mnist", train=max_train, test=max_test, ood_size=ood_size,
                    id_accuracy=result["id_accuracy"], auroc=average["auroc"],
                    fpr95=average["fpr95"])
      if dtype == "bfloat16":
        record["auroc_change"] = average["auroc"] - results["float32"]["methods"][method][
            "average"]["auroc"]
      records.append(record)
  return records
