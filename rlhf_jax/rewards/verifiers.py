"""Pure-jnp verifiers over token ids (run inside `jit`, no host round trip).

Each builder returns a reward function `fn(prompt_ids, completion_ids,
completion_mask, batch_extras) -> [N]` (see `rlhf_jax.rewards.base`).
Completions are left-aligned: valid tokens first, padding after.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from rlhf_jax.rewards.base import RewardFn, check_reward_inputs, get_extra


def truncate_at_eos(completion_ids: jax.Array, completion_mask: jax.Array,
                    eos_id: Optional[int]) -> jax.Array:
  """Mask [N, T] of the tokens strictly before the first `eos_id` (all of mask if None)."""
  mask = completion_mask.astype(bool)
  if eos_id is None:
    return mask
  seen = jnp.cumsum((completion_ids == eos_id) & mask, axis=1) > 0
  return mask & ~seen


def drop_tokens(ids: jax.Array, mask: jax.Array, drop_ids: Sequence[int]):
  """Removes the tokens in `drop_ids` from each row, keeping the order of the rest.

  Returns `(ids, mask)` [N, T], left-aligned: the kept valid tokens first, then
  masked-out positions (their ids are unspecified).
  """
  drop = jnp.asarray(list(drop_ids), ids.dtype)
  keep = mask.astype(bool) & ~jnp.any(ids[:, :, None] == drop[None, None, :], axis=-1)
  order = jnp.argsort(~keep, axis=1, stable=True)  # kept positions first, in order
  return jnp.take_along_axis(ids, order, axis=1), jnp.take_along_axis(keep, order, axis=1)


def exact_match(*, answer_key: str = "answer_ids", answer_mask_key: str = "answer_mask",
                pad_id: int = 0, eos_id: Optional[int] = None,
                correct: float = 1.0, wrong: float = 0.0,
                ignore_ids: Sequence[int] = ()) -> RewardFn:
  """r = `correct` iff the completion's tokens (before the first eos) equal the answer.

  The answer comes from `batch_extras[answer_key]` [N, A] with its mask from
  `batch_extras[answer_mask_key]` (or `ids != pad_id` when absent). Tokens in
  `ignore_ids` (neutral filler, e.g. "." padding a reasoning trace) are removed
  from the completion before comparing, wherever they occur.
  """
  ignore = tuple(int(i) for i in ignore_ids)
  if eos_id is not None and eos_id in ignore:
    raise ValueError(f"ignore_ids {ignore} must not contain eos_id={eos_id}")

  def fn(prompt_ids, completion_ids, completion_mask, batch_extras):
    check_reward_inputs(prompt_ids, completion_ids, completion_mask)
    ans = get_extra(batch_extras, answer_key, "exact_match")
    if ans.ndim != 2 or ans.shape[0] != completion_ids.shape[0]:
      raise ValueError(f"batch_extras[{answer_key!r}] must be [N, A] with N="
                       f"{completion_ids.shape[0]}, got {ans.shape}")
    ans_mask = batch_extras.get(answer_mask_key) if batch_extras else None
    ans_mask = (ans != pad_id) if ans_mask is None else ans_mask.astype(bool)
    mask = truncate_at_eos(completion_ids, completion_mask, eos_id)
    if ignore:
      completion_ids, mask = drop_tokens(completion_ids, mask, ignore)
    t, a = completion_ids.shape[1], ans.shape[1]
    width = max(t, a)
    pad = lambda x, fill: jnp.pad(x, ((0, 0), (0, width - x.shape[1])), constant_values=fill)
    c_ids, c_mask = pad(completion_ids, pad_id), pad(mask, False)
    a_ids, a_mask = pad(ans, pad_id), pad(ans_mask, False)
    same_len = jnp.sum(c_mask, 1) == jnp.sum(a_mask, 1)
    same_tok = jnp.all(jnp.where(a_mask, c_ids == a_ids, True), axis=1)
    return jnp.where(same_len & same_tok, correct, wrong).astype(jnp.float32)
  return fn


def length_in_range(*, min_len: int = 0, max_len: Optional[int] = None,
                    eos_id: Optional[int] = None) -> RewardFn:
  """Format check r = 1 iff min_len ≤ |y| ≤ max_len (|y| counts tokens before eos)."""
  def fn(prompt_ids, completion_ids, completion_mask, batch_extras):
    del batch_extras
    check_reward_inputs(prompt_ids, completion_ids, completion_mask)
    n = jnp.sum(truncate_at_eos(completion_ids, completion_mask, eos_id), axis=1)
    ok = n >= min_len
    if max_len is not None:
      ok = ok & (n <= max_len)
    return ok.astype(jnp.float32)
  return fn


def contains_tokens(required_ids: Sequence[int]) -> RewardFn:
  """Format check r = 1 iff every id in `required_ids` occurs among the valid tokens."""
  required = jnp.asarray(list(required_ids), jnp.int32)
  if required.ndim != 1 or required.size == 0:
    raise ValueError("required_ids must be a non-empty sequence of token ids")

  def fn(prompt_ids, completion_ids, completion_mask, batch_extras):
    del batch_extras
    check_reward_inputs(prompt_ids, completion_ids, completion_mask)
    hit = (completion_ids[:, :, None] == required[None, None, :]) & completion_mask.astype(bool)[:, :, None]
    return jnp.all(jnp.any(hit, axis=1), axis=1).astype(jnp.float32)
  return fn


def terminated(eos_id: int) -> RewardFn:
  """Format check r = 1 iff the completion contains `eos_id` (was not truncated)."""
  return contains_tokens([eos_id])
