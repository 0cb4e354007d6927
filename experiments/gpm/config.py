"""Config for the GPM vs Bradley-Terry cyclic-preference toy.

Run from the repository root:

    python -m experiments.gpm.run --config=experiments/gpm/config.py:full
"""

from __future__ import annotations

from experiments import _toylib


def get_config(arg=None):
  """`fast` for CI, `full` for the README numbers; `key=value` overrides."""
  c = _toylib.parse_arg(arg, variant="fast", seeds=5, n_items=15, beta=0.1, lr=0.05,
                        steps=0, dims="2,4,8")
  full = c.variant == "full"
  if not c.steps:
    c.steps = 3000 if full else 1500
  if full:
    c.dims = "2,4,8,16" if c.dims == "2,4,8" else c.dims
    c.seeds = 10 if c.seeds == 5 else c.seeds
  return c
