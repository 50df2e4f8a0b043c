"""Results of `benchmarks.throughput` as files: JSON, markdown tables, a chart.

`write(directory, result)` writes `results.json`, `results.md` and
`chart.png` into `directory/<device-slug>/` (e.g. `benchmarks/results/cpu/`,
`benchmarks/results/nvidia-h200/`). The JSON schema is documented in
`benchmarks/throughput.py`.
"""

from __future__ import annotations

import json
import os
import re

IMPL_ORDER = ("line_jax", "line_jax_grouped", "line_jax_dense", "torch_fast_grouped",
              "torch_fast_gather", "torch_official")


def device_slug(environment: dict) -> str:
  """'NVIDIA H200' -> 'nvidia-h200'; the CPU backend -> 'cpu'."""
  if environment.get("backend") == "cpu":
    return "cpu"
  return re.sub(r"[^a-z0-9]+", "-", environment["device"].lower()).strip("-")


def _fmt(value, digits=0) -> str:
  if value is None:
    return "-"
  return f"{value:,.{digits}f}"


def _ratio(num, den) -> str:
  return f"{num / den:.2f}x" if num and den else "-"


def _of(records, what, suite=None):
  return [r for r in records if r["what"] == what and (suite is None or r.get("suite") == suite)]


def line_scorer_rows(records) -> list[dict]:
  """Per head and batch: line_jax against the best PyTorch and the official style."""
  records = _of(records, "scorer", "line_head")
  rows = []
  for c, m, b in sorted({(r["classes"], r["features"], r["batch"]) for r in records}):
    at = {r["implementation"]: r["samples_per_s"] for r in records
          if (r["classes"], r["features"], r["batch"]) == (c, m, b)}
    fast = max((v for k, v in at.items() if k.startswith("torch_fast")), default=None)
    rows.append(dict(classes=c, features=m, batch=b, at=at, torch_fast_best=fast,
                     x_vs_torch_fast=at["line_jax"] / fast if fast else None,
                     x_vs_official=(at["line_jax"] / at["torch_official"]
                                    if at.get("torch_official") else None)))
  return rows


def line_scorer_table(records) -> str:
  present = {r["implementation"] for r in _of(records, "scorer", "line_head")}
  impls = [i for i in IMPL_ORDER if i in present]
  lines = ["| classes x features | batch | " + " | ".join(impls) + " | vs torch best | vs official |",
           "|---|---|" + "---|" * (len(impls) + 2)]
  for row in line_scorer_rows(records):
    cells = [_fmt(row["at"].get(i)) for i in impls]
    best = f"{row['x_vs_torch_fast']:.1f}x" if row["x_vs_torch_fast"] else "-"
    official = f"{row['x_vs_official']:.1f}x" if row["x_vs_official"] else "-"
    lines.append(f"| {row['classes']} x {row['features']} | {row['batch']} | "
                 + " | ".join(cells) + f" | {best} | {official} |")
  return "\n".join(lines)


def all_scorers_table(records) -> str:
  rows: dict = {}
  for r in _of(records, "scorer", "all_scorers"):
    rows.setdefault((r["method"], r["classes"], r["features"], r["batch"]), {})[
        r["implementation"]] = r["samples_per_s"]
  lines = ["| method | classes x features | batch | line_jax | torch | ratio |",
           "|---|---|---|---|---|---|"]
  for (method, c, m, b), at in rows.items():
    lines.append(f"| {method} | {c} x {m} | {b} | {_fmt(at.get('line_jax'))} | "
                 f"{_fmt(at.get('torch'))} | {_ratio(at.get('line_jax'), at.get('torch'))} |")
  return "\n".join(lines)


def end_to_end_rows(records) -> list[dict]:
  rows = []
  records = _of(records, "end_to_end")
  for key in dict.fromkeys((r["model"], r["image_size"], r["dtype"], r["batch"]) for r in records):
    at = {r["implementation"]: r["samples_per_s"] for r in records
          if (r["model"], r["image_size"], r["dtype"], r["batch"]) == key}
    torch_line = max((at[k] for k in ("torch_line_fast", "torch_line_official") if k in at),
                     default=None)
    rows.append(dict(model=key[0], image_size=key[1], dtype=key[2], batch=key[3], at=at,
                     jax_line_over_energy=_div(at.get("line_jax_line"), at.get("line_jax_energy")),
                     torch_line_over_energy=_div(torch_line, at.get("torch_energy")),
                     jax_line_over_torch_line=_div(at.get("line_jax_line"), torch_line),
                     jax_line_over_official=_div(at.get("line_jax_line"),
                                                 at.get("torch_line_official"))))
  return rows


