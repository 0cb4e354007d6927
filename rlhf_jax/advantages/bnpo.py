"""BNPO: Beta-normalised advantages with an `(init, update)` running-moments state."""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.scipy.special import betaln, xlogy

from rlhf_jax.advantages import base
from rlhf_jax.advantages.registry import register
from rlhf_jax.losses.common import check_positive, check_range


class BetaMoments(NamedTuple):
  """Running moments of the per-prompt success rate p̂ (EMA; `count` updates seen)."""
  mean: jax.Array
  var: jax.Array
  count: jax.Array


def bnpo_init() -> BetaMoments:
  """Empty running moments (the first `bnpo_update` replaces them)."""
  return BetaMoments(mean=jnp.zeros(()), var=jnp.zeros(()), count=jnp.zeros((), jnp.int32))


def batch_moments(rewards: jax.Array, *, group_size: int):
  """μ = mean_prompts p̂ and unbiased σ² = var_prompts p̂, p̂ = group mean of rewards."""
  p_hat = jnp.mean(base.group_view(rewards, group_size), axis=-1)
  n = p_hat.shape[0]
  mu = jnp.mean(p_hat)
  var = jnp.sum((p_hat - mu) ** 2) / max(n - 1, 1)
  return mu, var


def bnpo_update(state: BetaMoments, rewards: jax.Array, *, group_size: int,
                momentum: float = 0.9) -> BetaMoments:
  """EMA update m ← momentum·m + (1 − momentum)·batch value (first call copies the batch)."""
  mu, var = batch_moments(rewards, group_size=group_size)
  first = state.count == 0
  mix = lambda old, new: jnp.where(first, new, momentum * old + (1.0 - momentum) * new)
  return BetaMoments(mean=mix(state.mean, mu), var=mix(state.var, var), count=state.count + 1)


class MomentsTransform(NamedTuple):
  """An `(init, update)` pair over `BetaMoments`, in the style of optax transforms."""
  init: Callable[[], BetaMoments]
  update: Callable[..., BetaMoments]


def bnpo_moments(*, group_size: int, momentum: float = 0.9) -> MomentsTransform:
  """`(init, update)` with update(state, rewards) = `bnpo_update(..., momentum=momentum)`."""
  check_range("bnpo_moments", "momentum", momentum, lambda v: 0.0 <= v < 1.0, "in [0, 1)")
  return MomentsTransform(
      init=bnpo_init,
      update=lambda state, rewards: bnpo_update(state, rewards, group_size=group_size,
                                                momentum=momentum))


def beta_parameters(mean: jax.Array, var: jax.Array, *, eps: float = 1e-8):
  """α = max(1, 1 + a/3), β = max(1, 1 + b/3), with k = μ(1−μ)/σ² − 1, a = kμ, b = k(1−μ)."""
  check_positive("beta_parameters", eps=eps)
  k = jnp.maximum(mean * (1.0 - mean) / (var + eps) - 1.0, 0.0)
  return jnp.maximum(1.0, 1.0 + k * mean / 3.0), jnp.maximum(1.0, 1.0 + k * (1.0 - mean) / 3.0)


@register("bnpo", family="group", needs=("group_size",), state=bnpo_moments)
def bnpo(rewards: jax.Array, *, group_size: int, state: Optional[BetaMoments] = None,
         max_inverse_density: float = 1e6) -> jax.Array:
  """Beta-normalised advantage for rewards in [0, 1].

  p̂ = mean_G r;  A_i = (r_i − p̂)·clip(1/Beta(p̂; α, β), 0, 1e6),
  α, β from `beta_parameters` of the moments of p̂ (this batch, or `state`).
  α = β = 1 is REINFORCE with a group-mean baseline; α = β = 3/2 divides by
  B(3/2, 3/2)⁻¹·√(p̂(1−p̂)) (GRPO-like).

  BNPO: Beta Normalization Policy Optimization (Xiao et al., 2025).
  Shapes: rewards [N] -> [N]; `state` from `bnpo_update` (else batch moments).
  """
  check_positive("bnpo", max_inverse_density=max_inverse_density)
  r = base.group_view(rewards, group_size)
  if state is None:
    mu, var = batch_moments(rewards, group_size=group_size)
  else:
    mu, var = state.mean, state.var
  alpha, beta = beta_parameters(jax.lax.stop_gradient(mu), jax.lax.stop_gradient(var))
  # p̂ ∈ {0, 1} only occurs for constant groups (advantage 0); keeping p̂ inside (0, 1) and
  # capping in log space keeps their gradient finite (no 0·∞).
  p_hat = jnp.clip(jnp.mean(r, axis=-1, keepdims=True), 1e-6, 1.0 - 1e-6)
  log_pdf = xlogy(alpha - 1.0, p_hat) + xlogy(beta - 1.0, 1.0 - p_hat) - betaln(alpha, beta)
  inv = jnp.exp(jnp.minimum(-log_pdf, jnp.log(max_inverse_density)))
  return (base.centred(r) * inv).reshape(-1)
