"""Config for the Dr. GRPO length-bias experiment (online-loop configs from the demo).

Run from the repository root:

    python -m experiments.dr_grpo.run --config=experiments/dr_grpo/config.py:full
"""

from __future__ import annotations

from experiments import _toylib
from rlhf_jax import demo


def get_config(arg=None):
  """`fast` for CI, `full` for the README numbers; `key=value` overrides."""
  c = _toylib.parse_arg(arg, variant="fast", seeds=0, steps=0, long_fraction=0.15, sft_steps=400,
                        max_new_tokens=12, window=0)
  full = c.variant == "full"
  c.seeds = c.seeds or (3 if full else 1)
  c.steps = c.steps or (150 if full else 100)
  c.window = c.window or (20 if full else 10)  # steps averaged for "start" / "end" numbers
  online = demo.get_config()
  online.progress = False
  online.sampling.max_new_tokens = c.max_new_tokens
  online.train.steps = c.steps
  online.train.prompts_per_step = 16
  online.sft.steps = c.sft_steps
  online.train.eval_every = 0
  online.rl.update(group_size=8, surrogate="ppo_clip", kl_coef=0.0)
  c.online = online
  # SFT targets: a `long_fraction` of answers are repeated 2-3 times, "95 95 95" (long and
  # wrong under exact match), so the warm-started policy has a long-wrong mode.
  c.repeat_min, c.repeat_max = 2, 3
  c.methods = {
      "grpo": dict(advantage="grpo", aggregation="seq_mean_token_mean"),
      "dr_grpo": dict(advantage="dr_grpo", aggregation="seq_mean_token_sum_norm"),
  }
  return c
