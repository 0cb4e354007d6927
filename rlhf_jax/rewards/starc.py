"""STARC: canonicalise and normalise tabular reward functions; a distance between them.

Rewards are R[S, A, S'] with transitions P[S, A, S'] (rows sum to 1) and
discount γ. "STARC: A General Framework For Quantifying Differences Between
Reward Functions" (Skalse et al. 2023): value-adjusted levelling under the
uniform policy, L2 normalisation, L2 distance.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _check(reward: jax.Array, transitions: jax.Array, gamma: float) -> None:
  if reward.ndim != 3 or reward.shape != transitions.shape:
    raise ValueError(f"reward and transitions must both be [S, A, S'], got {reward.shape} "
                     f"and {transitions.shape}")
  if reward.shape[0] != reward.shape[2]:
    raise ValueError(f"reward must be [S, A, S] (same S), got {reward.shape}")
  if not 0.0 <= gamma < 1.0:
    raise ValueError(f"gamma must be in [0, 1), got {gamma}")


def uniform_policy_value(reward: jax.Array, transitions: jax.Array, gamma: float) -> jax.Array:
  """V^π [S] of the uniform policy: solve (I − γ P_π) V = r_π."""
  _check(reward, transitions, gamma)
  s = reward.shape[0]
  p_pi = jnp.mean(transitions, axis=1)                         # [S, S']
  r_pi = jnp.mean(jnp.sum(transitions * reward, axis=2), axis=1)  # [S]
  return jnp.linalg.solve(jnp.eye(s, dtype=reward.dtype) - gamma * p_pi, r_pi)


def canonicalize(reward: jax.Array, transitions: jax.Array, gamma: float) -> jax.Array:
  """c(R)(s, a, s') = E_{S'~P(s,a)}[R(s, a, S') − V^π(s) + γ V^π(S')] (π uniform). [S, A, S']."""
  v = uniform_policy_value(reward, transitions, gamma)
  expected = jnp.sum(transitions * (reward + gamma * v[None, None, :]), axis=2) - v[:, None]
  return jnp.broadcast_to(expected[:, :, None], reward.shape)


def standardize(reward: jax.Array, transitions: jax.Array, gamma: float, *,
                eps: float = 1e-12) -> jax.Array:
  """s(R) = c(R)/‖c(R)‖₂ (0 when c(R) = 0). [S, A, S']."""
  c = canonicalize(reward, transitions, gamma)
  n = jnp.sqrt(jnp.sum(c ** 2))
  return jnp.where(n > eps, c / jnp.where(n > eps, n, 1.0), 0.0)


def starc_distance(reward1: jax.Array, reward2: jax.Array, transitions: jax.Array,
                   gamma: float) -> jax.Array:
  """d(R1, R2) = ‖s(R1) − s(R2)‖₂ ∈ [0, 2]; 0 for potential shaping / positive scaling."""
  if reward1.shape != reward2.shape:
    raise ValueError(f"reward1 has shape {reward1.shape} but reward2 has {reward2.shape}")
  return jnp.sqrt(jnp.sum((standardize(reward1, transitions, gamma)
                           - standardize(reward2, transitions, gamma)) ** 2))
