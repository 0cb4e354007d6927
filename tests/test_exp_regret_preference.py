"""CI check of experiments/regret_preference (fast variant)."""

from __future__ import annotations

from experiments import _toylib


def test_regret_preference_fast():
  cfg, exp = _toylib.load_experiment("regret_preference")
  res = exp.run(cfg)["by_pairs"]["300"]
  regret, partial = res["regret"], res["partial_return"]
  # With regret-generated labels the regret model recovers the reward direction;
  # the partial-return model does not.
  assert regret["cos"]["mean"] > partial["cos"]["mean"] + 0.2
  assert abs(regret["cos"]["mean"] - 0.876) < 0.08
  # Both greedy policies are near-optimal in this small gridworld (see README).
  assert regret["perf"]["mean"] > 0.9 and partial["perf"]["mean"] > 0.9
