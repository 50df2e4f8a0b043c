"""line_jax.plots: ROC points and valid PNG files."""

import numpy as np
from sklearn import metrics as skm

from line_jax import metrics
from line_jax import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_roc_curve_matches_auroc_and_sklearn():
  rng = np.random.default_rng(0)
  score_id = np.round(rng.normal(1.0, 1.0, 300), 1)  # Rounded: ties included.
  score_ood = np.round(rng.normal(0.0, 1.0, 200), 1)
  fpr, tpr = plots.roc_curve(score_id, score_ood)
  assert fpr[0] == tpr[0] == 0.0 and fpr[-1] == tpr[-1] == 1.0
  np.testing.assert_allclose(np.trapezoid(tpr, fpr), metrics.auroc(score_id, score_ood))
  truth = np.r_[np.ones(300), np.zeros(200)]
  sk_fpr, sk_tpr, _ = skm.roc_curve(truth, np.r_[score_id, score_ood], drop_intermediate=False)
  np.testing.assert_allclose(fpr, sk_fpr)
  np.testing.assert_allclose(tpr, sk_tpr)


def test_figures_are_png(tmp_path):
  rng = np.random.default_rng(1)
  scores = {m: {"id": rng.normal(1, 1, 50), "a": rng.normal(0, 1, 30),
                "b": rng.normal(0, 2, 30)} for m in ("energy", "line")}
  for path in (plots.plot_roc(scores, tmp_path / "roc.png"),
               plots.plot_histograms("line", scores["line"], tmp_path / "h.png")):
    with open(path, "rb") as f:
      assert f.read(8) == PNG_MAGIC
