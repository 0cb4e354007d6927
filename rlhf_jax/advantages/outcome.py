"""Estimators over binary (verifier) outcomes: PSR / NSR / W-REINFORCE and pass@k.

Rewards are `[N]` floats; a sample counts as correct when `reward > threshold`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.special import gammaln

from rlhf_jax.advantages import base
from rlhf_jax.advantages.registry import register
from rlhf_jax.losses.common import check_float, check_nonnegative, check_rank


def _correct(rewards: jax.Array, threshold: float) -> jax.Array:
  check_rank(rewards, 1, "rewards")
  check_float(rewards, "rewards")
  return (rewards > threshold).astype(rewards.dtype)


@register("w_reinforce", family="outcome")
def w_reinforce(rewards: jax.Array, *, positive_weight: float = 0.1,
                negative_weight: float = 1.0, threshold: float = 0.5) -> jax.Array:
  """Weighted REINFORCE: A = +λ on correct samples, −1 on incorrect ones.

  A_i = λ·1[r_i correct] − 1[r_i incorrect],  λ = 0.1.

  The Surprising Effectiveness of Negative Reinforcement in LLM Reasoning
  (Zhu et al., 2025). Shapes: rewards [N] -> [N]. Not group-relative: a group
  that is all wrong still gets −1 (that is the method); no std division.
  """
  check_nonnegative("w_reinforce", positive_weight=positive_weight, negative_weight=negative_weight)
  c = _correct(rewards, threshold)
  return positive_weight * c - negative_weight * (1.0 - c)


@register("psr", family="outcome")
def psr(rewards: jax.Array, *, threshold: float = 0.5) -> jax.Array:
  """Positive Sample Reinforcement: A = +1 on correct samples, 0 otherwise.

  Zhu et al., 2025 (see `w_reinforce`). Shapes: rewards [N] -> [N].
  """
  return w_reinforce(rewards, positive_weight=1.0, negative_weight=0.0, threshold=threshold)


@register("nsr", family="outcome")
def nsr(rewards: jax.Array, *, threshold: float = 0.5) -> jax.Array:
  """Negative Sample Reinforcement: A = −1 on incorrect samples, 0 otherwise.

  Zhu et al., 2025 (see `w_reinforce`). Shapes: rewards [N] -> [N]. An all-wrong
  group keeps its −1 signal by design (the method learns from it).
  """
  return w_reinforce(rewards, positive_weight=0.0, negative_weight=1.0, threshold=threshold)


def _log_comb(n: jax.Array, k: jax.Array) -> jax.Array:
  return gammaln(n + 1.0) - gammaln(k + 1.0) - gammaln(n - k + 1.0)


def comb_ratio(a: jax.Array, b: jax.Array, k: jax.Array) -> jax.Array:
  """C(a, k) / C(b, k) for 0 ≤ a ≤ b, k ≤ b; 0 where a < k."""
  a = jnp.asarray(a, jnp.result_type(float))
  safe_a = jnp.maximum(a, k)
  ratio = jnp.exp(_log_comb(safe_a, k) - _log_comb(jnp.asarray(b, a.dtype), k))
  return jnp.where(a < k, 0.0, jnp.where(a == b, 1.0, ratio))


def pass_at_k(num_samples: jax.Array, num_correct: jax.Array, *, k: int) -> jax.Array:
  """Unbiased pass@k from n samples with c correct: 1 − C(n−c, k)/C(n, k).

  Evaluating Large Language Models Trained on Code (Chen et al., 2021).
  Shapes: any broadcastable arrays -> same shape. Requires k ≤ n.
  """
  n = jnp.asarray(num_samples, jnp.result_type(float))
  return 1.0 - comb_ratio(n - num_correct, n, k)


@register("passk", family="outcome", needs=("group_size",))
def passk(rewards: jax.Array, *, group_size: int, k: int, threshold: float = 0.5,
          eps: float = 1e-6) -> jax.Array:
  """Analytical pass@k advantage of a group of n = G binary outcomes with c correct.

  R̄ = 1 − C(n−c, k)/C(n, k),  σ = √(R̄(1−R̄)),
  A_pos = (1 − R̄)/σ,  A_neg = (1 − R̄ − C(n−c−1, k−1)/C(n−1, k−1))/σ.

  Pass@k Training for Adaptively Balancing Exploration and Exploitation of
  Large Reasoning Models (Chen et al., 2025). Shapes: rewards [N] -> [N];
  1 ≤ k ≤ G. k = 1 gives GRPO's z-score (population std) on binary rewards.
  All-correct and all-wrong groups give 0.
  """
  check_nonnegative("passk", eps=eps)
  if not isinstance(k, int) or not 1 <= k <= group_size:
    raise ValueError(f"k must be an int in [1, group_size={group_size}], got {k!r}")
  c01 = _correct(rewards, threshold)
  c01g = base.group_view(c01, group_size)
  n = float(group_size)
  c = jnp.sum(c01g, axis=-1, keepdims=True)
  r_bar = 1.0 - comb_ratio(n - c, n, k)
  sigma = jnp.sqrt(jnp.maximum(r_bar * (1.0 - r_bar), 0.0))
  a_pos = (1.0 - r_bar) / (sigma + eps)
  a_neg = (1.0 - r_bar - comb_ratio(n - c - 1.0, n - 1.0, k - 1)) / (sigma + eps)
  degenerate = (c == 0) | (c == n)  # exact zeros, whatever lgamma's rounding
  return jnp.where(degenerate, 0.0, jnp.where(c01g > 0, a_pos, a_neg)).reshape(-1)
