"""CI check of experiments/dr_grpo (fast variant)."""

from __future__ import annotations

import numpy as np

from experiments import _toylib


def test_dr_grpo_fast():
  cfg, exp = _toylib.load_experiment("dr_grpo")
  res = exp.run(cfg)
  m = res["methods"]
  for v in m.values():
    c = {k: np.asarray(x["mean"]) for k, x in v["curves"].items()}
    r = c["reward_mean"]
    # The step's wrong/correct lengths split its mean length: L = r·L_correct + (1 − r)·L_wrong.
    np.testing.assert_allclose(
        c["response_length"],
        r * c["correct_response_length"] + (1 - r) * c["wrong_response_length"], atol=1e-3)
    # Both methods drive the long, wrong mode out (measured −0.28 and −0.28 here).
    assert v["wrong_len_change"]["mean"] < -0.1
  # The paper's claim (GRPO's wrong responses grow, Dr. GRPO's do not) does NOT hold in this
  # toy: both shrink alike (GRPO − Dr. GRPO at the end: +0.03 here, −0.03 in a plain run).
  diff = res["wrong_len_end_grpo_minus_dr_grpo"]["mean"]
  assert abs(diff) < 0.25
