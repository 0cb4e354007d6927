"""Reward shaping and transforms: pure functions over reward / log-prob arrays.

Stateful pieces (constrained-RLHF multipliers, dynamic reward weights) are in
`shaping_state.py`; STARC in `starc.py`; ensemble combination in `ensemble.py`.
"""

from __future__ import annotations

from typing import Optional, Union

import jax
import jax.numpy as jnp

from rlhf_jax.advantages.turn import pure_min_form  # noqa: F401  (PURE lives with the turn estimators)
from rlhf_jax.losses.common import (check_float, check_inputs, check_nonnegative, check_positive,
                                    check_rank, check_unit_interval, masked_mean, masked_sum)

ArrayOrFloat = Union[jax.Array, float]


def _sg(x, stop: bool):
  return jax.lax.stop_gradient(x) if stop else x


def kl_in_reward(rewards: jax.Array, logps: jax.Array, ref_logps: jax.Array,
                 mask: jax.Array, *, beta: ArrayOrFloat,
                 stop_gradient: bool = True) -> jax.Array:
  """Per-token KL-in-reward: r_t = −β(log π(y_t) − log π_ref(y_t)) + 1[t = last]·r.

  The sequence reward r lands on the last valid token. "Fine-Tuning Language
  Models from Human Preferences" (Ziegler et al. 2019); InstructGPT. Use an
  adaptive β controller from `rlhf_jax.losses.kl` if you need a KL target.

  Args:
    rewards: [N] sequence rewards; logps, ref_logps, mask: [N, T].
    beta: KL coefficient β (scalar).

  Returns:
    [N, T] token rewards (0 where mask is False).
  """
  check_rank(rewards, 1, "rewards")
  check_inputs(rank=2, logps=logps, ref_logps=ref_logps)
  if mask.shape != logps.shape:
    raise ValueError(f"mask has shape {mask.shape} but logps has shape {logps.shape}")
  m = mask.astype(bool)
  kl = _sg(logps - ref_logps, stop_gradient)
  last = jnp.max(jnp.where(m, jnp.arange(m.shape[1])[None, :], -1), axis=1)
  at_last = jnp.arange(m.shape[1])[None, :] == last[:, None]
  return jnp.where(m, -beta * kl + jnp.where(at_last, rewards[:, None], 0.0), 0.0)


def lsc(rewards: jax.Array, ref_rewards: ArrayOrFloat) -> jax.Array:
  """Log-sigmoid centring u = log σ(r − r_ref) (same shape as `rewards`).

  r_ref: e.g. `lsc_reference(reference-policy rewards)` (85th percentile).
  "Transforming and Combining Rewards for Aligning Large Language Models"
  (Wang et al. 2024).
  """
  check_float(rewards, "rewards")
  return jax.nn.log_sigmoid(rewards - ref_rewards)


def lsc_reference(ref_policy_rewards: jax.Array, *, quantile: float = 0.85,
                  axis: int = -1) -> jax.Array:
  """r_ref = the `quantile` (85th percentile) of reference-policy rewards along `axis`."""
  check_unit_interval("lsc_reference", quantile=quantile)
  return jnp.quantile(ref_policy_rewards, quantile, axis=axis)


def lsc_reference_normal(mean: ArrayOrFloat, std: ArrayOrFloat, *,
                         z: float = 1.0364) -> ArrayOrFloat:
  """r_ref = μ + 1.0364σ: the 85th percentile of a fitted normal."""
  return mean + z * std


def sum_log_sigmoid(rewards: jax.Array, ref_rewards: jax.Array) -> jax.Array:
  """Combine K rewards as Σ_k log σ(r_k − r_k^ref) (a soft AND). [N, K], [K] or [N, K] -> [N]."""
  check_rank(rewards, 2, "rewards")
  if jnp.shape(ref_rewards) not in (rewards.shape[-1:], rewards.shape):
    raise ValueError(f"ref_rewards must have shape {rewards.shape[-1:]} or {rewards.shape}, "
                     f"got {jnp.shape(ref_rewards)}")
  return jnp.sum(lsc(rewards, jnp.broadcast_to(ref_rewards, rewards.shape)), axis=-1)


def par(rewards: jax.Array, ref_rewards: jax.Array,
        ref_mask: Optional[jax.Array] = None) -> jax.Array:
  """Preference As Reward: r_RL = (1/M) Σ_m σ(r − r_ref,m) over M reference responses.

  "Reward Shaping to Mitigate Reward Hacking in RLHF" (Fu et al. 2025), M = 10
  samples of π_SFT per prompt; M = 1 gives σ(r − r_ref).

  Args:
    rewards: [N]; ref_rewards: [N, M]; ref_mask: optional [N, M].

  Returns:
    [N] in (0, 1).
  """
  check_rank(rewards, 1, "rewards")
  check_rank(ref_rewards, 2, "ref_rewards")
  if ref_rewards.shape[0] != rewards.shape[0]:
    raise ValueError(f"ref_rewards has {ref_rewards.shape[0]} rows, rewards has {rewards.shape[0]}")
  return masked_mean(jax.nn.sigmoid(rewards[:, None] - ref_rewards), ref_mask, axis=1)


def _check_flip_rates(rho0, rho1) -> None:
  if isinstance(rho0, (int, float)) and isinstance(rho1, (int, float)):
    if rho0 < 0 or rho1 < 0 or rho0 + rho1 >= 1:
      raise ValueError(f"need rho0, rho1 >= 0 and rho0 + rho1 < 1, got rho0={rho0}, rho1={rho1}")


