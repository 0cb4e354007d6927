"""Config for the Nash-MD / Nash-MP tabular preference game.

Run from the repository root:

    python -m experiments.nash_md_mp.run --config=experiments/nash_md_mp/config.py:full
"""

from __future__ import annotations

from experiments import _toylib


def get_config(arg=None):
  """`fast` for CI, `full` for the README numbers; `key=value` overrides."""
  c = _toylib.parse_arg(arg, variant="fast", seeds=5, n_responses=30, beta=0.1,
                        eta_mp=2.0, mp_iters=0, md_iters=0, game="random",
                        pref_scale=2.0, ref_temp=1.0, eq_iters=4000)
  full = c.variant == "full"
  if not c.mp_iters:
    c.mp_iters = 200 if full else 80
  if not c.md_iters:
    c.md_iters = 5000 if full else 1000
  if full and c.seeds == 5:
    c.seeds = 10
  return c
