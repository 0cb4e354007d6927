"""Tiny configs for the loop-level reliability tests (`tests/test_reliability*.py`).

    python -m rlhf_jax.train --config=tests/reliability_configs.py:online
    python -m rlhf_jax.train --config=tests/reliability_configs.py:dpo

Both checkpoint every step (synchronously) and resume automatically.

With the environment variable `RLHF_PAUSE_AFTER_CHECKPOINT=<step>:<file>` the run pauses
once checkpoint `<step>` is complete: it writes `<file>`, then waits for SIGTERM (or
SIGKILL). After SIGTERM it goes on, so the loop runs one more step, saves it and stops.
The kill and SIGTERM tests use this to act at an exact step instead of racing the run.
"""

from __future__ import annotations

import os
import time

from rlhf_jax import checkpoint as ckpt_lib
from rlhf_jax import demo
from rlhf_jax.train.offline_config import synthetic_config

ARGS = ("online", "dpo")
PAUSE_ENV = "RLHF_PAUSE_AFTER_CHECKPOINT"
PAUSE_LIMIT_S = 3600  # a paused run nobody signals goes on after this (no hung process)


def _pause_after_checkpoint(spec: str) -> None:
  """Makes `Checkpointer.save` of step `<step>` pause as described in the module doc."""
  step, path = spec.split(":", 1)
  step = int(step)
  save = ckpt_lib.Checkpointer.save
  if getattr(save, "pause_step", None) is not None:
    return

  def paused_save(self, s, *args, **kwargs):
    saved = save(self, s, *args, **kwargs)
    if saved and int(s) == step:
      self.wait()
      with open(path + ".tmp", "w") as f:
        f.write(f"{s}\n")
      os.replace(path + ".tmp", path)
      t0 = time.monotonic()
      while not ckpt_lib.should_stop() and time.monotonic() - t0 < PAUSE_LIMIT_S:
        time.sleep(0.01)
    return saved

  paused_save.pause_step = step
  ckpt_lib.Checkpointer.save = paused_save


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
  if os.environ.get(PAUSE_ENV):
    _pause_after_checkpoint(os.environ[PAUSE_ENV])
  return c
