"""CI check of experiments/rm_ensembles (fast variant)."""

from __future__ import annotations

from experiments import _toylib


def test_rm_ensembles_fast():
  cfg, exp = _toylib.load_experiment("rm_ensembles")
  m = exp.run(cfg)["methods"]
  final = {k: v["gold_final"]["mean"] for k, v in m.items()}
  # best-of-n with the gold reward itself keeps improving (no over-optimisation)
  assert m["gold_oracle"]["drop"]["mean"] < 1e-6
  # the single proxy peaks and falls; WCO/UWO end with more gold reward
  assert m["single"]["drop"]["mean"] > 0.02
  assert final["wco"] > final["single"] + 0.3
  assert final["uwo"] > final["single"] + 0.3
  assert m["uwo"]["kl_at_peak"]["mean"] > m["single"]["kl_at_peak"]["mean"]
  assert abs(final["single"] - (-0.462)) < 0.1
