"""Token- and step-level estimators: GAE, REINFORCE++ returns, GiGPO, ROVER targets.

Token inputs are right-padded `[B, T]` arrays with a `mask` of the same shape;
positions where `mask` is 0 get advantage 0 and end the recursion.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.advantages import base
from rlhf_jax.advantages.registry import register
from rlhf_jax.losses.common import (check_float, check_nonnegative, check_rank,
                                    check_unit_interval, next_step)


def reverse_discounted_sum(x: jax.Array, decay: jax.Array) -> jax.Array:
  """y_t = x_t + decay_t · y_{t+1}, y_T = 0, computed with a reverse `lax.scan`.

  Shapes: x, decay [B, T] -> [B, T].
  """
  def step(carry, inp):
    xt, dt = inp
    y = xt + dt * carry
    return y, y
  _, ys = jax.lax.scan(step, jnp.zeros_like(x[:, 0]), (x.T, decay.T), reverse=True)
  return ys.T


def discounted_returns(rewards: jax.Array, mask: jax.Array, *, gamma: float = 1.0) -> jax.Array:
  """G_t = Σ_{k≥t} γ^{k−t} r_k over the unmasked span. Shapes: [B, T] -> [B, T]."""
  check_unit_interval("discounted_returns", gamma=gamma)
  base.check_token_inputs(rewards, None, mask)
  m = mask.astype(rewards.dtype)
  return reverse_discounted_sum(rewards * m, gamma * next_step(m)) * m


@register("gae", family="token", needs=("values", "mask"))
def gae(rewards: jax.Array, *, values: jax.Array, mask: jax.Array, gamma: float = 1.0,
        lam: float = 0.95) -> jax.Array:
  """Generalised advantage estimation.

  δ_t = r_t + γ V_{t+1} − V_t (V = 0 after the last token),
  A_t = Σ_{l≥0} (γλ)^l δ_{t+l}.  λ = 1: Σ γ^k r_{t+k} − V_t;  λ = 0: δ_t.

  High-Dimensional Continuous Control Using Generalized Advantage Estimation
  (Schulman et al., 2016). Shapes: rewards, values, mask [B, T] -> [B, T].
  Returns for a value loss are `advantages + values`. Gradients do not flow
  into `values` in typical use: pass `jax.lax.stop_gradient(values)`.
  """
  check_unit_interval("gae", gamma=gamma, lam=lam)
  base.check_token_inputs(rewards, values, mask)
  m = mask.astype(rewards.dtype)
  v = values * m
  delta = (rewards + gamma * next_step(v) - v) * m
  return reverse_discounted_sum(delta, gamma * lam * next_step(m)) * m


@register("reinforce_pp", family="token", needs=("mask",))
def reinforce_pp(rewards: jax.Array, *, mask: jax.Array, gamma: float = 1.0,
                 eps: float = 1e-6) -> jax.Array:
  """REINFORCE++: discounted token return, whitened over the batch's valid tokens.

  G_t = Σ_{k≥t} γ^{k−t} r_k;  A_t = (G_t − mean_batch G)/(std_batch G + ε).

  REINFORCE++ (Hu et al., 2025). Shapes: rewards (token rewards, e.g. score at
  the last token minus a per-token KL penalty), mask [B, T] -> [B, T]. Token-
  normalised statistics (each valid token counts once).
  """
  check_unit_interval("reinforce_pp", gamma=gamma)
  check_nonnegative("reinforce_pp", eps=eps)
  g = discounted_returns(rewards, mask, gamma=gamma)
  return base.masked_normalise(g, mask, None, eps=eps)


def _stats_by_key(x: jax.Array, keys: jax.Array, valid: jax.Array, unbiased: bool):
  """Per-element mean/std over elements sharing a key: x, keys, valid [M] -> [M], [M]."""
  same = (keys[:, None] == keys[None, :]) & valid[:, None] & valid[None, :]
  w = same.astype(x.dtype)
  n = jnp.maximum(jnp.sum(w, axis=1), 1.0)
  mean = (w @ x) / n
  dev = x[None, :] - mean[:, None]
  ss = jnp.sum(w * dev ** 2, axis=1)
  std = base.safe_sqrt(ss / (jnp.maximum(n - 1.0, 1.0) if unbiased else n))
  return mean, std


def check_steps(method: str, rewards: jax.Array, step_rewards: jax.Array,
                **per_step: jax.Array) -> None:
  """Checks the inputs of a step-level estimator: rewards [N] and step_rewards [N, S] float,
  and every `per_step` array (e.g. step_mask, anchor_ids) of step_rewards' shape."""
  check_rank(rewards, 1, "rewards")
  check_float(rewards, "rewards")
  check_rank(step_rewards, 2, "step_rewards")
  check_float(step_rewards, "step_rewards")
  for name, a in per_step.items():
    if a.shape != step_rewards.shape:
      raise ValueError(f"{method}: {name} has shape {a.shape} but step_rewards has "
                       f"{step_rewards.shape}; they must match")
  if step_rewards.shape[0] != rewards.shape[0]:
    raise ValueError(f"{method}: step_rewards has {step_rewards.shape[0]} rows but rewards has "
                     f"{rewards.shape[0]}; pass one row of steps per episode")


