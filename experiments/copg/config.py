"""Config for the CoPG off-policy bandit.

Run from the repository root:

    python -m experiments.copg.run --config=experiments/copg/config.py:full
"""

from __future__ import annotations

from experiments import _toylib


def get_config(arg=None):
  """`fast` for CI, `full` for the README numbers; `key=value` overrides."""
  c = _toylib.parse_arg(arg, variant="fast", seeds=5, n_arms=20, beta=0.1, behaviour_temp=2.0,
                        batch=64, lr=0.02, steps=0, log_every=50)
  full = c.variant == "full"
  if not c.steps:
    c.steps = 6000 if full else 2000
  if full and c.seeds == 5:
    c.seeds = 10
  return c
