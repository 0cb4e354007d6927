"""Config for the rDPO vs DPO flipped-label bandit.

Run from the repository root:

    python -m experiments.rdpo.run --config=experiments/rdpo/config.py:full
"""

from __future__ import annotations

from experiments import _toylib


def get_config(arg=None):
  """`fast` for CI, `full` for the README numbers; `key=value` overrides."""
  c = _toylib.parse_arg(arg, variant="fast", seeds=5, n_responses=10, n_pairs=0,
                        reward_scale=1.0, beta=1.0, lr=0.05, steps=0,
                        eps="")
  full = c.variant == "full"
  if not c.n_pairs:
    c.n_pairs = 4000 if full else 2000
  if not c.steps:
    c.steps = 2000 if full else 1000
  if not c.eps:
    c.eps = "0.0,0.1,0.2,0.3,0.4" if full else "0.0,0.2,0.4"
  if full and c.seeds == 5:
    c.seeds = 10
  return c
