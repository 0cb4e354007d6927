"""Per-token policy-gradient surrogates, value loss, entropy bonus, sampler-mismatch weights.

Every surrogate takes `logps, old_logps [B, T]`, `advantages [B]` (broadcast
over T) or `[B, T]`, and `mask [B, T]`, and returns `(loss [B, T], PGExtras)`
with the loss 0 where masked. Nothing is reduced: pick the token aggregation
with `rlhf_jax.losses.aggregate.aggregate`. Advantages are treated as
constants (a `stop_gradient` is applied); `old_logps` are constants too.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from rlhf_jax.losses.common import (check_inputs, check_nonnegative, check_positive,
                                    check_rank, next_step)
from rlhf_jax.losses.registry import register

sg = jax.lax.stop_gradient


class PGExtras(NamedTuple):
  """ratio: the importance ratio used [B, T]; clipped: where clipping/masking is active."""
  ratio: jax.Array
  clipped: jax.Array


def _prepare(logps, old_logps, advantages, mask):
  """Trace-time checks; returns (old_logps, advantages [B, T] or [B, 1], float mask)."""
  check_inputs(rank=2, logps=logps, old_logps=old_logps)
  check_rank(mask, 2, "mask")
  if mask.shape != logps.shape:
    raise ValueError(f"mask has shape {mask.shape} but logps has {logps.shape}; they must match")
  if advantages.ndim == 1:
    if advantages.shape[0] != logps.shape[0]:
      raise ValueError(f"advantages [B] has {advantages.shape[0]} entries but logps has "
                       f"B={logps.shape[0]}")
    adv = advantages[:, None]
  elif advantages.shape == logps.shape:
    adv = advantages
  else:
    raise ValueError(f"advantages must be [B] or [B, T]={logps.shape}, got {advantages.shape}")
  return sg(old_logps), sg(adv.astype(logps.dtype)), mask.astype(logps.dtype)


def _masked(loss, m):
  return jnp.where(m > 0, loss, 0.0)


def _safe_ratio(logps, old, m):
  """exp(log π − log π_old), log-ratio zeroed where masked (padding gives no inf/NaN grads)."""
  return jnp.exp(jnp.where(m > 0, logps - old, 0.0))


def clipped_surrogate(ratio, adv, *, epsilon_low: float, epsilon_high: float,
                      dual_clip: Optional[float] = None):
  """−min(ρA, clip(ρ, 1−ε_low, 1+ε_high)A), optionally dual-clipped at −c·A for A < 0."""
  check_nonnegative("clipped_surrogate", epsilon_low=epsilon_low, epsilon_high=epsilon_high)
  unclipped = -adv * ratio
  clipped = -adv * jnp.clip(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
  loss = jnp.maximum(unclipped, clipped)
  active = clipped > unclipped
  if dual_clip is not None:
    if dual_clip <= 1.0:
      raise ValueError(f"dual_clip must be > 1 (Ye et al. use 3), got {dual_clip}")
    dual = jnp.minimum(loss, -dual_clip * adv)
    active = active | ((adv < 0) & (dual < loss))
    loss = jnp.where(adv < 0, dual, loss)
  return loss, active


@register("ppo_clip", family="policy_gradient")
def ppo_clip(logps, old_logps, advantages, mask, *, epsilon_low: float = 0.2,
             epsilon_high: Optional[float] = None, dual_clip: Optional[float] = None):
  """PPO clipped surrogate per token, with clip-higher and dual clip.

  ρ_t = exp(log π − log π_old);  ℓ_t = −min(ρ_t A, clip(ρ_t, 1−ε_low, 1+ε_high) A);
  dual clip (A < 0): ℓ_t ← min(ℓ_t, −c·A).

  Proximal Policy Optimization Algorithms (Schulman et al., 2017); clip-higher
  from DAPO (Yu et al., 2025); dual clip from Mastering Complex Control in MOBA
  Games with Deep RL (Ye et al., 2020). Shapes: [B, T] (advantages [B] or
  [B, T]) -> loss [B, T]; token-level, reduce with `aggregate`.
  """
  check_nonnegative("ppo_clip", epsilon_low=epsilon_low, epsilon_high=epsilon_high)
  old, adv, m = _prepare(logps, old_logps, advantages, mask)
  ratio = jnp.exp(logps - old)
  eh = epsilon_low if epsilon_high is None else epsilon_high
  loss, active = clipped_surrogate(_safe_ratio(logps, old, m), adv, epsilon_low=epsilon_low,
                                   epsilon_high=eh, dual_clip=dual_clip)
  return _masked(loss, m), PGExtras(ratio=ratio, clipped=active & (m > 0))


def sequence_log_ratio(logps, old_logps, mask):
  """(1/|y|) Σ_t (log π − log π_old): the GSPO length-normalised sequence log-ratio [B]."""
  m = mask.astype(logps.dtype)
  return jnp.sum((logps - old_logps) * m, axis=-1) / jnp.maximum(jnp.sum(m, axis=-1), 1.0)


@register("gspo", family="policy_gradient")
def gspo(logps, old_logps, advantages, mask, *, epsilon_low: float = 3e-4,
         epsilon_high: float = 4e-4):
  """GSPO: PPO clipping on the length-normalised sequence ratio (GSPO-token form).

  s_i = exp((1/|y_i|) Σ_t log(π/π_old));  s_{i,t} = sg(s_i)·π_t/sg(π_t);
  ℓ_{i,t} = −min(s_{i,t} A, clip(s_{i,t}, 1−ε_low, 1+ε_high) A).
  With seq_mean_token_mean aggregation (per-sequence token mean) its value and
  gradient are GSPO's sequence loss; per-token A_{i,t} gives GSPO-token. With
  one token it equals `ppo_clip`.

  Group Sequence Policy Optimization (Zheng et al., 2025). Shapes: [B, T] ->
  loss [B, T]; sequence-normalised ratio.
  """
  check_nonnegative("gspo", epsilon_low=epsilon_low, epsilon_high=epsilon_high)
  old, adv, m = _prepare(logps, old_logps, advantages, mask)
  s = jnp.exp(sequence_log_ratio(logps, old, m))[:, None]
  ratio = sg(s) * jnp.exp(logps - sg(logps))
  loss, active = clipped_surrogate(ratio, adv, epsilon_low=epsilon_low, epsilon_high=epsilon_high)
  return _masked(loss, m), PGExtras(ratio=ratio, clipped=active & (m > 0))


@register("cispo", family="policy_gradient")
def cispo(logps, old_logps, advantages, mask, *, epsilon_low: Optional[float] = None,
          epsilon_high: float = 0.2):
  """CISPO: REINFORCE with a clipped, stop-gradient importance weight (no token dropped).

  ℓ_t = −sg(clip(ρ_t, 1−ε_low, 1+ε_high))·A·log π_t  (ε_low=None: no lower bound).

  MiniMax-M1: Scaling Test-Time Compute Efficiently with Lightning Attention
  (MiniMax, 2025). Shapes: [B, T] -> loss [B, T]; token-level.
  """
  check_nonnegative("cispo", epsilon_low=epsilon_low, epsilon_high=epsilon_high)
  old, adv, m = _prepare(logps, old_logps, advantages, mask)
  ratio = jnp.exp(logps - old)
  lo = 0.0 if epsilon_low is None else 1.0 - epsilon_low
  w = jnp.clip(ratio, lo, 1.0 + epsilon_high)
  return _masked(-sg(w) * adv * logps, m), PGExtras(ratio=ratio, clipped=(w != ratio) & (m > 0))


@register("sapo", family="policy_gradient")
def sapo(logps, old_logps, advantages, mask, *, tau_pos: float = 1.0, tau_neg: float = 1.05):
  """SAPO: a smooth sigmoid gate in place of the hard clip.

  f(ρ) = (4/τ)·σ(τ(ρ − 1));  ℓ_t = −f(ρ_t)·A,  τ = τ_pos if A > 0 else τ_neg.
  ∂ℓ/∂ρ = −A·sech²(τ(ρ−1)/2): equal to the unclipped surrogate's at ρ = 1,
  decaying smoothly off-policy.

  Soft Adaptive Policy Optimization (Gao et al., 2025). Shapes: [B, T] -> loss [B, T].
  """
  check_positive("sapo", tau_pos=tau_pos, tau_neg=tau_neg)
  old, adv, m = _prepare(logps, old_logps, advantages, mask)
  ratio = jnp.exp(logps - old)
  tau = jnp.where(adv > 0, tau_pos, tau_neg)
  gate = 4.0 / tau * jax.nn.sigmoid(tau * (_safe_ratio(logps, old, m) - 1.0))
  return _masked(-gate * adv, m), PGExtras(ratio=ratio, clipped=jnp.zeros_like(m, bool))


@register("topr", family="policy_gradient")
def topr(logps, old_logps, advantages, mask):
  """TOPR: truncated importance sampling, full weight on positive rewards.

  ℓ_t = −sg(α)·A·log π_t;  α = 1 if A ≥ 0 else clip(π(y)/μ(y), 0, 1) (sequence ratio).

  Tapered Off-Policy REINFORCE (Le Roux et al., 2025). Shapes: [B, T] -> loss
  [B, T]; `old_logps` are the behaviour policy μ's log-probs. No KL.
  """
  old, adv, m = _prepare(logps, old_logps, advantages, mask)
  seq_ratio = jnp.exp(jnp.minimum(jnp.sum((logps - old) * m, axis=-1), 0.0))[:, None]
  alpha = jnp.where(adv >= 0, 1.0, seq_ratio)
  ratio = jnp.broadcast_to(seq_ratio, logps.shape)
  return _masked(-sg(alpha) * adv * logps, m), PGExtras(ratio=ratio, clipped=(alpha < 1) & (m > 0))


@register("opmd", family="policy_gradient")
def opmd(logps, old_logps, advantages, mask, *, tau: float = 0.1, epsilon_low: float = 0.2,
         epsilon_high: float = 0.2, importance_weight: bool = False):
  """OPMD / REC: masked group-relative REINFORCE plus a squared log-ratio regulariser.

  M_t = (A ≥ 0 ∧ ρ_t ≤ 1+ε_h) ∨ (A ≤ 0 ∧ ρ_t ≥ 1−ε_l);  w_t = sg(ρ_t) or 1;
  ℓ_t = −A·w_t·log π_t·M_t + τ(log π_t − log π_old,t)².  τ = 0 is REC.

  Group-Relative REINFORCE Is Secretly an Off-Policy Algorithm (Yao et al.,
  2025). Shapes: [B, T] -> loss [B, T]; use `advantages.rec` (A = r − mean_G r).
  """
  check_nonnegative("opmd", tau=tau, epsilon_low=epsilon_low, epsilon_high=epsilon_high)
  old, adv, m = _prepare(logps, old_logps, advantages, mask)
  ratio = jnp.exp(logps - old)
  keep = ((adv >= 0) & (ratio <= 1 + epsilon_high)) | ((adv <= 0) & (ratio >= 1 - epsilon_low))
  w = sg(ratio) if importance_weight else 1.0
  loss = -adv * w * logps * keep + tau * (logps - old) ** 2
  return _masked(loss, m), PGExtras(ratio=ratio, clipped=~keep & (m > 0))


@register("dro", family="policy_gradient")
def dro(logps, old_logps, advantages, mask, *, tau: float = 0.1):
  """DRO policy loss: REINFORCE on r − V plus a τ/2 squared log-ratio to the reference.

  ℓ_t = −sg(A)·log π_t + (τ/2)(log π_t − log π_ref,t)²,  A = r − V(x).

  Offline Regularised Reinforcement Learning for Large Language Models
  Alignment (Richemond et al., 2024), policy part of the DRO objective
  ½(r − V − τ log(π/π_ref))², written per token (choice). Here `old_logps`
  are the reference log-probs. Shapes: [B, T] -> loss [B, T].
  """
  check_nonnegative("dro", tau=tau)
  old, adv, m = _prepare(logps, old_logps, advantages, mask)
  loss = -adv * logps + 0.5 * tau * (logps - old) ** 2
  return _masked(loss, m), PGExtras(ratio=jnp.exp(logps - old), clipped=jnp.zeros_like(m, bool))


@register("reinforce", family="policy_gradient")
def reinforce(logps, old_logps, advantages, mask):
  """Plain REINFORCE: ℓ_t = −sg(A)·log π_t (`old_logps` only fill `extras.ratio`).

  Simple Statistical Gradient-Following Algorithms for Connectionist RL
  (Williams, 1992). Shapes: [B, T] -> loss [B, T].
  """
  old, adv, m = _prepare(logps, old_logps, advantages, mask)
  return _masked(-adv * logps, m), PGExtras(ratio=jnp.exp(logps - old),
                                            clipped=jnp.zeros_like(m, bool))


@register("rover", family="policy_gradient", needs=("vocab_mean_log_ratio",))
def rover_loss(logps, old_logps, advantages, mask, *, vocab_mean_log_ratio=None,
               rho: float = 1.0):
  """ROVER regression: ℓ_t = (ρ(log π_t − log π_old,t) − sg(y_t))².

  Random Policy Valuation is Enough for LLM Reasoning with Verifiable Rewards (He et al.,
  2025). Without `vocab_mean_log_ratio`, `advantages` [B, T] are the targets y (e.g. from
  `rlhf_jax.advantages.rover`). With it ([B, T], the whole-vocabulary mean of
  log π_θ − log π_old at each position, as the learn phase computes it for the current
  parameters), `advantages` are the centred rewards r̃ ([B] or [B, T]) and the targets are
  built here:

    y_t = sg(r̃ + ρ·mean_v (log π_θ − log π_old)(v | s_{t+1})),  0 after the last token.

  Shapes: logps, old_logps, mask [B, T] -> loss [B, T].
  """
  check_positive("rover_loss", rho=rho)
  old, y, m = _prepare(logps, old_logps, advantages, mask)
  if vocab_mean_log_ratio is not None:
    if vocab_mean_log_ratio.shape != logps.shape:
      raise ValueError(f"vocab_mean_log_ratio has shape {vocab_mean_log_ratio.shape} but logps "
                       f"has {logps.shape}; they must match")
    v = sg(vocab_mean_log_ratio.astype(logps.dtype)) * m
    y = (y + rho * next_step(v)) * m
  q = rho * (logps - old)
  return _masked((q - y) ** 2, m), PGExtras(ratio=jnp.exp(logps - old),
                                            clipped=jnp.zeros_like(m, bool))


class ValueExtras(NamedTuple):
  clipped: jax.Array


def value_loss(values, old_values, returns, mask, *, clip_range: Optional[float] = 0.2):
  """Clipped value loss: ½·max((V − R)², (clip(V, V_old − ε, V_old + ε) − R)²).

  Schulman et al. (2017) as implemented in PPO baselines. Shapes: [B, T] ->
  loss [B, T] (0 where masked); clip_range=None gives ½(V − R)².
  """
  check_positive("value_loss", clip_range=clip_range)
  check_inputs(rank=2, values=values, old_values=old_values, returns=returns)
  m = mask.astype(values.dtype)
  old, ret = sg(old_values), sg(returns)
  plain = (values - ret) ** 2
  if clip_range is None:
    return _masked(0.5 * plain, m), ValueExtras(clipped=jnp.zeros_like(m, bool))
  vc = old + jnp.clip(values - old, -clip_range, clip_range)
  clipped = (vc - ret) ** 2
  return _masked(0.5 * jnp.maximum(plain, clipped), m), ValueExtras(
      clipped=(clipped > plain) & (m > 0))


def entropy_bonus(logits, mask):
  """Negative token entropy as a loss: ℓ_t = −H(π(·|s_t)) = Σ_v π_v log π_v.

  Shapes: logits [B, T, V], mask [B, T] -> loss [B, T] (0 where masked).
  Scale by the entropy coefficient and reduce with `aggregate`.
  """
  check_rank(logits, 3, "logits")
  if logits.shape[:2] != mask.shape:
    raise ValueError(f"logits {logits.shape} must be [B, T, V] with mask [B, T]={mask.shape}")
  logp = jax.nn.log_softmax(logits, axis=-1)
  return _masked(jnp.sum(jnp.exp(logp) * logp, axis=-1), mask.astype(logits.dtype))


def _mismatch(log_w, mask, *, cap: float, truncate: bool, lower: Optional[float]):
  w = jnp.exp(log_w)
  if truncate:
    out = jnp.minimum(w, cap)
  else:
    bad = (w > cap) | ((w < lower) if lower is not None else False)
    out = jnp.where(bad, 0.0, w)
  return sg(jnp.where(mask.astype(bool), out, 0.0))


def token_mismatch_weights(old_logps, sampler_logps, mask, *, cap: float = 2.0,
                           truncate: bool = True, lower: Optional[float] = None):
  """Token importance weights for a sampler that differs from the trainer's old policy.

  w_t = π_old(a_t)/μ_sampler(a_t);  truncate: min(w_t, C) (TIS); else mask:
  w_t·1[lower ≤ w_t ≤ C] (MIS). Multiply the per-token loss by the result.

  Your Efficient RL Framework Secretly Brings You Off-Policy RL Training (Yao
  et al., 2025). Shapes: [B, T] -> weights [B, T] (stop-gradient, 0 where masked).
  """
  check_positive("token_mismatch_weights", cap=cap)
  check_nonnegative("token_mismatch_weights", lower=lower)
  check_inputs(rank=2, old_logps=old_logps, sampler_logps=sampler_logps)
  return _mismatch(old_logps - sampler_logps, mask, cap=cap, truncate=truncate, lower=lower)


def sequence_mismatch_weights(old_logps, sampler_logps, mask, *, cap: float = 2.0,
                              truncate: bool = True, lower: Optional[float] = None):
  """Sequence-level variant: w = Π_t π_old/μ_sampler, broadcast over the tokens.

  Same paper and options as `token_mismatch_weights`. Shapes: [B, T] -> [B, T].
  """
  check_positive("sequence_mismatch_weights", cap=cap)
  check_nonnegative("sequence_mismatch_weights", lower=lower)
  check_inputs(rank=2, old_logps=old_logps, sampler_logps=sampler_logps)
  m = mask.astype(old_logps.dtype)
  log_w = jnp.sum((old_logps - sampler_logps) * m, axis=-1, keepdims=True)
  return _mismatch(jnp.broadcast_to(log_w, m.shape), mask, cap=cap, truncate=truncate,
                   lower=lower)
