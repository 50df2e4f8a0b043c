"""What an OpenOOD protocol run writes and says.

Files (each whole or not at all), in a folder that holds nothing else:

* `metrics.json`: `{"benchmark", "data_dir", "model", "id_accuracy",
  "settings", "sets": {set: {"list", "listed", "used", "group"} (yours:
  "path")}, "absent": {set: why}, "groups": {"near" / "far": {"sets",
  "absent", "yours"}}, "hparams": {"untuned", "tuned"}, "selection":
  {scorer: {"hparams", "validation", "selected_on", ...}}, "methods":
  {scorer: {set: metrics, "near", "far"}} (untuned), "tuned": (the same,
  tuned)}`; "near" / "far" average the protocol's sets present, and with sets
  of yours in a group "near_all" / "far_all" average them too; metrics are
  fractions: "auroc", "fpr95", "aupr_in", "aupr_out";
* `table.md`: what the run read, then AUROC and FPR95 (%) per set and
  averaged near and far, untuned and tuned rows, and the selected points;
* `timings.json`: each stage's wall time and the feature extraction rate;
* `near_far.png`: near- vs far-OOD AUROC of every method, untuned to tuned;
* `roc.png` (untuned ROC curves); with the ablation `ablation.json`,
  `ablation.md`.
"""

from __future__ import annotations

from collections.abc import Mapping
import os
import sys
from typing import Any

from line_jax import distributed
from line_jax import plots
from line_jax.runs import _report
from line_jax.runs import _shared

OWN_FILES = ("metrics.json", "timings.json", "table.md", "near_far.png", "roc.png",
             "ablation.json", "ablation.md")
OWN_MARKS = {"metrics.json": _shared.has_keys("benchmark", "sets", "methods")}
GROUPS = ("near", "far")
# FPR95 is the classic one (the DICE / LINe code's, and OpenOOD's metrics
# before its code switched to OOD as the positive class): the share of OOD
# images accepted at the threshold that keeps 95 % of ID images. AUROC is the
# same under either convention; FPR95 is not.
FPR_NOTE = ("FPR95: the fraction of OOD images kept at the threshold that keeps 95 % of "
            "ID images (ID positive; OpenOOD's current code takes OOD as positive, which "
            "changes FPR95, not AUROC).")


def say_coverage(coverage: Mapping[str, Mapping[str, Any]], absent: Mapping[str, str]) -> None:
  """Prints (process 0, whatever `--quiet`) every set read short of its list,
  and every set skipped: a run over part of the benchmark says so."""
  if not distributed.is_primary():
    return
  lines = [_describe(name, c) for name, c in coverage.items()
           if "listed" in c and c["used"] < c["listed"]]
  lines += [f"{name}: skipped, {why}" for name, why in absent.items()]
  if lines:
    print("OpenOOD sets read in part or not at all:\n  " + "\n  ".join(lines),
          file=sys.stderr, flush=True)


def _describe(name: str, c: Mapping[str, Any]) -> str:
  if "listed" not in c:
    return f"{name}: {c['used']:,} images ({c['path']}, yours)"
  return f"{name}: {c['used']:,} of {c['listed']:,} listed images ({c['list']})"


def _columns(result: Mapping[str, Any]) -> list[tuple[str, str]]:
  """`(key, header)` of the columns: each group's sets, then its average
  ("near (1 of 2)" where some of the protocol's are absent), then with sets
  of yours the average over all."""
  first = next(iter(result["methods"].values()))
  columns = []
  for group in GROUPS:
    g = result["groups"][group]
    columns += [(n, n) for n in g["sets"]] + [(n, f"{n} (yours)") for n in g["yours"]]
    if group in first:
      listed = len(g["sets"]) + len(g["absent"])
      columns.append((group, f"**{group}**" if not g["absent"] else
                      f"**{group}** ({len(g['sets'])} of {listed})"))
    if f"{group}_all" in first:
      columns.append((f"{group}_all", f"{group}, with yours"))
  return columns


def _whose(settings: str) -> str:
  return ("the registry defaults (each paper's setting)" if settings == "none"
          else f"the {settings} benchmark's settings (docs/suites.md)")


