"""Config for the STARC-distance vs regret toy on random MDPs.

Run from the repository root:

    python -m experiments.starc.run --config=experiments/starc/config.py:full
"""

from __future__ import annotations

from experiments import _toylib


def get_config(arg=None):
  """`fast` for CI, `full` for the README numbers; `key=value` overrides."""
  c = _toylib.parse_arg(arg, variant="fast", seeds=5, n_states=16, n_actions=4, gamma=0.9,
                        pairs=0, vi_iters=200, max_shaping=5.0, max_noise=1.0)
  full = c.variant == "full"
  if not c.pairs:
    c.pairs = 500 if full else 200
  if full and c.seeds == 5:
    c.seeds = 10
  return c
