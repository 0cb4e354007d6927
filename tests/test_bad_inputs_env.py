"""Bad multi-turn inputs through the online loop: each is a named error raised before
anything is written to the workdir (or, for a host tool under on_error="observe", an
observation carrying the error text)."""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import envs
from rlhf_jax.train import online_loop
import reliability_configs  # tests/reliability_configs.py

CALC = {"name": "calculator", "max_turns": 2, "turn_tokens": 18, "obs_tokens": 6}


@dataclasses.dataclass(frozen=True)
class _NoteEnv:
  """Answers every turn with `width` tokens and ends; `first` tokens of first observation."""
  first: int
  width: int

  def reset(self, rng, batch):
    del rng
    b = batch["prompt_ids"].shape[0]
    return (jnp.zeros((b,), jnp.int32), jnp.full((b, self.first), 5, jnp.int32),
            jnp.ones((b, self.first), bool))

  def step(self, state, action_ids, action_mask):
    del action_mask
    n = action_ids.shape[0]
    return (state, jnp.full((n, self.width), 5, jnp.int32), jnp.ones((n, self.width), bool),
            jnp.zeros((n,), jnp.float32), jnp.ones((n,), bool))


@envs.register_env("test_note")
def _note(tokenizer, *, first: int = 0, width: int = 6, max_turns: int = 2,
          turn_tokens: int = 18, obs_tokens: int = 6):
  del tokenizer
  return _NoteEnv(first, width), envs.EnvSpec(max_turns=max_turns, turn_tokens=turn_tokens,
                                              obs_tokens=obs_tokens)


def raising_tool(call):
  raise ValueError(f"cannot read {call.action!r}")


def _config(workdir, env, episode_tokens=2 * 18 + 6):
  c = reliability_configs.get_config("online")
  c.workdir = str(workdir)
  c.env = env
  c.rewards = ("env",)
  c.sampling.max_new_tokens = episode_tokens
  return c


HOST = {"name": "host", "tool": "test_bad_inputs_env:raising_tool", "max_turns": 2,
        "turn_tokens": 18, "obs_tokens": 6}
CASES = [
    ("max_turns_zero", dict(CALC, max_turns=0), envs.EnvSpecError,
     r"EnvSpec\.max_turns must be a positive int, got 0; an episode needs at least one turn"),
    ("stop_string_not_encodable", dict(HOST, stop_strings=["`"], on_error="observe"),
     envs.StopStringError, r"stop string '`' cannot be encoded by CharTokenizer"),
    ("first_observation_beyond_the_context", {"name": "test_note", "first": 20},
     envs.ContextLengthError,
     r"config\.env \(name='test_note'\): a multi-turn episode needs up to 26 prompt \+ 42 "
     r"completion tokens .* = 68 positions, more than the model's max_position_embeddings=64"),
    ("observation_wider_than_obs_tokens", {"name": "test_note", "width": 9}, envs.EnvSpecError,
     r"config\.env \(name='test_note'\): _NoteEnv\.step returned observations \(8, 9\).*"
     r"obs_tokens=6"),
    ("host_tool_raises", HOST, envs.HostToolError,
     r"config\.env \(name='host'\): the tool fails when called on the first 2 prompts with an "
     r"empty turn: raising_tool raised ValueError: cannot read '' on row 0 \(turn 0\).*set "
     r"config\.env\.on_error='observe'"),
    ("host_tool_does_not_import", dict(HOST, tool="test_bad_inputs_env:nope"), ValueError,
     r"config\.env\.tool='test_bad_inputs_env:nope' does not import: AttributeError"),
]


@pytest.mark.parametrize("name,env,exc,msg", CASES, ids=[c[0] for c in CASES])
def test_bad_env_is_named_and_nothing_is_written(name, env, exc, msg, tmp_path):
  del name
  workdir = tmp_path / "w"
  with pytest.raises(exc, match=msg):
    online_loop.train(_config(workdir, env))
  assert not os.path.isdir(workdir) or os.listdir(workdir) == []


def test_single_turn_sampler_keys_with_an_environment_are_named(tmp_path):
  c = _config(tmp_path / "w", {"name": "test_note"})
  c.sampling["compact_stages"] = 1
  with pytest.raises(ValueError, match=r"config key 'sampling\.compact_stages'=1 applies to "
                                       r"the single-turn sampler.*unset it"):
    online_loop.train(c)
  assert not os.path.isdir(tmp_path / "w")


def test_raising_host_tool_under_observe_gives_the_error_as_observation(tmp_path):
  c = _config(tmp_path / "w", dict(HOST, on_error="observe", turn_tokens=4, obs_tokens=40),
              episode_tokens=2 * 4 + 40)
  built = online_loop._build(c)  # pylint: disable=protected-access  (passes check_env)
  env = built.env
  batch = envs.prompt_batch(built.tok, [{"prompt": "1+2="}])
  state, _, _ = env.reset(jax.random.PRNGKey(0), {k: jnp.asarray(v) for k, v in batch.items()})
  ids = np.asarray([built.tok.encode("12")], np.int32)
  obs, mask, reward, done = jax.jit(env.step)(state, jnp.asarray(ids),
                                               jnp.ones(ids.shape, bool))[1:]
  text = built.tok.decode(np.asarray(obs[0])[np.asarray(mask[0])])
  assert text.startswith("error: ValueError: cannot read 12"), text
  assert float(reward[0]) == 0.0 and not bool(done[0])
  assert not os.path.isdir(tmp_path / "w")
