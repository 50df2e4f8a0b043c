"""LINe's ablation: each of its three parts switched on and off.

LINe (Ahn, Park, Kim, CVPR 2023, Sec. 4.4) combines activation clipping,
weight pruning (the class-wise mask of the head's weights) and neuron pruning
(the class-wise mask of the Shapley-approximated important neurons). Its
ablation scores every combination; with all three off LINe is Energy. Each
variant here is the registry's own LINe scorer with the parts left out set
to None, so nothing is reimplemented.

    table = line_ablation(train_batches, kernel, bias, {"id": f_id, "svhn": f_svhn},
                          p_w=90, p_a=90, clip=1.0)
    print(format_ablation(table))
    ablation.run(ablation.Config(BenchmarkData("cifar10", ...)), "out/")  # a benchmark's

`run` reads the benchmark's features as `evaluate` does (the same feature
cache: run after `evaluate`, no network runs again) and writes
`ablation.json`, `ablation.md` and `ablation.png`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
import dataclasses
import itertools
import os
from typing import Any

import jax

from line_jax import distributed
from line_jax import metrics as metrics_lib
from line_jax import plots as plots_lib
from line_jax import scorers
from line_jax import suites
from line_jax.runs import _report
from line_jax.runs._benchmark import BenchmarkData
from line_jax.runs._benchmark import features_of
from line_jax.runs._benchmark import user_hparams
from line_jax.runs._shared import atomic_file
from line_jax.runs._shared import check_cache
from line_jax.runs._shared import check_out
from line_jax.runs._shared import Runtime
from line_jax.runs._shared import write_text

PARTS = ("clip", "weights", "neurons")  # Activation clipping, weight pruning, neuron pruning.


def variants() -> list[tuple[bool, bool, bool]]:
  """Every on/off combination of `PARTS`: none first, all last."""
  combos = list(itertools.product((False, True), repeat=3))
  return sorted(combos, key=lambda c: (sum(c), tuple(not x for x in c)))


def variant_name(on: tuple[bool, bool, bool]) -> str:
  """'energy (none)', 'clip', 'weights + neurons', 'LINe (all)', ..."""
  if not any(on):
    return "energy (none)"
  if all(on):
    return "LINe (all)"
  return " + ".join(part for part, flag in zip(PARTS, on) if flag)


def line_ablation(train_batches: Iterable, kernel, bias, sets: Mapping[str, Any], *,
                  p_w: float, p_a: float, clip: float) -> dict[str, Any]:
  """Fits and scores every LINe variant; metrics of each OOD set against "id".

  Args:
    train_batches: a re-iterable of `(features [b, m], labels [b])` (it is
      read once per variant).
    kernel: `[m, classes]`; bias: `[classes]`.
    sets: name -> `[n, m]` features; "id" is the ID test set, every other
      key an OOD set.
    p_w, p_a, clip: LINe's settings for the parts that are on.

  Returns:
    `{"settings": {p_w, p_a, clip}, "variants": {name: {"clip", "weights",
    "neurons": bool, "metrics": {ood_set: metrics, "average": ...}}}}`.
  """
  if "id" not in sets:
    raise ValueError("sets needs the ID test features under 'id'")
  line = scorers.get("line")
  out = {}
  for on in variants():
    hp = dict(zip(("clip", "p_w", "p_a"), (clip, p_w, p_a)))
    hp = {k: (v if flag else None) for (k, v), flag in zip(hp.items(), on)}
    state = line.fit_from_batches(train_batches, kernel, bias, **hp)
    score_id = line.score_all(state, sets["id"])
    rows = {name: metrics_lib.ood_metrics(score_id, line.score_all(state, f))
            for name, f in sets.items() if name != "id"}
    out[variant_name(on)] = {**dict(zip(PARTS, on)),
                             "metrics": metrics_lib.averaged(rows, {"average": list(rows)})}
  return {"settings": {"p_w": p_w, "p_a": p_a, "clip": clip}, "variants": out}


def format_ablation(table: Mapping[str, Any]) -> str:
  """Markdown: one row per variant, check marks for its parts, then the
  average and each set's FPR95 / AUROC in %."""
  settings = table["settings"]
  first = next(iter(table["variants"].values()))
  sets = ["average"] + [s for s in first["metrics"] if s != "average"]
  lines = [
      f"LINe ablation at p_w = {settings['p_w']}, p_a = {settings['p_a']}, "
      f"clip = {settings['clip']}. Cells: FPR95 / AUROC in %.",
      "",
      "| variant | clipping | weight pruning | neuron pruning | " + " | ".join(sets) + " |",
      "|---|:-:|:-:|:-:|" + "---|" * len(sets),
  ]
  for name, row in table["variants"].items():
    marks = ["x" if row[p] else "" for p in PARTS]
    cells = [f"{100 * row['metrics'][s]['fpr95']:.2f} / {100 * row['metrics'][s]['auroc']:.2f}"
             for s in sets]
    lines.append(f"| {name} | " + " | ".join(marks + cells) + " |")
  return "\n".join(lines) + "\n"


@dataclasses.dataclass(frozen=True)
class Config:
  """A benchmark's LINe ablation.

  Attributes:
    data: the benchmark's model and data (as `evaluate.Config.data`).
    hparams: `{"line": {name: value}}` over the LINe settings the inputs
      name (a benchmark's, or the registry defaults for your own Inputs).
    plots: write `ablation.png`.
  """

  data: BenchmarkData = BenchmarkData()
  hparams: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
  plots: bool = True


def run(config: Config = Config(), workdir: str | os.PathLike | None = None, *,
        inputs: suites.Inputs | None = None, runtime: Runtime = Runtime()) -> dict[str, Any]:
  """LINe's ablation on a benchmark at its LINe settings (`suites.hparams_for`).

  Writes `ablation.json`, `ablation.md` and (with `config.plots`)
  `ablation.png` into `workdir` (None: nothing; refused where it holds files
  an evaluation does not write). Runs on one process.

  Returns:
    The `line_ablation` table.
  """
  if jax.process_count() > 1:
    raise ValueError("the ablation runs on one process; run it without --coordinator")
  if workdir is not None:
    check_out(workdir, _report.OWN_FILES, marks=_report.OWN_MARKS)
  check_cache(runtime)
  with features_of(config.data, runtime, inputs=inputs) as (inputs, cached):
    train = cached.pop("train")
    kernel, bias = inputs.backbone.head_params()
    hp = suites.hparams_for(inputs.settings, "line",
                            user_hparams(inputs, config.hparams).get("line"), train.features)
    table = line_ablation(train.batches(), kernel, bias,
                          {name: c.features for name, c in cached.items()}, **hp)
  if workdir is not None and distributed.is_primary():
    write(table, workdir, plots=config.plots)
  return table


def write(table: Mapping[str, Any], workdir: str | os.PathLike, *, plots: bool = True) -> None:
  """`ablation.json`, `ablation.md` and (with `plots`) `ablation.png` in `workdir`."""
  workdir = os.fspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  _report.write_json(os.path.join(workdir, "ablation.json"), table)
  write_text(os.path.join(workdir, "ablation.md"), format_ablation(table))
  if plots:
    with atomic_file(os.path.join(workdir, "ablation.png")) as tmp:
      plots_lib.plot_ablation(table, tmp)
