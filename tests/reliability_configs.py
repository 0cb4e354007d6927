"""Tiny configs for the loop-level reliability tests (`tests/test_reliability*.py`).

    python -m rlhf_jax.train --config=tests/reliability_configs.py:online
    python -m rlhf_jax.train --config=tests/reliability_configs.py:dpo

Both checkpoint every step (synchronously) and resume automatically.
"""

from __future__ import annotations

from rlhf_jax import demo
from rlhf_jax.train.offline_config import synthetic_config

ARGS = ("online", "dpo")


def get_config(arg=None):
  if arg == "online":
    c = demo.get_config("runlocal")
    c.sft.steps = 0
    c.data.train_size, c.data.eval_size = 64, 4
    c.train.steps, c.train.prompts_per_step = 8, 4
    c.rl.group_size = 4
    c.rl.entropy_coef, c.rl.kl_coef = 0.01, 0.01  # non-zero updates even at zero reward
    c.rewards = ["exact_match", "terminated"]
  elif arg == "dpo":
    c = synthetic_config("preference", loss="dpo", loss_kwargs=dict(beta=0.1), arg="fast")
    c.train.steps, c.train.batch_size = 8, 8
    c.data.train_size, c.data.eval_size, c.data.eval_batch_size = 64, 16, 16
  else:
    raise ValueError(f"config arg {arg!r} is unknown; use one of {ARGS}")
  c.workdir = f"/tmp/reliability_{arg}"
  c.progress = False
  c.resume = "auto"
  c.max_bad_steps = 10
  c.checkpoint = dict(every_steps=1, max_to_keep=20, async_save=False)
  return c
