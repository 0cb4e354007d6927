"""The policy's and reference's passes over sampled [prompt, completion] rows that the
signals and learn phases read: completion log-probs, logits at the completion positions, and
THR's LM-head influence (re-exported by `rlhf_jax.train.phases`)."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from rlhf_jax import models as models_lib
from rlhf_jax.advantages import hidden_reward as hidden_reward_lib


def completion_logps(model, params, ids, attn, prompt_len: int, group: int,
                     vocab_limit: Optional[int] = None, vocab_mean: bool = False):
  """Completion log-probs / entropies of [prompt, completion] rows.

  When consecutive groups of `group` rows share their prompt (as sampled), each prompt
  runs through the model once (`models.completion_logps`); otherwise every row is run in
  full. Both give the same values. `vocab_limit`: over the real vocabulary only, as the
  sampler's `SamplingConfig.vocab_limit` (a padded model vocabulary). With `vocab_mean`
  a third output: the vocabulary mean of the log-softmax at each completion position.
  """
  if group > 1 and ids.shape[0] % group == 0:
    return models_lib.completion_logps(
        model, params, ids[::group, :prompt_len], attn[::group, :prompt_len],
        ids[:, prompt_len:], attn[:, prompt_len:], group_size=group, vocab_limit=vocab_limit,
        vocab_mean=vocab_mean)
  outs = models_lib.token_logps(model, params, ids, attn, vocab_limit=vocab_limit,
                                vocab_mean=vocab_mean)
  return tuple(x[:, prompt_len:] for x in outs)


def completion_logits(model, params, ids, attn, prompt_len: int,
                      vocab_limit: Optional[int] = None) -> jax.Array:
  """[N, T, V] float32 logits at the positions that predict the completion tokens of
  [prompt, completion] rows (`vocab_limit`: the real vocabulary only)."""
  logits = model.apply(params, ids, attention_mask=attn)[:, prompt_len - 1:-1]
  if vocab_limit is not None:
    logits = logits[..., :vocab_limit]
  return logits.astype(jnp.float32)


def head_influence(model, params, ro, rewards: jax.Array, *, group_size: int,
                   vocab_limit: Optional[int] = None) -> jax.Array:
  """[N, T] `lm_head_influence` of every completion token under `params` (the sampling
  policy), towards the responses above their group's mean reward: one forward pass for the
  final-norm hidden states and the LM head's logits (gradient-free)."""
  params = jax.lax.stop_gradient(params)
  h = model.hidden(params, ro.ids, ro.attn)[:, ro.prompt_len - 1:-1]
  logits = model.logits_from_hidden(params, h)
  if vocab_limit is not None:
    logits = logits[..., :vocab_limit]
  weights = hidden_reward_lib.correct_token_weights(rewards, ro.loss_mask, group_size=group_size)
  return hidden_reward_lib.lm_head_influence(h, logits, ro.completion_ids, ro.loss_mask, weights,
                                             group_size=group_size)
