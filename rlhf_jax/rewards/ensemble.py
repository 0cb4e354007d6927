"""Combining the K rewards of an ensemble: mean, worst-case (WCO), uncertainty-weighted (UWO).

Pure functions over `rewards [N, K]` (K members, last axis) -> `[N]`.
"Reward Model Ensembles Help Mitigate Overoptimization" (Coste et al. 2023).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.losses.common import check_float, check_nonnegative, check_rank


def _check(rewards: jax.Array) -> None:
  check_rank(rewards, 2, "rewards")
  check_float(rewards, "rewards")


def mean(rewards: jax.Array) -> jax.Array:
  """Mean ensemble: R = (1/K) Σ_k R_k. [N, K] -> [N]."""
  _check(rewards)
  return jnp.mean(rewards, axis=-1)


def wco(rewards: jax.Array) -> jax.Array:
  """Worst-case optimisation: R = min_k R_k. [N, K] -> [N] (also MaxMin's egalitarian reward)."""
  _check(rewards)
  return jnp.min(rewards, axis=-1)


def uwo(rewards: jax.Array, *, coef: float = 0.1, unbiased: bool = False) -> jax.Array:
  """Uncertainty-weighted optimisation: R = mean_k R_k − λ·Var_k R_k. [N, K] -> [N].

  λ = `coef` (0.5 for best-of-n, 0.1 for PPO in Coste et al.); λ = 0 is `mean`.
  Var is the population variance (ddof 0) unless `unbiased`.
  """
  check_nonnegative("uwo", coef=coef)
  _check(rewards)
  return jnp.mean(rewards, axis=-1) - coef * jnp.var(rewards, axis=-1,
                                                     ddof=1 if unbiased else 0)
