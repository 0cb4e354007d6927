"""CI check of experiments/copg (fast variant)."""

from __future__ import annotations

from experiments import _toylib


def test_copg_fast():
  cfg, exp = _toylib.load_experiment("copg")
  m = exp.run(cfg)["methods"]
  copg, pg_off, pg_on = (m[k]["kl_mean"] for k in ("copg", "pg_off", "pg_on"))
  # Off-policy PG stalls at a wrong fixed point; CoPG keeps converging to π*.
  assert pg_off[-1] > 0.9 * pg_off[len(pg_off) // 4]
  assert copg[-1] < 0.5 * copg[len(copg) // 4]
  assert copg[-1] < 0.25 * pg_off[-1]
  assert pg_on[-1] < 0.05            # on-policy PG reaches π* (sanity of the set-up)
  assert abs(copg[-1] - 1.46) < 0.3
