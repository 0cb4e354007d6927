"""CI check of experiments/rdpo (fast variant)."""

from __future__ import annotations

from experiments import _toylib


def test_rdpo_fast():
  cfg, exp = _toylib.load_experiment("rdpo")
  res = exp.run(cfg)
  dpo = {e: res["dpo"][str(e)]["recovery"]["mean"] for e in res["eps"]}
  rdpo = {e: res["rdpo"][str(e)]["recovery"]["mean"] for e in res["eps"]}
  # ε = 0: the two losses coincide.
  assert abs(dpo[0.0] - rdpo[0.0]) < 1e-5
  # DPO's recovered reward shrinks monotonically with ε; rDPO stays near the clean optimum.
  assert all(dpo[a] > dpo[b] for a, b in zip(res["eps"], res["eps"][1:]))
  assert abs(dpo[0.4] - 0.144) < 0.05
  for e in res["eps"]:
    assert abs(rdpo[e] - 1.0) < 0.2, (e, rdpo[e])
  assert rdpo[0.4] > dpo[0.4] + 0.5