def _div(num, den):
  return num / den if num and den else None


def end_to_end_table(records) -> str:
  impls = ("line_jax_energy", "line_jax_line", "torch_energy", "torch_line_fast",
           "torch_line_official")
  lines = ["| model | input | dtype | batch | " + " | ".join(impls)
           + " | LINe/Energy line_jax (goal >= 0.95) | LINe/Energy torch best "
           "| line_jax LINe / torch best LINe | line_jax LINe / official |",
           "|---|---|---|---|" + "---|" * (len(impls) + 4)]
  x = lambda v: f"{v:.2f}x" if v else "-"  # noqa: E731
  for row in end_to_end_rows(records):
    cells = [_fmt(row["at"].get(i), 1) for i in impls]
    lines.append(f"| {row['model']} | {row['image_size']}x{row['image_size']} | {row['dtype']} | "
                 f"{row['batch']} | " + " | ".join(cells)
                 + f" | {x(row['jax_line_over_energy'])} | {x(row['torch_line_over_energy'])} | "
                 f"{x(row['jax_line_over_torch_line'])} | {x(row['jax_line_over_official'])} |")
  return "\n".join(lines)


def precompute_table(records) -> str:
  lines = ["| model | input | implementation | dtype | images | batch | images/s | "
           "ImageNet 1.28 M (extrapolated) | speed-up vs official (goal >= 50x) |",
           "|---|---|---|---|---|---|---|---|---|"]
  records = _of(records, "precompute")
  for r in records:
    official = next((o["samples_per_s"] for o in records if o["model"] == r["model"]
                     and o["implementation"] == "torch_official_batch1"), None)
    hours = r["imagenet_seconds"] / 3600
    lines.append(f"| {r['model']} | {r['image_size']}x{r['image_size']} | {r['implementation']} | "
                 f"{r['dtype']} | {r['images']} | {r['batch']} | {_fmt(r['samples_per_s'], 1)} | "
                 f"{r['imagenet_seconds']:,.0f} s ({hours:.1f} h) | "
                 f"{_ratio(r['samples_per_s'], official)} |")
  diffs = [r["max_rel_diff"] for r in records if "max_rel_diff" in r]
  if diffs:
    lines.append(f"\nOfficial-style and line_jax contributions agree on the official run's "
                 f"images to a relative {max(diffs):.1e} (max over entries).")
  return "\n".join(lines)


def memory_table(records) -> str:
  lines = ["| classes x features | batch | line_jax state | grouped temp | dense temp | "
           "official [C, C, m] | official / state |", "|---|---|---|---|---|---|---|"]
  records = _of(records, "memory")
  mib = lambda v: f"{v / 2**20:,.2f} MiB" if v is not None else "-"  # noqa: E731
  for c, m, b in dict.fromkeys((r["classes"], r["features"], r["batch"]) for r in records):
    at = {r["implementation"]: r["bytes"] for r in records
          if (r["classes"], r["features"], r["batch"]) == (c, m, b)}
    state, official = at.get("line_jax_state"), at.get("official_masked_weights")
    lines.append(f"| {c} x {m} | {b} | {mib(state)} | {mib(at.get('line_jax_grouped_temp'))} | "
                 f"{mib(at.get('line_jax_dense_temp'))} | {mib(official)} | "
                 f"{_ratio(official, state)} |")
  return "\n".join(lines)


def kernels_table(records) -> str:
  lines = ["| classes x features | batch | strategy | kernels | by kind |", "|---|---|---|---|---|"]
  for r in _of(records, "kernels"):
    kinds = ", ".join(f"{k} {v}" for k, v in r["kernels"].items() if k != "total")
    lines.append(f"| {r['classes']} x {r['features']} | {r['batch']} | "
                 f"{r['implementation']} | {r['kernels']['total']} | {kinds} |")
  return "\n".join(lines)


def auroc_table(records) -> str:
  lines = ["| method | backbone dtype | train / test / per OOD set | ID accuracy | AUROC | FPR95 | "
           "AUROC change |", "|---|---|---|---|---|---|---|"]
  for r in _of(records, "auroc"):
    change = f"{100 * r['auroc_change']:+.2f} pt" if "auroc_change" in r else "-"
    lines.append(f"| {r['method']} | {r['dtype']} | {r['train']} / {r['test']} / {r['ood_size']} | "
                 f"{100 * r['id_accuracy']:.2f} % | {100 * r['auroc']:.2f} % | "
                 f"{100 * r['fpr95']:.2f} % | {change} |")
  return "\n".join(lines)