def noisy_backward_correction(noisy_rewards: jax.Array, *, rho0: ArrayOrFloat,
                              rho1: ArrayOrFloat) -> jax.Array:
  """Unbiased reward under a noisy binary verifier: R̂ = (R̃ − ρ0)/(1 − ρ0 − ρ1).

  ρ0 = P(R̃=1 | R=0) (false positive), ρ1 = P(R̃=0 | R=1) (false negative);
  E[R̂ | R] = R. ρ0 = ρ1 = 0 is the identity. "Reinforcement Learning with
  Verifiable yet Noisy Rewards under Imperfect Verifiers" (Cai et al. 2025).
  """
  _check_flip_rates(rho0, rho1)
  return (noisy_rewards - rho0) / (1.0 - rho0 - rho1)


def noisy_forward_weights(noisy_rewards: jax.Array, *, rho1: ArrayOrFloat,
                          rho0: ArrayOrFloat = 0.0) -> jax.Array:
  """Forward-corrected policy-gradient weights: w = ρ1 if R̃ = 1, ρ1 − 1 if R̃ = 0.

  E[w | R] = (1 − ρ0 − ρ1)(R − 1): proportional to the clean reward up to a
  constant baseline, so the expected update is the clean gradient direction.
  ρ0 = ρ1 = 0 gives w = R̃ − 1 (identity up to that baseline). Same paper as
  `noisy_backward_correction`. R̃ is binary {0, 1}.
  """
  _check_flip_rates(rho0, rho1)
  return jnp.where(noisy_rewards > 0.5, rho1, rho1 - 1.0).astype(
      jnp.result_type(noisy_rewards, jnp.float32))


def length_penalty(lengths: jax.Array, *, coef: float, max_length: Optional[int] = None
                   ) -> jax.Array:
  """Linear length penalty −coef·L (or −coef·L/L_max when `max_length` is given). [N]."""
  check_nonnegative("length_penalty", coef=coef)
  lengths = jnp.asarray(lengths, jnp.float32)
  return -coef * (lengths / max_length if max_length else lengths)


def overlong_penalty(lengths: jax.Array, *, max_length: int, cache_length: int) -> jax.Array:
  """DAPO soft overlong punishment.

  R = 0 if L ≤ L_max − L_cache; ((L_max − L_cache) − L)/L_cache if L_max − L_cache < L ≤ L_max;
  −1 if L > L_max. "DAPO: An Open-Source LLM Reinforcement Learning System at
  Scale" (Yu et al. 2025). Added to the task reward. [N] -> [N].
  """
  if not 0 < cache_length <= max_length:
    raise ValueError(f"need 0 < cache_length <= max_length, got {cache_length}, {max_length}")
  lengths = jnp.asarray(lengths, jnp.float32)
  soft = max_length - cache_length
  return jnp.where(lengths <= soft, 0.0,
                   jnp.where(lengths <= max_length, (soft - lengths) / cache_length, -1.0))


def reference_logprob_reward(ref_answer_logps: jax.Array, mask: jax.Array, *,
                             normalize: bool = True) -> jax.Array:
  """r = log π(y_ref | x, y): log-prob of a reference answer (token mean if `normalize`).

  The token log-probs come from the policy scoring the reference answer after
  its own completion (e.g. follow-up likelihood, FLR: "Aligning Language Models
  Using Follow-up Likelihood as Reward Signal", Zhang et al. 2024).
  [N, T], [N, T] -> [N].
  """
  check_rank(ref_answer_logps, 2, "ref_answer_logps")
  return (masked_mean if normalize else masked_sum)(ref_answer_logps, mask, axis=1)


def relative_perplexity_reward(cond_logps: jax.Array, uncond_logps: jax.Array,
                               mask: jax.Array) -> jax.Array:
  """Self-aligned reward: relative perplexity drop from conditioning on the query.

  SAR = (PPL(y) − PPL(y | x)) / PPL(y),  PPL = exp(−mean_t log p).
  [unverified form] "Self-Aligned Reward: Towards Effective and Efficient
  Reasoners" (2025). cond_logps: log p(y_t | x, y_<t); uncond_logps: log p(y_t | y_<t). [N, T] -> [N].
  """
  check_inputs(rank=2, cond_logps=cond_logps, uncond_logps=uncond_logps)
  ppl_c = jnp.exp(-masked_mean(cond_logps, mask, axis=1))
  ppl_u = jnp.exp(-masked_mean(uncond_logps, mask, axis=1))
  return (ppl_u - ppl_c) / ppl_u


def cosine_similarity_reward(embeddings: jax.Array, ref_embeddings: jax.Array, *,
                             eps: float = 1e-8) -> jax.Array:
  """r = ⟨e, e_ref⟩ / (‖e‖‖e_ref‖) of encoder embeddings. [N, D], [N, D] -> [N]."""
  check_positive("cosine_similarity_reward", eps=eps)
  check_inputs(rank=2, embeddings=embeddings, ref_embeddings=ref_embeddings)
  num = jnp.sum(embeddings * ref_embeddings, axis=-1)
  den = jnp.linalg.norm(embeddings, axis=-1) * jnp.linalg.norm(ref_embeddings, axis=-1)
  return num / jnp.maximum(den, eps)
