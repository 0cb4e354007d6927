"""Config for the regret vs partial-return preference-model gridworld.

Run from the repository root:

    python -m experiments.regret_preference.run --config=experiments/regret_preference/config.py:full
"""

from __future__ import annotations

from experiments import _toylib


def get_config(arg=None):
  """`fast` for CI, `full` for the README numbers; `key=value` overrides."""
  c = _toylib.parse_arg(arg, variant="fast", seeds=5, size=6, n_types=4, n_terminal=2, gamma=0.9,
                        vi_iters=80, seg_len=3, pairs="", lr=0.05, steps=0)
  full = c.variant == "full"
  if not c.pairs:
    c.pairs = "30,100,300,1000" if full else "300"
  if not c.steps:
    c.steps = 500 if full else 300
  if full and c.seeds == 5:
    c.seeds = 10
  return c
