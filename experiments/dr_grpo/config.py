"""Config for the Dr. GRPO length-bias experiment (online-loop configs from the demo).

Run from the repository root:

    python -m experiments.dr_grpo.run --config=experiments/dr_grpo/config.py:full
"""

from __future__ import annotations

from experiments import _toylib
from rlhf_jax import demo

FILLER = "."


def get_config(arg=None):
  """`fast` for CI, `full` for the README numbers; `key=value` overrides.

  filler_max: the SFT targets carry 0..filler_max filler tokens ("."), uniformly;
  filler_position: "after" the answer ("42...", the length is chosen once the answer is
  written) or "before" it ("...42"); the reward ignores filler wherever it is.
  """
  c = _toylib.parse_arg(arg, variant="fast", seeds=0, first_seed=0, steps=0, sft_steps=400,
                        max_new_tokens=16, filler_max=6, filler_position="after", window=0,
                        lr=1e-3, tag="")
  if c.filler_position not in ("after", "before"):
    raise ValueError(f"config arg filler_position={c.filler_position!r}: use 'after' or "
                     "'before'")
  if not 0 <= c.filler_max <= c.max_new_tokens - 4:
    raise ValueError(f"config arg filler_max={c.filler_max} must be in [0, max_new_tokens - 4"
                     f" = {c.max_new_tokens - 4}] (3 answer digits and EOS must fit)")
  full = c.variant == "full"
  c.seeds = c.seeds or (3 if full else 1)
  c.steps = c.steps or (150 if full else 30)
  c.window = c.window or (20 if full else 10)  # steps averaged for "start" / "end" numbers
  c.filler = FILLER
  online = demo.get_config()
  online.progress = False
  online.sampling.max_new_tokens = c.max_new_tokens
  online.train.steps = c.steps
  online.train.prompts_per_step = 16
  online.sft.steps = c.sft_steps
  online.train.eval_every = 0
  online.optim.learning_rate = c.lr
  # Graded by the number alone: filler tokens are neutral, their count is free.
  online.rewards = ({"name": "exact_match", "ignore": FILLER},)
  online.rl.update(group_size=8, surrogate="ppo_clip", kl_coef=0.0)
  c.online = online
  c.methods = {
      "grpo": dict(advantage="grpo", aggregation="seq_mean_token_mean"),
      "dr_grpo": dict(advantage="dr_grpo", aggregation="seq_mean_token_sum_norm"),
  }
  return c
