"""CI check of experiments/starc (fast variant)."""

from __future__ import annotations

from experiments import _toylib


def test_starc_fast():
  cfg, exp = _toylib.load_experiment("starc")
  res = exp.run(cfg)
  # STARC predicts regret; naive L2 does not (scaling and shaping inflate it).
  assert res["starc"]["spearman"]["mean"] > res["l2_normalised"]["spearman"]["mean"] + 0.1
  assert res["starc"]["spearman"]["mean"] > res["l2"]["spearman"]["mean"] + 0.5
  assert abs(res["starc"]["pearson"]["mean"] - 0.920) < 0.05
