"""CI check of experiments/gpm (fast variant)."""

from __future__ import annotations

from experiments import _toylib


def test_gpm_fast():
  cfg, exp = _toylib.load_experiment("gpm")
  acc = exp.run(cfg)["accuracy"]
  # BT is at chance on the regular (cyclic) tournament; GPM with 2k >= 4 solves it.
  assert abs(acc["cyclic/bt"]["mean"] - 0.5) < 0.06
  assert acc["cyclic/gpm4"]["mean"] > 0.98
  assert acc["cyclic/gpm8"]["mean"] > 0.98
  # On a random tournament accuracy grows with the embedding dimension.
  assert acc["random/gpm8"]["mean"] > acc["random/gpm2"]["mean"] + 0.1
  assert acc["random/gpm8"]["mean"] > 0.95
