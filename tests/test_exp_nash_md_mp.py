"""CI check of experiments/nash_md_mp (fast variant)."""

from __future__ import annotations

from experiments import _toylib


def test_nash_md_mp_fast():
  cfg, exp = _toylib.load_experiment("nash_md_mp")
  res = exp.run(cfg)
  assert res["equilibrium_residual"] < 1e-10
  # Nash-MP: every iterate under (1+2β)^{-k}·KL0 and at least the theoretical rate.
  assert res["mp_frac_under_bound"] == 1.0
  assert res["mp_rate_per_iter"]["mean"] >= res["theory_rate_per_iter"]
  assert abs(res["mp_rate_per_iter"]["mean"] - 0.384) < 0.03
  # Nash-MD: every iterate under 8/(τ²(T+1)), and it converges.
  assert res["md_frac_under_bound"] == 1.0
  assert res["md_kl_at_100"]["mean"] < 0.1 * res["mp_kl0"]["mean"]