def format_table(result: Mapping[str, Any]) -> str:
  """Markdown: what was read, AUROC and FPR95 tables, and the selected points."""
  model = result["model"]
  network = (f"{model['arch']} from {os.path.basename(model['torch_checkpoint'])} "
             f"(normalisation {model['normalization']})" if "arch" in model
             else f"line_jax checkpoint {model['checkpoint']}")
  lines = [f"# {result['benchmark']}", "",
           f"Network: {network}. ID accuracy (ID test list): "
           f"{100 * result['id_accuracy']:.2f} %. Untuned rows: {_whose(result['settings'])}; "
           "tuned rows: OpenOOD's search on the validation lists only (below).", "",
           "Sets read:", ""]
  lines += [f"- {_describe(n, c)}, {c['group']}" for n, c in result["sets"].items()]
  lines += [f"- {n}: skipped, {why}" for n, why in result["absent"].items()]
  columns = _columns(result)
  rows = [(name, rows) for name, rows in result["methods"].items()]
  rows += [(f"{name} (tuned)", rows) for name, rows in result.get("tuned", {}).items()]
  for key, title in (("auroc", "AUROC % (higher is better)"),
                     ("fpr95", "FPR95 % (lower is better)")):
    lines += ["", f"## {title}", "", "| method | " + " | ".join(h for _, h in columns) + " |",
              "|---|" + "---:|" * len(columns)]
    for name, by_set in rows:
      cells = [f"{100 * by_set[c][key]:.2f}" if c in by_set else "-" for c, _ in columns]
      lines.append(f"| {name} | " + " | ".join(cells) + " |")
  if result.get("selection"):
    first = next(iter(result["selection"].values()))["selected_on"]
    lines += ["", f"## Selected on {first['id']} vs {', '.join(first['ood'])} "
              f"(fitted on {first['fitted_on']}, best {first['metric'].upper()})", "",
              "| method | selected (the names searched) | validation AUROC % | grid |",
              "|---|---|---:|---:|"]
    for name, s in result["selection"].items():
      shown = {k: s["hparams"][k] for k in s["searched"]}
      shown.update({k: v for k, v in s["percentiles"].items() if k[:-len("_percentile")] in shown})
      point = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in shown.items()) or "(nothing to search)"
      if s["pinned"]:
        point += f" ({', '.join(s['pinned'])}: yours, not searched)"
      lines.append(f"| {name} | {point} | {100 * s['validation']['auroc']:.2f} | "
                   f"{s['grid_size']} |")
  lines += ["", FPR_NOTE + " AUPR-in / AUPR-out are in metrics.json."]
  return "\n".join(lines) + "\n"


def format_ablation(tables: Mapping[str, Mapping[str, Any]]) -> str:
  """Markdown: LINe's variants, near and far AUROC / FPR95 (%), per setting."""
  lines = []
  for kind, table in tables.items():
    s = table["settings"]
    groups = [g for g in GROUPS if g in next(iter(table["variants"].values()))["metrics"]]
    lines += [f"## LINe's ablation, {kind}: p_w = {s['p_w']}, p_a = {s['p_a']}, "
              f"clip = {s['clip']:.4g}", "",
              "| variant | " + " | ".join(f"{g} AUROC | {g} FPR95" for g in groups) + " |",
              "|---|" + "---:|" * (2 * len(groups))]
    for name, v in table["variants"].items():
      cells = [f"{100 * v['metrics'][g]['auroc']:.2f} | {100 * v['metrics'][g]['fpr95']:.2f}"
               for g in groups]
      lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
  return "\n".join(lines)


def timings(cached: Mapping[str, Any], stages: Mapping[str, float]) -> dict[str, Any]:
  """Each stage's seconds and the feature extraction per set (`_report.timings`)."""
  out = _report.timings(cached, {}, stages["total_s"])
  out["stages"] = dict(stages)
  return out


def write(out_dir, result, scores, timing, ablation_tables=None, *,
          make_plots: bool = True) -> None:
  """Writes the files listed in this module's docstring into `out_dir`, and
  removes those of an earlier run there that this one does not write (an
  ablation or a figure of other data must not sit beside these metrics)."""
  out_dir = os.fspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  written = ["metrics.json", "timings.json", "table.md"]
  _report.write_json(os.path.join(out_dir, "metrics.json"), result)
  _report.write_json(os.path.join(out_dir, "timings.json"), timing)
  _shared.write_text(os.path.join(out_dir, "table.md"), format_table(result))
  if ablation_tables:
    _report.write_json(os.path.join(out_dir, "ablation.json"), ablation_tables)
    _shared.write_text(os.path.join(out_dir, "ablation.md"), format_ablation(ablation_tables))
    written += ["ablation.json", "ablation.md"]
  if make_plots:
    with _shared.atomic_file(os.path.join(out_dir, "roc.png")) as tmp:
      plots.plot_roc(scores, tmp)
    written.append("roc.png")
    if all(g in next(iter(result["methods"].values())) for g in GROUPS):
      with _shared.atomic_file(os.path.join(out_dir, "near_far.png")) as tmp:
        sets = "; ".join(f"{g}: {', '.join(result['groups'][g]['sets'])}" for g in GROUPS)
        plots.plot_near_far(result["methods"], result.get("tuned", {}), tmp,
                            title=f"{result['benchmark']} ({sets}): AUROC %")
      written.append("near_far.png")
    else:
      print("near_far.png not drawn: it needs a near and a far set", file=sys.stderr)
  for name in set(OWN_FILES) - set(written):
    if os.path.isfile(os.path.join(out_dir, name)):
      os.remove(os.path.join(out_dir, name))
