"""The agentic experiment config: its arguments, and the bad ones named."""

from __future__ import annotations

import pytest

from experiments import agentic_calculator


def test_agentic_calculator_config_variants():
  tool, notool = agentic_calculator.get_config(), agentic_calculator.get_config("notool")
  assert tool.env["max_turns"] == 2 and notool.env["max_turns"] == 1
  assert tool.sft.tool_demonstrations and not notool.sft.tool_demonstrations
  assert tool.rewards == ("env",)
  # the episode fits the sampling budget and the model's positions
  for c in (tool, notool):
    turns = c.env["max_turns"]
    episode = turns * c.env["turn_tokens"] + (turns - 1) * c.env["obs_tokens"]
    assert c.sampling.max_new_tokens == episode
    assert c.data.max_prompt_length + episode <= c.model.hf_config.max_position_embeddings
  assert agentic_calculator.get_config("runlocal").train.steps < tool.train.steps
  with pytest.raises(ValueError, match="config arg 'runlocl' is unknown"):
    agentic_calculator.get_config("runlocl")
