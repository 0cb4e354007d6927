"""Config for the MaxMin-RLHF two-group bandit.

Run from the repository root:

    python -m experiments.maxmin_rlhf.run --config=experiments/maxmin_rlhf/config.py:full
"""

from __future__ import annotations

from experiments import _toylib


def get_config(arg=None):
  """`fast` for CI, `full` for the README numbers; `key=value` overrides."""
  c = _toylib.parse_arg(arg, variant="fast", seeds=5, n_responses=20, n_users=50,
                        minority_frac=0.2, pairs_per_user=40, reward_scale=2.0, corr=0.0,
                        beta=0.5, lr=0.05, em_iters=8, m_steps=0, policy_steps=0)
  full = c.variant == "full"
  if not c.m_steps:
    c.m_steps = 300 if full else 150
  if not c.policy_steps:
    c.policy_steps = 1000 if full else 500
  if full and c.seeds == 5:
    c.seeds = 10
  return c
