"""CI check of experiments/maxmin_rlhf (fast variant)."""

from __future__ import annotations

from experiments import _toylib


def test_maxmin_rlhf_fast():
  cfg, exp = _toylib.load_experiment("maxmin_rlhf")
  res = exp.run(cfg)
  single, maxmin = res["single"], res["maxmin"]
  assert res["cluster_purity"]["mean"] > 0.95          # EM finds the two groups
  # The single reward serves the majority; MaxMin trades some of it for the minority.
  assert single["majority"]["mean"] > single["minority"]["mean"] + 0.5
  assert maxmin["minority"]["mean"] > single["minority"]["mean"] + 0.15
  assert maxmin["min_group"]["mean"] > single["min_group"]["mean"]
  assert abs(maxmin["minority"]["mean"] - 0.859) < 0.1
