"""Config for the reward-model-ensemble over-optimisation toy (best-of-n).

Run from the repository root:

    python -m experiments.rm_ensembles.run --config=experiments/rm_ensembles/config.py:full
"""

from __future__ import annotations

from experiments import _toylib


def get_config(arg=None):
  """`fast` for CI, `full` for the README numbers; `key=value` overrides."""
  c = _toylib.parse_arg(arg, variant="fast", seeds=5, dim=8, n_pairs=400, members=5,
                        hidden=32, lr=0.01, steps=0, curvature=0.25, pool=0,
                        max_log2_n=0, uwo_lambda=0.5)
  full = c.variant == "full"
  if not c.steps:
    c.steps = 1500 if full else 800
  if not c.pool:
    c.pool = 50000 if full else 10000
  if not c.max_log2_n:
    c.max_log2_n = 14 if full else 11
  if full and c.seeds == 5:
    c.seeds = 10
  return c
