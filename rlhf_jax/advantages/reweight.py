"""Advantage re-weightings: ADORA (group gating), THR (token), COPO (global/local blend)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from rlhf_jax.advantages import base
from rlhf_jax.advantages.group import grpo
from rlhf_jax.advantages.registry import register
from rlhf_jax.losses.common import check_nonnegative, check_positive, check_range, check_rank


@register("adora", family="reweight", needs=("lengths", "group_size"))
def adora(rewards: jax.Array, *, lengths: jax.Array, group_size: int, weight: float = 0.1,
          threshold: float = 0.5, eps: float = 1e-6) -> jax.Array:
  """ADORA (LM variant): GRPO z-score, damped on groups whose correct answers are short.

  A = grpo(r);  if max_{correct} l ≤ mean_{incorrect} l then A ← λ·A (λ = 0.1).

  ADORA: Training Reasoning Models with Dynamic Advantage Estimation on
  Reinforcement Learning (2025; rule from the official code). Shapes: rewards
  [N], lengths [N] -> [N]. Choice: a group with no correct or no incorrect
  sample is never damped (its GRPO advantage is 0 anyway).
  """
  check_nonnegative("adora", weight=weight, eps=eps)
  a = grpo(rewards, group_size=group_size, eps=eps).reshape(-1, group_size)
  if lengths.shape != rewards.shape:
    raise ValueError(f"lengths has shape {lengths.shape} but rewards has {rewards.shape}")
  l = lengths.astype(a.dtype).reshape(a.shape)
  ok = rewards.reshape(a.shape) > threshold
  n_ok = jnp.sum(ok, axis=-1)
  n_bad = group_size - n_ok
  max_ok = jnp.max(jnp.where(ok, l, -jnp.inf), axis=-1)
  mean_bad = jnp.sum(jnp.where(ok, 0.0, l), axis=-1) / jnp.maximum(n_bad, 1)
  damp = (n_ok > 0) & (n_bad > 0) & (max_ok <= mean_bad)
  return (a * jnp.where(damp, weight, 1.0)[:, None]).reshape(-1)


@register("thr", family="reweight", needs=("token_hidden_reward", "mask"))
def thr(advantages: jax.Array, *, token_hidden_reward: jax.Array, mask: jax.Array,
        p: float = 0.1, min_abs: float = 0.0) -> jax.Array:
  """THR-guided token re-weighting of advantages.

  A_t ← A_t·(1 + p·sign(THR_t)) where |THR_t| > min_abs, else A_t unchanged.
  p > 0 favours exploitation (greedy accuracy), p < 0 exploration (pass@k).

  Token Hidden Reward: Steering Exploration-Exploitation in Group Relative
  Deep RL (2025). [unverified] form derived from the abstract; the caller
  computes THR_t (each token's influence on the likelihood of correct
  responses). Shapes: advantages [B] or [B, T], token_hidden_reward, mask
  [B, T] -> [B, T] (0 where masked).
  """
  check_range("thr", "p", p, lambda v: -1 <= v <= 1, "in [-1, 1]")
  check_nonnegative("thr", min_abs=min_abs)
  check_rank(token_hidden_reward, 2, "token_hidden_reward")
  if token_hidden_reward.shape != mask.shape:
    raise ValueError(f"token_hidden_reward {token_hidden_reward.shape} and mask "
                     f"{mask.shape} must match")
  if advantages.shape not in ((mask.shape[0],), mask.shape):
    raise ValueError(f"advantages must be [B] or [B, T]={mask.shape}, got {advantages.shape}")
  a = advantages[:, None] if advantages.ndim == 1 else advantages
  active = jnp.abs(token_hidden_reward) > min_abs
  scale = jnp.where(active, 1.0 + p * jnp.sign(token_hidden_reward), 1.0)
  return jnp.where(mask.astype(bool), a * scale, 0.0)


class CopoAdvantages(NamedTuple):
  """COPO's two advantages and the blend weight; loss = (1−w)·L(A_g) + w·L(A_local)."""
  global_: jax.Array
  local: jax.Array
  weight: jax.Array

  def combine(self) -> jax.Array:
    """The blended advantage (1 − w)·A_g + w·A_local [N]: the loss blend for any surrogate
    linear in the advantage (REINFORCE; PPO's ratio terms while unclipped), which is how the
    RL step uses COPO."""
    return (1.0 - self.weight) * self.global_ + self.weight * self.local


def answer_entropy(answer_ids: jax.Array, *, group_size: int) -> jax.Array:
  """Base-2 entropy of the final-answer distribution in each group: [N] ints -> [N // G]."""
  ids = answer_ids.reshape(-1, group_size)
  freq = jnp.mean((ids[:, :, None] == ids[:, None, :]).astype(jnp.float32), axis=-1)
  return -jnp.mean(jnp.log2(freq), axis=-1)


@register("copo", family="reweight", needs=("answer_ids", "group_size"))
def copo(rewards: jax.Array, *, answer_ids: jax.Array, group_size: int, k: float = 5.0,
         b: float = 1.0, entropy_penalty: float = 0.0, eps: float = 1e-6) -> CopoAdvantages:
  """COPO: consistency-aware global advantage blended with the local GRPO advantage.

  H = entropy₂ of the group's final answers;  R_g = mean_G r·(1 − λH);
  A_g = z-score of R_g over the batch's groups;  A_local = grpo(r);
  w = σ(k(H − b)) (k = 5, b = 1);  loss = (1 − w)·L(A_g) + w·L(A_local).

  COPO: Consistency-Aware Policy Optimization (2025; official code). Shapes:
  rewards [N], answer_ids [N] int -> CopoAdvantages of [N] arrays. By design a
  consistent group (all-equal rewards) gets a non-zero global advantage.
  """
  check_positive("copo", k=k)
  check_nonnegative("copo", entropy_penalty=entropy_penalty, eps=eps)
  r = base.group_view(rewards, group_size)
  if answer_ids.shape != rewards.shape or not jnp.issubdtype(answer_ids.dtype, jnp.integer):
    raise ValueError(f"answer_ids must be integer ids of shape {rewards.shape}, got "
                     f"{answer_ids.shape} {answer_ids.dtype}")
  h = answer_entropy(answer_ids, group_size=group_size).astype(r.dtype)
  r_g = jnp.mean(r, axis=-1) * (1.0 - entropy_penalty * h)
  c = r_g - jnp.mean(r_g)
  a_g = c / (base.safe_sqrt(jnp.mean(c ** 2)) + eps)
  w = jax.nn.sigmoid(k * (h - b))
  rep = lambda x: jnp.repeat(x, group_size)
  return CopoAdvantages(global_=rep(a_g), local=grpo(rewards, group_size=group_size, eps=eps),
                        weight=rep(w))