def markdown(result: dict) -> str:
  env = result["environment"]
  versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
  threads = ", ".join(f"{k} {v}" for k, v in env["threads"].items())
  parts = [f"# line_jax benchmark: {env['device']} ({env['backend']})",
           f"{versions}; threads: {threads}; settings: {result.get('settings', {})}.",
           "samples/s are medians of repeats after warm-up, every call synchronised; "
           "ratios are within this one run."]
  sections = (("LINe scorer, features -> scores (samples/s)", "scorer", line_scorer_table),
              ("Every scorer, line_jax vs PyTorch (samples/s)", "scorer", all_scorers_table),
              ("End to end, images -> scores (images/s)", "end_to_end", end_to_end_table),
              ("Precompute: contributions from training images", "precompute", precompute_table),
              ("Memory", "memory", memory_table),
              ("Kernels the compiled scorer launches (optimised HLO)", "kernels", kernels_table),
              ("bfloat16 backbone: detection quality (Fashion-MNIST, embedded OOD sets)", "auroc",
               auroc_table))
  for title, what, table in sections:
    body = table(result["records"])
    if _of(result["records"], what) and body.count("\n") > 1:
      parts.append(f"## {title}\n\n{body}")
  notes = _of(result["records"], "note")
  if notes:
    parts.append("## Notes\n\n" + "\n".join(f"* {n['name']}: {n['text']}" for n in notes))
  return "\n\n".join(parts) + "\n"


def ratios(records) -> list[tuple[str, float]]:
  """(label, ratio) pairs for the chart: line_jax over its comparison."""
  out = []
  for row in line_scorer_rows(records):
    if row["x_vs_torch_fast"]:
      out.append((f"scorer {row['classes']}x{row['features']} b{row['batch']}: vs torch best",
                  row["x_vs_torch_fast"]))
  for row in end_to_end_rows(records):
    tag = f"e2e {row['model']} {row['dtype']} b{row['batch']}"
    if row["jax_line_over_energy"]:
      out.append((f"{tag}: LINe / Energy", row["jax_line_over_energy"]))
    if row["jax_line_over_torch_line"]:
      out.append((f"{tag}: vs torch best LINe", row["jax_line_over_torch_line"]))
  pre = _of(records, "precompute")
  for r in pre:
    official = next((o for o in pre if o["model"] == r["model"]
                     and o["implementation"] == "torch_official_batch1"), None)
    if official and r is not official:
      out.append((f"precompute {r['model']} {r['implementation']}: vs official",
                  r["samples_per_s"] / official["samples_per_s"]))
  return out


def chart(result: dict, path: str) -> None:
  """Horizontal bars of `ratios` on a log axis; 1x marked."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  pairs = ratios(result["records"])
  fig, ax = plt.subplots(figsize=(9, 0.32 * len(pairs) + 1.5))
  if pairs:
    labels, values = zip(*pairs)
    # Green where the goal is met: LINe keeps >= 0.95x Energy; elsewhere faster than the comparison.
    goals = [0.95 if "LINe / Energy" in label else 1.0 for label in labels]
    ax.barh(range(len(values)), values,
            color=["tab:green" if v >= g else "tab:red" for v, g in zip(values, goals)])
    ax.set_yticks(range(len(values)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    for i, v in enumerate(values):
      ax.text(v, i, f" {v:.2f}x", va="center", fontsize=7)
  ax.axvline(1.0, color="black", linewidth=0.8)
  ax.set_xlabel("samples/s ratio, line_jax over comparison (log scale; green: goal met)")
  ax.set_title(f"line_jax on {result['environment']['device']}", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write(directory: str, result: dict) -> str:
  """Writes results.json, results.md and chart.png; returns the folder."""
  folder = os.path.join(directory, device_slug(result["environment"]))
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "results.json"), "w") as f:
    json.dump(result, f, indent=1)
  with open(os.path.join(folder, "results.md"), "w") as f:
    f.write(markdown(result))
  chart(result, os.path.join(folder, "chart.png"))
  return folder


def write_table(directory: str, stem: str, payload: dict, *, title: str, command: str,
                footer: str, table: str) -> str:
  """Writes `<stem>.json` (`payload`) and `<stem>.md` into `directory/<device-slug>/`.

  For the side benchmarks (`scorer_throughput`, `kernel_variants`): `payload`
  holds an "environment" entry; the markdown is `# title`, the command and
  `footer` on one line, then `table`. Returns the folder.
  """
  folder = os.path.join(directory, device_slug(payload["environment"]))
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, f"{stem}.json"), "w") as f:
    json.dump(payload, f, indent=1)
    f.write("\n")
  with open(os.path.join(folder, f"{stem}.md"), "w") as f:
    f.write(f"# {title}\n\n`{command}`; {footer}.\n\n{table}\n")
  return folder