@register("gigpo", family="step",
          needs=("step_rewards", "anchor_ids", "step_mask", "group_size"))
def gigpo(rewards: jax.Array, *, step_rewards: jax.Array, anchor_ids: jax.Array,
          step_mask: jax.Array, group_size: int, gamma: float = 0.95, omega: float = 1.0,
          normalize_std: bool = True, eps: float = 1e-6) -> jax.Array:
  """GiGPO: episode-level group advantage plus step-level anchor-state groups.

  A^E_i = (R(τ_i) − mean_G R)/F;  R_t = Σ_{k≥t} γ^{k−t} r_k;
  A^S_{i,t} = (R_{i,t} − mean_{(j,s): id_{j,s} = id_{i,t}} R_{j,s})/F;
  A_{i,t} = A^E_i + ω·A^S_{i,t};  F = std (population) + ε, or 1.

  GiGPO: Group-in-Group Policy Optimization (Feng et al., 2025).
  Shapes: rewards [N] episode returns, step_rewards [N, S], anchor_ids [N, S]
  int (equal ids = identical observation; compared only within a group),
  step_mask [N, S] -> advantages [N, S] (0 on masked steps).
  """
  check_unit_interval("gigpo", gamma=gamma)
  check_nonnegative("gigpo", omega=omega, eps=eps)
  r = base.group_view(rewards, group_size)
  check_steps("gigpo", rewards, step_rewards, step_mask=step_mask, anchor_ids=anchor_ids)
  if not jnp.issubdtype(anchor_ids.dtype, jnp.integer):
    raise ValueError(f"anchor_ids must be integer ids, got dtype {anchor_ids.dtype}")
  ep_c = base.centred(r)
  ep_adv = ep_c / (base.group_std(r) + eps) if normalize_std else ep_c
  ret = discounted_returns(step_rewards, step_mask, gamma=gamma)
  p, g = r.shape
  s = step_rewards.shape[1]
  valid = step_mask.astype(bool).reshape(p, g * s)

  def per_group(x, keys, v):
    mean, std = _stats_by_key(x, keys, v, unbiased=False)
    c = jnp.where(v, x - mean, 0.0)
    return c / (std + eps) if normalize_std else c

  step_adv = jax.vmap(per_group)(ret.reshape(p, g * s), anchor_ids.reshape(p, g * s), valid)
  adv = ep_adv.reshape(-1)[:, None] + omega * step_adv.reshape(p * g, s)
  return jnp.where(step_mask.astype(bool), adv, 0.0)


@register("rover", family="group", needs=("vocab_mean_log_ratio", "mask", "group_size"))
def rover(rewards: jax.Array, *, vocab_mean_log_ratio: jax.Array, mask: jax.Array,
          group_size: int, rho: float = 1.0) -> jax.Array:
  """ROVER regression targets: centred reward plus the uniform-policy next-state value.

  r̃_i = r_i − mean_G r;  V_u(s_{t+1}) = ρ·mean_v (log π_θ − log π_old)(v | s_{t+1})
  (0 after the last token);  y_t = sg(r̃ + V_u(s_{t+1})).

  Random Policy Valuation is Enough for LLM Reasoning with Verifiable Rewards
  (He et al., 2025). Shapes: rewards [N], vocab_mean_log_ratio [N, T] (the
  whole-vocabulary mean of the log-ratio at each position), mask [N, T] ->
  targets [N, T] (0 where masked). Use with `losses.policy_gradient.rover_loss`.
  """
  check_nonnegative("rover", rho=rho)
  r_t = base.centred(base.group_view(rewards, group_size)).reshape(-1)
  check_rank(vocab_mean_log_ratio, 2, "vocab_mean_log_ratio")
  if vocab_mean_log_ratio.shape != mask.shape or mask.shape[0] != rewards.shape[0]:
    raise ValueError(f"vocab_mean_log_ratio {vocab_mean_log_ratio.shape} and mask "
                     f"{mask.shape} must both be [N={rewards.shape[0]}, T]")
  m = mask.astype(rewards.dtype)
  v_next = rho * next_step(vocab_mean_log_ratio * m)
  return jax.lax.stop_gradient((r_t[:, None] + v_next) * m)
