"""Model passes of the score phase for reward transforms that declare them.

`config.reward_shaping` transforms declare their inputs (`rlhf_jax.rewards.transforms`).
Two of them cost the step a pass of the sampling policy, which this module runs:

  answer_logps / answer_mask  [N, A]: the token log-probs of the prompt's reference answer
      (+ EOS) written after each completion (the completion's own EOS dropped):
      log π(y*_t | x, y, y*_<t)  ("reference_logprob");
  prompt_free_logps [N, T]: the completion's token log-probs without its prompt,
      log π(y_t | y_<t) (the first token has no context: 0)  ("sar").

No gradient flows through either.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp

from rlhf_jax import models as models_lib
from rlhf_jax.rewards import transforms
from rlhf_jax.train import phases


def answer_logps(model, params, ro: phases.Rollout, prompt_batch, *, group_size: int,
                 eos_ids: Tuple[int, ...], vocab_limit: Optional[int] = None):
  """(token log-probs [N, A + 1], mask [N, A + 1] float32) of each row's reference answer
  plus EOS right after [prompt, completion without its EOS]; 0 where masked.

  The answer is placed directly after each row's last kept completion token (a gather, so
  the shapes stay static): the first answer token is predicted from that token's state,
  never from a padding slot.
  """
  ids, mask = phases.reference_answers(
      prompt_batch, eos_ids[0], "config.reward_shaping 'reference_logprob' scores the "
      "prompts' reference answers")
  ids, mask = jnp.repeat(ids, group_size, axis=0), jnp.repeat(mask, group_size, axis=0)
  n, t = ro.completion_ids.shape
  a = ids.shape[1]
  keep = ro.completion_mask.astype(bool) & ~jnp.isin(ro.completion_ids,
                                                      jnp.asarray(eos_ids, jnp.int32))
  kept = jnp.sum(keep, axis=1)[:, None]                          # a prefix of each row
  j = jnp.arange(t + a)[None, :]
  comp = jnp.concatenate([ro.completion_ids, jnp.zeros((n, a), ro.completion_ids.dtype)], 1)
  k = jnp.clip(j - kept, 0, a - 1)
  in_answer = (j >= kept) & (jnp.take_along_axis(mask, k, axis=1) > 0)
  tail = jnp.where(j < kept, comp, jnp.where(in_answer, jnp.take_along_axis(ids, k, 1), 0))
  full = jnp.concatenate([ro.prompt_ids, tail.astype(ro.prompt_ids.dtype)], axis=1)
  attn = jnp.concatenate([ro.prompt_mask.astype(bool), (j < kept) | in_answer], axis=1)
  model.config.check_sequence_length(
      full.shape[1], what="reward_shaping 'reference_logprob': prompt + completion + "
      "reference answer", fix="shorten sampling.max_new_tokens or data.max_prompt_length")
  lp, _ = phases.completion_logps(model, params, full, attn, ro.prompt_ids.shape[1], 1,
                                  vocab_limit)                  # [N, T + A]
  at = jnp.minimum(kept + jnp.arange(a)[None, :], t + a - 1)
  return jax.lax.stop_gradient(jnp.take_along_axis(lp, at, axis=1)) * mask, mask


def prompt_free_logps(model, params, ro: phases.Rollout, *,
                      vocab_limit: Optional[int] = None) -> jax.Array:
  """log π(y_t | y_<t) of each completion run without its prompt [N, T] (t = 0: 0)."""
  lp, _ = models_lib.token_logps(model, params, ro.completion_ids,
                                 ro.completion_mask.astype(jnp.int32), vocab_limit=vocab_limit)
  return jax.lax.stop_gradient(lp)


class Needs(NamedTuple):
  """Which passes the configured transforms need (built and checked once per step)."""
  answer: bool = False
  prompt_free: bool = False
  eos_ids: Tuple[int, ...] = ()

  @classmethod
  def build(cls, shaping, *, env=None, pref=None, sampling_config=None) -> "Needs":
    needs = set(shaping.needs) & set(transforms.MODEL_INPUTS)
    if not needs:
      return cls()
    names = ", ".join(sorted(n for n, _ in shaping.steps
                             if set(transforms.declaration(n).needs) & needs))
    if env is not None:
      raise ValueError(f"config.reward_shaping ({names}) scores single-turn completions with "
                       "a model pass, which the multi-turn rollout (config.env) does not "
                       "run; remove it")
    if pref is not None and (pref.opponent or pref.reference_answer):
      raise ValueError(f"config.reward_shaping ({names}) runs a model pass over the sampled "
                       f"completions only; rl.preference_loss={pref.loss!r} also scores "
                       "opponents or reference answers: use another loss or remove it")
    eos = tuple(int(e) for e in (getattr(sampling_config, "eos_ids", ()) or ()))
    if "answer_logps" in needs and not eos:
      raise ValueError(f"config.reward_shaping ({names}) scores the reference answer "
                       "followed by EOS: set sampling eos_ids")
    return cls("answer_logps" in needs, "prompt_free_logps" in needs, eos)

  def __call__(self, model, params, ro: phases.Rollout, prompt_batch, group_size: int,
               vocab_limit: Optional[int] = None):
    """The declared inputs by name, or None when no transform needs a pass."""
    out = {}
    if self.answer:
      out["answer_logps"], out["answer_mask"] = answer_logps(
          model, params, ro, prompt_batch, group_size=group_size, eos_ids=self.eos_ids,
          vocab_limit=vocab_limit)
    if self.prompt_free:
      out["prompt_free_logps"] = prompt_free_logps(model, params, ro, vocab_limit=vocab_limit)
    return out or None
