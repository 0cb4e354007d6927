"""`guess_number`: find a hidden number in [1, K] from "higher" / "lower" answers.

Each turn the model writes a guess (decimal digits, ended by a newline or EOS). The
environment answers `"higher\\n"` (the hidden number is larger), `"lower\\n"`,
`"correct\\n"` (the episode ends) or `"invalid\\n"` (the turn is not a number). The reward
of the turn that finds the number is `max(0, 1 − turn_penalty · t)` with t the 0-based
turn index (1.0 for a first-turn hit); every other turn gets 0, and an episode that never
finds it scores 0. The hidden number is `prompt_batch["target"]` when the batch has that
field, else drawn uniformly per prompt from the reset key (shared by the G samples of a
prompt).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Mapping, Tuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.envs import base

ANSWERS = ("higher\n", "lower\n", "correct\n", "invalid\n")
HIGHER, LOWER, CORRECT, INVALID = range(4)


@flax.struct.dataclass
class GuessState:
  """target [B] int32 the hidden number; turn [B] int32 turns taken so far."""
  target: jax.Array
  turn: jax.Array


@dataclasses.dataclass(frozen=True)
class GuessNumberEnv:
  """The guess-the-number environment over token ids (see the module docstring)."""
  obs_tokens: int
  max_value: int
  digits: Tuple[int, ...]
  end_ids: Tuple[int, ...]
  answers: Tuple[Tuple[int, ...], ...]
  answer_masks: Tuple[Tuple[bool, ...], ...]
  turn_penalty: float = 0.1
  target_key: str = "target"

  @classmethod
  def build(cls, tokenizer, *, obs_tokens: int, max_value: int = 16, turn_penalty: float = 0.1,
            target_key: str = "target") -> "GuessNumberEnv":
    what = "guess_number environment"
    if not isinstance(max_value, int) or not 1 <= max_value < 10 ** 6:
      raise base.EnvSpecError(f"{what}: max_value must be an int in [1, 10^6), got {max_value!r}")
    if turn_penalty < 0:
      raise base.EnvSpecError(f"{what}: turn_penalty must be >= 0, got {turn_penalty}")
    digits = base.digit_ids(tokenizer, what)
    ids, mask = base.text_tokens(tokenizer, ANSWERS, obs_tokens, what)
    newline = base.char_ids(tokenizer, "\n", what)
    return cls(obs_tokens=obs_tokens, max_value=max_value,
               digits=tuple(int(d) for d in digits),
               end_ids=tuple(int(i) for i in newline[-1:]) + (int(tokenizer.eos_id),),
               answers=tuple(map(tuple, ids.tolist())),
               answer_masks=tuple(map(tuple, mask.tolist())),
               turn_penalty=float(turn_penalty), target_key=target_key)

  def reset(self, rng: jax.Array, prompt_batch: Mapping[str, jax.Array]):
    """The hidden number per prompt (from the batch, else drawn); no first observation."""
    b = prompt_batch["prompt_ids"].shape[0]
    if self.target_key in prompt_batch:
      target = jnp.asarray(prompt_batch[self.target_key], jnp.int32).reshape(b)
    else:
      target = jax.random.randint(rng, (b,), 1, self.max_value + 1, jnp.int32)
    state = GuessState(target=target, turn=jnp.zeros((b,), jnp.int32))
    return state, jnp.zeros((b, 0), jnp.int32), jnp.zeros((b, 0), bool)

  def step(self, state: GuessState, action_ids: jax.Array, action_mask: jax.Array):
    ids = action_ids.astype(jnp.int32)
    length = jnp.sum(action_mask.astype(bool), axis=1, dtype=jnp.int32)
    last = jnp.take_along_axis(ids, jnp.maximum(length - 1, 0)[:, None], axis=1)[:, 0]
    ended = (length > 0) & jnp.any(last[:, None] == jnp.asarray(self.end_ids), axis=1)
    end = length - ended.astype(jnp.int32)
    guess, ok = base.number_in_span(ids, jnp.asarray(self.digits), jnp.zeros_like(end), end,
                                    len(str(self.max_value)))
    kind = jnp.select([~ok, guess < state.target, guess > state.target],
                      [INVALID, HIGHER, LOWER], CORRECT)
    found = kind == CORRECT
    reward = jnp.where(found, jnp.maximum(0.0, 1.0 - self.turn_penalty * state.turn), 0.0)
    obs_ids = jnp.asarray(np.asarray(self.answers, np.int32))[kind]
    obs_mask = jnp.asarray(np.asarray(self.answer_masks, bool))[kind]
    return (state.replace(turn=state.turn + 1), obs_ids, obs_mask,
            reward.astype(jnp.float32), found)


def prompts(n: int, *, seed: int = 0, max_value: int = 16) -> List[Dict[str, Any]]:
  """`n` prompt records {"prompt": "guess 1-16:\\n", "target": t} (t uniform in [1, K])."""
  rng = np.random.default_rng(seed)
  return [{"prompt": f"guess 1-{max_value}:\n", "target": int(rng.integers(1, max_value + 1))}
          for _ in range(n)]
