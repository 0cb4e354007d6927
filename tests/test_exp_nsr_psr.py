"""CI check of experiments/nsr_psr: its code at smoke sizes; the fast variant (the paper's
small-step regime, 1 seed) and its claims are marked slow (`python -m pytest -m slow`)."""

from __future__ import annotations

import pytest

from experiments import _toylib


def test_nsr_psr_runs_every_method():
  """The experiment's code end to end at smoke sizes (the claims: `test_nsr_psr_fast`)."""
  cfg, exp = _toylib.load_experiment("nsr_psr", "fast,sft_steps=20,steps=2,eval_size=16")
  m = exp.run(cfg)["methods"]
  assert set(m) == {"base", "psr", "nsr"}
  for v in m.values():  # pass@k is non-decreasing in k (a property of the estimator)
    p = [v[f"pass@{k}"]["mean"] for k in cfg.ks]
    assert all(a <= b + 1e-9 for a, b in zip(p, p[1:]))


@pytest.mark.slow
def test_nsr_psr_fast():
  cfg, exp = _toylib.load_experiment("nsr_psr")
  m = {k: {kk: v["mean"] for kk, v in d.items() if kk != "per_seed"}
       for k, d in exp.run(cfg)["methods"].items()}
  print({k: {kk: round(vv, 3) for kk, vv in v.items()} for k, v in m.items()})
  base, psr, nsr = m["base"], m["psr"], m["nsr"]
  assert set(m) == {"base", "psr", "nsr"}
  for v in m.values():  # pass@k is non-decreasing in k (a property of the estimator)
    p = [v[f"pass@{k}"] for k in cfg.ks]
    assert all(a <= b + 1e-9 for a, b in zip(p, p[1:]))
  # NSR (as in the paper, at lr 1e-4 on the 400-step SFT model): pass@1 rises and pass@k
  # is kept over the whole k range (measured pass@1 0.736 → 0.824, pass@16 0.990 → 1.000).
  assert nsr["pass@1"] > base["pass@1"] + 0.05
  for k in cfg.ks:
    assert nsr[f"pass@{k}"] > base[f"pass@{k}"] - 0.05
  # PSR raises pass@1 too and narrows the policy (fewer distinct completions;
  # measured pass@1 0.831, distinct 2.46 → 2.13).
  assert psr["pass@1"] > base["pass@1"] + 0.05
  assert psr["distinct"] < base["distinct"]
