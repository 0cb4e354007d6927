"""Config for the NSR / PSR pass@k experiment (online-loop configs from the demo).

Run from the repository root:

    python -m experiments.nsr_psr.run --config=experiments/nsr_psr/config.py:full
"""

from __future__ import annotations

from experiments import _toylib
from rlhf_jax import demo


def get_config(arg=None):
  """`fast` for CI, `full` for the README numbers; `key=value` overrides."""
  c = _toylib.parse_arg(arg, variant="fast", seeds=0, first_seed=0, steps=0, num_samples=16,
                        eval_size=0)
  full = c.variant == "full"
  c.seeds = c.seeds or (3 if full else 1)
  c.steps = c.steps or (200 if full else 80)
  c.eval_size = c.eval_size or (200 if full else 100)
  c.ks = (1, 2, 4, 8, 16)
  online = demo.get_config()
  online.progress = False
  online.train.steps = c.steps
  online.train.prompts_per_step = 16
  online.train.eval_every = 0
  online.data.eval_size = c.eval_size
  online.rl.update(group_size=8, surrogate="ppo_clip", kl_coef=0.0, aggregation="token_mean")
  c.online = online
  c.methods = {"grpo": dict(advantage="grpo"), "psr": dict(advantage="psr"),
               "nsr": dict(advantage="nsr")}
  return c
