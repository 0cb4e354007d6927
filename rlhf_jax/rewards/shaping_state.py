"""Stateful reward combination as `(init, update)` pairs over NamedTuple states.

- `lagrangian_multipliers`: constrained RLHF, multipliers by dual descent.
- `dynamic_reward_weights`: per-objective weights adapted from a signal.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp

from rlhf_jax.losses.common import check_nonnegative, check_positive, check_rank


class DualState(NamedTuple):
  """raw: [C] unconstrained multipliers λ̃ (λ = σ(λ̃) or tanh(λ̃))."""
  raw: jax.Array


class DualAscent(NamedTuple):
  """(init, update, multipliers, reward) of constrained RLHF."""
  init: Callable[[], DualState]
  update: Callable[[DualState, jax.Array], DualState]
  multipliers: Callable[[DualState], jax.Array]
  reward: Callable[[DualState, jax.Array, jax.Array], jax.Array]


def lagrangian_multipliers(*, thresholds: Sequence[float], lr: float = 0.1,
                           equality: Optional[Sequence[bool]] = None,
                           init_raw: float = 0.0) -> DualAscent:
  """Constrained RLHF: mixed reward v0 + Σ_i λ_i (v_i − θ_i), λ by gradient steps.

  λ_i = σ(λ̃_i) (inequality v_i ≥ θ_i) or tanh(λ̃_i) (equality); the
  multipliers minimise Σ_i λ_i (Ĵ_i − θ_i) by SGD with step `lr`:
  λ̃ ← λ̃ − lr·(Ĵ − θ)·∂λ/∂λ̃, so λ grows while a constraint is violated.
  "Confronting Reward Model Overoptimization with Constrained RLHF"
  (Moskovitz et al. 2023), official code (lr 0.1).

  update(state, constraint_values [C]) takes the current estimates Ĵ_i;
  reward(state, task_rewards [N], constraint_rewards [N, C]) -> [N] mixes them.
  """
  check_positive("lagrangian_multipliers", lr=lr)
  theta = jnp.asarray(list(thresholds), jnp.float32)
  if theta.ndim != 1 or theta.size == 0:
    raise ValueError("thresholds must be a non-empty sequence, one per constraint")
  eq = jnp.zeros(theta.shape, bool) if equality is None else jnp.asarray(list(equality), bool)
  if eq.shape != theta.shape:
    raise ValueError(f"equality has {eq.shape[0]} entries but thresholds has {theta.shape[0]}")

  def multipliers(state: DualState) -> jax.Array:
    return jnp.where(eq, jnp.tanh(state.raw), jax.nn.sigmoid(state.raw))

  def init() -> DualState:
    return DualState(raw=jnp.full(theta.shape, init_raw, jnp.float32))

  def update(state: DualState, constraint_values: jax.Array) -> DualState:
    check_rank(constraint_values, 1, "constraint_values")
    if constraint_values.shape != theta.shape:
      raise ValueError(f"constraint_values has shape {constraint_values.shape}, "
                       f"expected {theta.shape} (one per threshold)")
    gap = jax.lax.stop_gradient(constraint_values) - theta
    grad = jax.grad(lambda r: jnp.sum(
        jnp.where(eq, jnp.tanh(r), jax.nn.sigmoid(r)) * gap))(state.raw)
    return DualState(raw=state.raw - lr * grad)

  def reward(state: DualState, task_rewards: jax.Array,
             constraint_rewards: jax.Array) -> jax.Array:
    check_rank(task_rewards, 1, "task_rewards")
    check_rank(constraint_rewards, 2, "constraint_rewards")
    if constraint_rewards.shape != task_rewards.shape + theta.shape:
      raise ValueError(f"constraint_rewards must be [N, C]={task_rewards.shape + theta.shape}, "
                       f"got {constraint_rewards.shape}")
    lam = jax.lax.stop_gradient(multipliers(state))
    return task_rewards + jnp.sum(lam[None, :] * (constraint_rewards - theta[None, :]), axis=-1)

  return DualAscent(init, update, multipliers, reward)


class WeightState(NamedTuple):
  """weights: [K] on the simplex."""
  weights: jax.Array


class DynamicWeights(NamedTuple):
  init: Callable[[], WeightState]
  update: Callable[[WeightState, jax.Array], WeightState]
  combine: Callable[[WeightState, jax.Array], jax.Array]


def dynamic_reward_weights(num_objectives: int, *, lr: float = 0.1,
                           min_weight: float = 0.0,
                           initial: Optional[Sequence[float]] = None) -> DynamicWeights:
  """Dynamic reward weighting by exponentiated-gradient (mirror) ascent on the simplex.

  w ← (1 − K·w_min)·normalise(w ⊙ exp(lr·s)) + w_min  (every weight ≥ w_min);
  s [K] is a per-objective signal (e.g. how much each objective's gradient
  still improves it, or a hypervolume contribution); combine(state, r [N, K])
  = r·w. [unverified form of the gradient-based variant] "Learning to Optimize
  Multi-Objective Alignment Through Dynamic Reward Weighting" (2025).
  """
  check_positive("dynamic_reward_weights", lr=lr)
  check_nonnegative("dynamic_reward_weights", min_weight=min_weight)
  if num_objectives < 1:
    raise ValueError(f"num_objectives must be >= 1, got {num_objectives}")
  if not 0.0 <= min_weight * num_objectives <= 1.0:
    raise ValueError(f"min_weight*num_objectives must be <= 1, got {min_weight * num_objectives}")
  w0 = (jnp.full((num_objectives,), 1.0 / num_objectives) if initial is None
        else jnp.asarray(list(initial), jnp.float32) / sum(initial))
  if w0.shape != (num_objectives,):
    raise ValueError(f"initial has {w0.shape[0]} weights, expected {num_objectives}")

  def init() -> WeightState:
    return WeightState(weights=w0.astype(jnp.float32))

  def update(state: WeightState, signal: jax.Array) -> WeightState:
    if signal.shape != (num_objectives,):
      raise ValueError(f"signal must have shape ({num_objectives},), got {signal.shape}")
    w = state.weights * jnp.exp(lr * jax.lax.stop_gradient(signal))
    return WeightState(weights=(1.0 - num_objectives * min_weight) * w / jnp.sum(w)
                       + min_weight)

  def combine(state: WeightState, rewards: jax.Array) -> jax.Array:
    check_rank(rewards, 2, "rewards")
    if rewards.shape[1] != num_objectives:
      raise ValueError(f"rewards must be [N, {num_objectives}], got {rewards.shape}")
    return rewards @ state.weights
  return DynamicWeights(init, update, combine)
