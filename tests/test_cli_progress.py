"""CLIs in a log (stderr not a terminal): plain progress lines, no tqdm frames;
`--quiet`: none at all."""

import re

import numpy as np

from line_jax import _progress
from line_jax import data
from line_jax import evaluate
from line_jax import tune

EVALUATE = ["--max-train", "300", "--max-test", "100", "--ood-size", "40", "--methods",
            "energy,line", "--no-plots", "--batch-size", "64"]


def test_evaluate_writes_plain_lines_in_a_log(tmp_path, capsys):
  evaluate.main(["--out", str(tmp_path / "a"), *EVALUATE])
  err = capsys.readouterr().err
  assert "\r" not in err
  assert re.search(r"^features: train: 300/300 img \(", err, re.M), err
  assert re.search(r"^scorers: 2/2 it .*\[line\]$", err, re.M), err
  evaluate.main(["--out", str(tmp_path / "b"), *EVALUATE, "--quiet"])
  assert capsys.readouterr().err == ""


def test_tune_writes_plain_lines_and_is_quiet_when_asked(tmp_path, capsys):
  source = data.fashion_mnist_source("train")
  (tmp_path / "set").mkdir()
  np.save(tmp_path / "set" / "images.npy", np.asarray(source.images[:600]))
  np.save(tmp_path / "set" / "labels.npy", np.asarray(source.labels[:600], np.int32))
  args = ["--methods", "vim", "--val-size", "100", "--ood-size", "40", "--no-check",
          "--dataset", str(tmp_path / "set"), "--cache-dir", str(tmp_path / "cache")]
  tune.main(args)
  err = capsys.readouterr().err
  assert "\r" not in err and re.search(r"^features: train: 600/600 img", err, re.M), err
  tune.main([*args, "--quiet"])  # Cached now; quiet prints only the table, on stdout.
  captured = capsys.readouterr()
  assert captured.err == "" and "| vim |" in captured.out


def test_lines_report_rate_eta_and_postfix(capsys):
  lines = _progress.Lines(10, "work", unit="img", every=0.0)
  lines.set_postfix_str("line")
  lines.update(4)
  lines.update(6)
  out = capsys.readouterr().err.splitlines()
  assert re.fullmatch(r"work: 4/10 img \(\d+\.\d/s, eta \d+ s\) \[line\]", out[0]), out
  assert out[-1].startswith("work: 10/10 img")
