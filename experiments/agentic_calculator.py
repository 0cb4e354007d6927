"""Multi-turn tool use: 2-digit multiplication with an in-program calculator tool.

Command: `python -m rlhf_jax.train --config=experiments/agentic_calculator.py`
(`:notool` trains the same model the same way without the tool: one turn, plain answers;
`:runlocal` is a seconds-long smoke run). The model may write `<calc>23*45</calc>`; the
environment (`rlhf_jax.envs`, over token ids, inside the compiled step) answers `1035`,
then the model gives its final answer. A short SFT warm-up on tool-use demonstrations,
then GRPO on the environment's reward (exact final answer). Held-out accuracy is the
environment's reward of greedy episodes. Results: docs/agentic.md.
"""

from rlhf_jax import demo

ARGS = (None, "runlocal", "notool", "notool_runlocal")


def get_config(arg=None):
  if arg not in ARGS:
    raise ValueError(f"experiments/agentic_calculator.py: config arg {arg!r} is unknown; use "
                     f"one of {[a for a in ARGS if a]}")
  tool = "notool" not in (arg or "")
  c = demo.get_config("runlocal" if arg and "runlocal" in arg else None)
  c.workdir = "runs/agentic_calculator" + ("" if tool else "_notool")
  c.task = dict(name="arithmetic", num_digits=2, op="*")
  c.data.max_prompt_length = 6
  c.model.hf_config.max_position_embeddings = 64
  c.env = dict(name="calculator", max_turns=2 if tool else 1, turn_tokens=18, obs_tokens=6,
               max_digits=2)
  c.rewards = ("env",)
  c.sampling.max_new_tokens = 2 * 18 + 6 if tool else 18  # the episode's token budget
  c.sft.tool_demonstrations = tool
  if not (arg and "runlocal" in arg):
    c.sft.steps = 150
    c.train.steps = 150
    c.optim.learning_rate = 5e-4
  return c
