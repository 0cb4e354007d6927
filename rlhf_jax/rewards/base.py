"""The reward-function interface used by the fused RL step, and its combinators.

A reward is `fn(prompt_ids [N, P], completion_ids [N, T], completion_mask [N, T],
batch_extras: dict) -> rewards [N]` (or `[N, K]` for several). Every function
here builds such an `fn`; all of them trace under `jax.jit`.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp

RewardFn = Callable[[jax.Array, jax.Array, jax.Array, Mapping[str, Any]], jax.Array]


def check_reward_inputs(prompt_ids, completion_ids, completion_mask) -> None:
  """Validate the common reward arguments (at trace time); errors name the argument."""
  if jnp.ndim(prompt_ids) != 2:
    raise ValueError(f"prompt_ids must be [N, P], got shape {jnp.shape(prompt_ids)}")
  if jnp.ndim(completion_ids) != 2:
    raise ValueError(f"completion_ids must be [N, T], got shape {jnp.shape(completion_ids)}")
  if jnp.shape(completion_mask) != jnp.shape(completion_ids):
    raise ValueError(f"completion_mask has shape {jnp.shape(completion_mask)} but "
                     f"completion_ids has shape {jnp.shape(completion_ids)}")
  if jnp.shape(prompt_ids)[0] != jnp.shape(completion_ids)[0]:
    raise ValueError(f"prompt_ids has {jnp.shape(prompt_ids)[0]} rows but completion_ids "
                     f"has {jnp.shape(completion_ids)[0]}; pass one prompt row per completion")


def get_extra(batch_extras: Mapping[str, Any], key: str, who: str):
  """`batch_extras[key]` with a KeyError that names the reward needing it."""
  try:
    return batch_extras[key]
  except (KeyError, TypeError):
    raise KeyError(f"{who} needs batch_extras[{key!r}]; present keys: "
                   f"{sorted(batch_extras) if batch_extras else []}") from None


def combine(reward_fns: Sequence[RewardFn], weights: Optional[Sequence[float]] = None,
            *, stack: bool = False) -> RewardFn:
  """Weighted sum Σ_i w_i·r_i(...) of scalar reward functions ([N] each).

  With `stack=True` returns the weighted rewards side by side, `[N, K]`, for
  multi-reward estimators (e.g. GDPO) instead of summing.
  """
  reward_fns = list(reward_fns)
  if not reward_fns:
    raise ValueError("reward_fns must contain at least one reward function")
  weights = [1.0] * len(reward_fns) if weights is None else list(weights)
  if len(weights) != len(reward_fns):
    raise ValueError(f"weights has {len(weights)} entries but reward_fns has "
                     f"{len(reward_fns)}; give one weight per reward function")

  def fn(prompt_ids, completion_ids, completion_mask, batch_extras):
    outs = []
    for i, (f, w) in enumerate(zip(reward_fns, weights)):
      r = f(prompt_ids, completion_ids, completion_mask, batch_extras)
      if jnp.ndim(r) != 1:
        raise ValueError(f"reward_fns[{i}] returned shape {jnp.shape(r)}; combine needs [N] "
                         "rewards (split a [N, K] reward first)")
      outs.append(w * r.astype(jnp.float32))
    return jnp.stack(outs, axis=-1) if stack else sum(outs[1:], outs[0])
  return fn


def from_model(apply_fn: Callable, params: Any, *, stop_gradient: bool = True) -> RewardFn:
  """Wrap a reward model: `apply_fn(params, prompt_ids, completion_ids, completion_mask,
  batch_extras) -> [N]` (or [N, K]) becomes a reward function with bound `params`.

  Gradients never flow into the reward model when `stop_gradient` (the default).
  To refresh params inside a jitted step, rebuild the fn there (it is cheap).
  """
  def fn(prompt_ids, completion_ids, completion_mask, batch_extras):
    check_reward_inputs(prompt_ids, completion_ids, completion_mask)
    p = jax.lax.stop_gradient(params) if stop_gradient else params
    r = apply_fn(p, prompt_ids, completion_ids, completion_mask, batch_extras)
    if jnp.ndim(r) not in (1, 2) or jnp.shape(r)[0] != jnp.shape(completion_ids)[0]:
      raise ValueError(f"apply_fn returned shape {jnp.shape(r)}; expected [N] or [N, K] with "
                       f"N={jnp.shape(completion_ids)[0]}")
    return r
  return fn


def reward_model(model, params: Any, *, stop_gradient: bool = True) -> RewardFn:
  """A reward-head model's score of each prompt + completion: r = RM([prompt; completion]).

  `model.apply(params, ids, attention_mask)` -> [N] (the rlhf_jax reward head: the score at the
  last attended token). The prompt's padding comes from `batch_extras["prompt_mask"]`
  [N, P] (the fused RL step passes it); left-padded prompts and right-padded completions
  give one contiguous sequence per row, so padding does not change the reward.
  """
  who = "reward_model"

  def apply_fn(p, prompt_ids, completion_ids, completion_mask, batch_extras):
    prompt_mask = get_extra(batch_extras, "prompt_mask", who)
    if jnp.shape(prompt_mask) != jnp.shape(prompt_ids):
      raise ValueError(f"{who}: prompt_mask has shape {jnp.shape(prompt_mask)} but prompt_ids "
                       f"has {jnp.shape(prompt_ids)}")
    ids = jnp.concatenate([prompt_ids, completion_ids], axis=1)
    mask = jnp.concatenate([prompt_mask.astype(bool), completion_mask.astype(bool)], axis=1)
    return model.apply(p, ids, attention_mask=mask)
  return from_model(apply_fn, params, stop_gradient=stop_gradient)
