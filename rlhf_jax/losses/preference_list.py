"""Listwise / group preference losses: PRO, GRAO, TRPA.

Inputs are `[B, K]` arrays (K responses per prompt) with a `mask [B, K]`;
masked (padding) entries never change the result. Each returns
`(losses [B], extras)`; the caller reduces over B.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from rlhf_jax.losses.common import (check_inputs, check_nonnegative, check_positive, check_rank,
                                    log_sigmoid, masked_sum)
from rlhf_jax.losses.registry import register

sg = jax.lax.stop_gradient
_NEG = -1e30  # stands in for −inf in masked log-sum-exps (finite: no NaN gradients)


def check_list(mask, lengths=None, **arrays):
  """Checks `[B, K]` float arrays, a matching mask, and optional lengths; returns (mask, lengths)."""
  check_inputs(rank=2, **arrays)
  first_name, first = next(iter(arrays.items()))
  check_rank(mask, 2, "mask")
  if mask.shape != first.shape:
    raise ValueError(f"mask has shape {mask.shape} but {first_name} has {first.shape}; they must match")
  if lengths is not None:
    check_rank(lengths, 2, "lengths")
    if lengths.shape != first.shape:
      raise ValueError(f"lengths has shape {lengths.shape} but {first_name} has {first.shape}")
    lengths = jnp.maximum(lengths.astype(first.dtype), 1.0)
  return mask.astype(bool), lengths


class ListExtras(NamedTuple):
  """scores: the per-response scores/advantages used [B, K] (no gradient)."""
  scores: jax.Array


@register("pro", family="preference")
def pro(logps, lengths, mask, *, temperature: float = 1.0, sft_weight: float = 0.05):
  """Preference Ranking Optimization: Plackett–Luce over a ranked list plus SFT on the best.

  s_k = log π(y_k)/|y_k| (length-normalised), responses ranked best first;
  ℓ = −Σ_{k<n} log[exp(s_k/T) / Σ_{j≥k} exp(s_j/T)] − w_sft · s_1.

  Paper: Preference Ranking Optimization for Human Alignment (Song et al.,
  2024). The ranking is the order of the valid (mask=True) entries along K; the
  SFT term is on the first valid entry. [choice: one temperature T for every
  position; the paper's reward-gap-dependent temperatures can be folded into
  the scores by the caller.] Shapes: logps, lengths, mask [B, K] -> [B].
  Token-normalised.
  """
  check_positive("pro", temperature=temperature)
  check_nonnegative("pro", sft_weight=sft_weight)
  m, lengths = check_list(mask, lengths, logps=logps)
  s = logps / lengths
  z = jnp.where(m, s / temperature, _NEG)
  lse = jax.lax.cumlogsumexp(z, axis=1, reverse=True)
  pl = jnp.sum(jnp.where(m, lse - z, 0.0), axis=1)
  first = jnp.argmax(m, axis=1)
  best = jnp.take_along_axis(s, first[:, None], axis=1)[:, 0]
  best = jnp.where(jnp.any(m, axis=1), best, 0.0)
  return pl - sft_weight * best, ListExtras(sg(jnp.where(m, s, 0.0)))


class GRAOExtras(NamedTuple):
  """advantages [B, G] and ref_advantage [B]: the group z-scores used (no gradient)."""
  advantages: jax.Array
  ref_advantage: jax.Array


@register("grao", family="preference")
def grao(logps, lengths, rewards, mask, *, ref_answer_logps, ref_answer_lengths,
         ref_answer_rewards, beta: float = 0.5, lam: float = 0.6, eps: float = 1e-6):
  """GRAO group direct alignment loss over G samples and a reference answer y.

  J(o) = log π(o)/|o| (token-mean log-prob); Â = z-score of rewards within
  {valid samples} ∪ {y} (no gradient);
  ℓ = −(1/G) Σ_i [Â_i J(o_i) + β Â_y J(y) + λ Â_i (J(o_i) − J(y))].

  Paper: Learning to Align, Aligning to Learn: A Unified Approach for
  Self-Optimized Alignment (2025). Population std, std + eps in the
  denominator [choice]. Shapes: logps, lengths, rewards, mask [B, G];
  ref_answer_* [B] -> [B]. Token-normalised.
  """
  check_nonnegative("grao", beta=beta, lam=lam)
  check_positive("grao", eps=eps)
  m, lengths = check_list(mask, lengths, logps=logps, rewards=rewards)
  check_inputs(rank=1, ref_answer_logps=ref_answer_logps, ref_answer_rewards=ref_answer_rewards)
  check_rank(ref_answer_lengths, 1, "ref_answer_lengths")
  if ref_answer_logps.shape[0] != logps.shape[0] or ref_answer_lengths.shape != ref_answer_logps.shape:
    raise ValueError(f"ref_answer_logps/ref_answer_lengths must be [B]={logps.shape[:1]}, got "
                     f"{ref_answer_logps.shape} and {ref_answer_lengths.shape}")
  j = logps / lengths
  jy = ref_answer_logps / jnp.maximum(ref_answer_lengths.astype(logps.dtype), 1.0)
  r, ry = sg(rewards), sg(ref_answer_rewards)
  n = jnp.sum(m, axis=1).astype(logps.dtype)
  mu = (masked_sum(r, m, axis=1) + ry) / (n + 1.0)
  var = (masked_sum((r - mu[:, None]) ** 2, m, axis=1) + (ry - mu) ** 2) / (n + 1.0)
  sd = jnp.sqrt(var) + eps
  adv = jnp.where(m, (r - mu[:, None]) / sd[:, None], 0.0)
  adv_y = (ry - mu) / sd
  terms = adv * j + beta * adv_y[:, None] * jy[:, None] + lam * adv * (j - jy[:, None])
  obj = masked_sum(terms, m, axis=1) / jnp.maximum(n, 1.0)
  return -obj, GRAOExtras(adv, adv_y)


class TRPAExtras(NamedTuple):
  """num_pairs [B]: cross-level pairs used; log_ratios [B, K]: Δ (no gradient)."""
  num_pairs: jax.Array
  log_ratios: jax.Array


@register("trpa", family="preference")
def trpa(logps, ref_logps, lengths, levels, mask, *, kl_penalty=None, beta: float = 0.1,
         best_level_scale: float = 2.5, kl_coef: float = 0.001):
  """Trust Region Preference Approximation over rule-based preference levels.

  Δ_i = log π(y_i)/|y_i| − log π_ref(y_i)/|y_i|; for every pair with
  level(i) < level(j) (1 = best: format ok and answer right … 4 = format error):
  ℓ_ij = −log σ(c_i β (Δ_i − Δ_j)),  c_i = 2.5 if level(i) = 1 else 1;
  ℓ = mean over pairs + kl_coef · mean_i kl_penalty_i.

  `kl_penalty [B, K]` is the per-sample KL to π_old (e.g. token-mean k3 from
  `rlhf_jax.losses.kl`), omitted if None. Paper: Trust Region Preference
  Approximation: A simple and stable reinforcement learning algorithm for LLM
  reasoning (Su et al., 2025). Shapes: logps, ref_logps, lengths, levels (int),
  mask [B, K] -> [B] (0 where a prompt has no cross-level pair). Token-normalised.
  """
  check_positive("trpa", beta=beta, best_level_scale=best_level_scale)
  check_nonnegative("trpa", kl_coef=kl_coef)
  m, lengths = check_list(mask, lengths, logps=logps, ref_logps=ref_logps)
  check_rank(levels, 2, "levels")
  if levels.shape != logps.shape or not jnp.issubdtype(levels.dtype, jnp.integer):
    raise ValueError(f"levels must be an integer [B, K]={logps.shape} array, got "
                     f"{levels.shape} {levels.dtype}")
  d = (logps - ref_logps) / lengths
  pair = (m[:, :, None] & m[:, None, :]) & (levels[:, :, None] < levels[:, None, :])
  c = jnp.where(levels == 1, best_level_scale, 1.0).astype(logps.dtype)
  z = c[:, :, None] * beta * (d[:, :, None] - d[:, None, :])
  n = jnp.sum(pair, axis=(1, 2)).astype(logps.dtype)
  loss = masked_sum(-log_sigmoid(z), pair, axis=(1, 2)) / jnp.maximum(n, 1.0)
  if kl_penalty is not None:
    check_inputs(rank=2, logps=logps, kl_penalty=kl_penalty)
    cnt = jnp.maximum(jnp.sum(m, axis=1).astype(logps.dtype), 1.0)
    loss = loss + kl_coef * masked_sum(kl_penalty, m, axis=1) / cnt
  return loss, TRPAExtras(n, sg(jnp.where(m, d, 0.0)))
