"""Config for the guess-the-number experiment: GiGPO vs trajectory-level GRPO.

Run from the repository root:

    python -m experiments.guess_number.run --config=experiments/guess_number/config.py:full

`fast` is a seconds-long smoke variant; `key=value` overrides any field below, e.g.
`config.py:full,seeds=5,steps=200`.
"""

from __future__ import annotations

from experiments import _toylib
from rlhf_jax import demo


def get_config(arg=None):
  """`fast` (smoke / CI sizes) or `full` (the README numbers); `key=value` overrides."""
  c = _toylib.parse_arg(arg, variant="fast", seeds=0, first_seed=0, steps=0, sft_steps=-1,
                        max_value=8, max_turns=4, turn_penalty=0.2, group_size=8, turn_tokens=0,
                        prompts_per_step=0, learning_rate=1e-3, eval_samples=8,
                        run_methods="grpo+gigpo", tag="")
  full = c.variant == "full"
  c.seeds = c.seeds or 3
  c.steps = c.steps or (80 if full else 2)
  if c.sft_steps < 0:  # 0: no warm-up (a random model)
    c.sft_steps = 150 if full else 4
  c.prompts_per_step = c.prompts_per_step or (16 if full else 2)
  width = len(str(c.max_value))
  # One turn: the guess's digits and a newline; observations "higher\n" ... "invalid\n".
  # (turn_tokens=1: any single digit is a guess, so even an untrained model finds the number
  # now and then; the CI test uses it.)
  c.env = dict(name="guess_number", max_turns=c.max_turns, turn_tokens=c.turn_tokens or width + 1,
               obs_tokens=8, max_value=c.max_value, turn_penalty=c.turn_penalty)
  c.prompt = f"guess 1-{c.max_value}:\n"
  model = dict(demo.get_config().model.hf_config)
  # The prompt, every turn's guess and answer, the demonstrations' "correct\n" (72 covers
  # the README's 4- and 5-turn variants; longer budgets get what their episodes need).
  episode = len(c.prompt) + c.max_turns * (c.env["turn_tokens"] + c.env["obs_tokens"])
  model["max_position_embeddings"] = max(72, episode + 8)
  if not full:  # smoke sizes
    model.update(hidden_size=32, num_hidden_layers=1, intermediate_size=64)
  c.model = dict(hf_config=model)
  c.sft = dict(steps=c.sft_steps, batch_size=64,
               optim=dict(learning_rate=3e-3, warmup_steps=10))
  c.optim = dict(learning_rate=c.learning_rate, max_grad_norm=1.0)
  # Both methods: one on-policy epoch of the clipped surrogate, token-mean, no KL; they
  # differ in the advantage only.
  rl = demo.rl_block(group_size=c.group_size)
  # gigpo_gamma1: the set-up check of the README (no discount inside the step returns; the
  # reward already pays for fewer turns).
  known = {"grpo": dict(rl, advantage="grpo"), "gigpo": dict(rl, advantage="gigpo"),
           "gigpo_gamma1": dict(rl, advantage="gigpo", advantage_kwargs=dict(gamma=1.0)),
           "igpo": dict(rl, advantage="igpo")}
  names = c.run_methods.split("+")
  for m in names:
    if m not in known:
      raise ValueError(f"run_methods={c.run_methods!r}: {m!r} is unknown; use '+'-joined names of "
                       f"{sorted(known)}")
  c.methods = {m: known[m] for m in names}
  return c
