"""A prompted LM judge (generative reward model) as a reward function.

The judge input is `prefix + prompt + middle + completion + suffix` (template
token ids around the valid prompt and completion tokens), packed left-aligned.
`logits_fn(ids [N, L], mask [N, L]) -> logits [N, L, V]` is any causal LM (the
policy itself or another model); the reward is read from the next-token
distribution after the last template token:

  log-odds:    r = log p(Yes) − log p(No)
  probability: r = p(Yes) / (p(Yes) + p(No)) = σ(log-odds)

as in rubric / generative RMs (e.g. "Generative Verifiers: Reward Modeling as
Next-Token Prediction", Zhang et al. 2024).
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from rlhf_jax.rewards.base import RewardFn, check_reward_inputs


def pack_segments(ids: Sequence[jax.Array], masks: Sequence[jax.Array]):
  """Concatenate [N, L_i] segments keeping only masked tokens, left-aligned.

  Returns (ids [N, ΣL_i], mask [N, ΣL_i], lengths [N]); padding ids are 0.
  """
  cat_ids = jnp.concatenate(ids, axis=1)
  cat_mask = jnp.concatenate([m.astype(bool) for m in masks], axis=1)
  n, width = cat_ids.shape
  pos = jnp.where(cat_mask, jnp.cumsum(cat_mask, axis=1) - 1, width)
  rows = jnp.broadcast_to(jnp.arange(n)[:, None], (n, width))
  packed = jnp.zeros_like(cat_ids).at[rows, pos].set(cat_ids, mode="drop")
  lengths = jnp.sum(cat_mask, axis=1)
  return packed, jnp.arange(width)[None, :] < lengths[:, None], lengths


def lm_judge(logits_fn: Callable[[jax.Array, jax.Array], jax.Array], *,
             prefix_ids: Sequence[int], middle_ids: Sequence[int], suffix_ids: Sequence[int],
             yes_id: int, no_id: int, probability: bool = False,
             prompt_mask_key: str = "prompt_mask", pad_id: int = 0) -> RewardFn:
  """Reward function scoring each (prompt, completion) with an LM judge's Yes/No odds.

  Args:
    logits_fn: (ids [N, L], mask [N, L]) -> logits [N, L, V].
    prefix_ids, middle_ids, suffix_ids: template token ids (suffix ends where
      the judge's Yes/No answer token would follow, e.g. "... Answer:").
    yes_id, no_id: the answer token ids.
    probability: return p(Yes)/(p(Yes)+p(No)) instead of the log-odds.
    prompt_mask_key: batch_extras key of the prompt mask (else prompt_ids != pad_id).

  Returns:
    fn(...) -> [N] (no gradient to the judge: wrap params with stop_gradient
    inside logits_fn if it closes over trainable ones).
  """
  if not suffix_ids and not middle_ids and not prefix_ids:
    raise ValueError("the judge template is empty: give prefix_ids/middle_ids/suffix_ids")

  def fn(prompt_ids, completion_ids, completion_mask, batch_extras):
    check_reward_inputs(prompt_ids, completion_ids, completion_mask)
    n = prompt_ids.shape[0]
    pm = batch_extras.get(prompt_mask_key) if batch_extras else None
    pm = (prompt_ids != pad_id) if pm is None else pm
    seg = lambda t: jnp.broadcast_to(jnp.asarray(list(t), prompt_ids.dtype).reshape(1, -1),
                                     (n, len(t)))
    parts = [seg(prefix_ids), prompt_ids, seg(middle_ids), completion_ids.astype(prompt_ids.dtype),
             seg(suffix_ids)]
    masks = [jnp.ones(parts[0].shape, bool), pm, jnp.ones(parts[2].shape, bool),
             completion_mask, jnp.ones(parts[4].shape, bool)]
    ids, mask, lengths = pack_segments(parts, masks)
    logits = logits_fn(ids, mask)
    if logits.ndim != 3 or logits.shape[:2] != ids.shape:
      raise ValueError(f"logits_fn must return [N, L, V] with [N, L]={ids.shape}, "
                       f"got {logits.shape}")
    last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
    logp = jax.nn.log_softmax(last.astype(jnp.float32), axis=-1)
    log_odds = logp[:, yes_id] - logp[:, no_id]
    return jax.nn.sigmoid(log_odds) if probability else log_odds
  return fn
