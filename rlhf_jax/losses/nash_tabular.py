"""Tabular Nash learning from preferences: Nash-MD and Nash Mirror Prox (Nash-MP) updates.

Responses y ∈ {0..n−1}; a preference matrix P [n, n] with P[y, y′] = P(y ≻ y′) and
P + Pᵀ = 1; a reference μ. The β-regularised Nash equilibrium π*_β of
max_π min_π′ P(π ≻ π′) − β KL(π‖μ) + β KL(π′‖μ) solves π* ∝ μ·exp(Pπ*/β), where
(Pπ)[y] = P(y ≻ π) is the win-rate of y against π.

Policies are carried as log-probabilities `log_pi` [..., n] (normalised); `preference`
is [..., n, n] and `log_ref` = log μ [..., n], with the same leading (batch) axes, so a
batch of games runs as one call (or `vmap`). These are exact (tabular) updates, the
algorithms the LM losses approximate: `nash_md` / `nash_md_mixture_logits` in
`rlhf_jax.losses.preference_online` for Nash-MD. Not registered as losses.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from rlhf_jax.losses.common import check_float, check_nonnegative, check_positive
from rlhf_jax.losses.preference_online import nash_md_mixture_logits


def _check_game(fn: str, log_pi, preference, log_ref) -> None:
  for name, x in (("log_pi", log_pi), ("preference", preference), ("log_ref", log_ref)):
    check_float(x, name)
  n = jnp.shape(log_pi)[-1] if jnp.ndim(log_pi) else None
  if n is None or jnp.shape(log_ref) != jnp.shape(log_pi):
    raise ValueError(f"{fn}: log_pi [..., n] and log_ref [..., n] must share a shape, got "
                     f"{jnp.shape(log_pi)} and {jnp.shape(log_ref)}")
  if jnp.shape(preference) != jnp.shape(log_pi) + (n,):
    raise ValueError(f"{fn}: preference must be [..., n, n] = {jnp.shape(log_pi) + (n,)} "
                     f"(P[y, y'] = P(y ≻ y')), got {jnp.shape(preference)}")


def win_rates(preference: jax.Array, log_pi: jax.Array) -> jax.Array:
  """(Pπ)[y] = Σ_y′ P(y ≻ y′) π(y′): each response's win-rate against π. [..., n]."""
  return jnp.einsum("...ij,...j->...i", preference, jnp.exp(log_pi))


def _prox(anchor, opponent, preference, log_ref, beta, eta):
  """argmax_π η⟨π, Pπ_opp⟩ − ηβ KL(π‖μ) − KL(π‖π_anchor) (closed form)."""
  z = eta * win_rates(preference, opponent) + eta * beta * log_ref + anchor
  return jax.nn.log_softmax(z / (1.0 + eta * beta), axis=-1)


class NashMPStep(NamedTuple):
  """log_pi: π_{k+1} [..., n]; half: the extrapolated π_{k+½} [..., n] (log-probs)."""
  log_pi: jax.Array
  half: jax.Array


def nash_mp_step(log_pi: jax.Array, *, preference: jax.Array, log_ref: jax.Array,
                 beta: float, eta: float = 2.0) -> NashMPStep:
  """One Nash Mirror Prox iteration (two preference queries).

  π_{k+½} = argmax_π η⟨π, Pπ_k⟩ − ηβ KL(π‖μ) − KL(π‖π_k)
          ∝ exp[(η Pπ_k + ηβ log μ + log π_k) / (1 + ηβ)],
  π_{k+1} = argmax_π η⟨π, Pπ_{k+½}⟩ − ηβ KL(π‖μ) − KL(π‖π_k)
          ∝ exp[(η Pπ_{k+½} + ηβ log μ + log π_k) / (1 + ηβ)].

  With η ≤ 2 (the centred preference operator is ½-Lipschitz from ℓ1 to ℓ∞),
  KL(π*_β‖π_k) ≤ (1 + ηβ)^(−k) KL(π*_β‖π_0): at η = 2 and N = 2k queries, the paper's
  (1 + 2β)^(−N/2). β = 0 is unregularised mirror prox (extra-gradient) on P.

  Paper: Accelerating Nash Learning from Human Feedback via Mirror Prox (Tiapkin et
  al., 2025). Shapes: log_pi, log_ref [..., n]; preference [..., n, n]. Returns
  `NashMPStep(log_pi [..., n], half [..., n])`.
  """
  _check_game("nash_mp_step", log_pi, preference, log_ref)
  check_nonnegative("nash_mp_step", beta=beta)
  check_positive("nash_mp_step", eta=eta)
  half = _prox(log_pi, log_pi, preference, log_ref, beta, eta)
  return NashMPStep(_prox(log_pi, half, preference, log_ref, beta, eta), half)


def nash_md_learning_rate(t, *, tau: float) -> jax.Array:
  """Nash-MD's step η_t = 2/(τ(t + 2)) (t = 0, 1, …), for which KL(π*_τ‖π_T) ≤ 8/(τ²(T+1))."""
  check_positive("nash_md_learning_rate", tau=tau)
  return 2.0 / (tau * (jnp.asarray(t, jnp.float32) + 2.0))


class NashMDStep(NamedTuple):
  """log_pi: π_{t+1} [..., n]; mixture: the regularised opponent π^μ_t [..., n] (log-probs)."""
  log_pi: jax.Array
  mixture: jax.Array


def nash_md_step(log_pi: jax.Array, *, preference: jax.Array, log_ref: jax.Array,
                 tau: float, eta) -> NashMDStep:
  """One tabular Nash-MD (mirror descent) iteration.

  π^μ_t ∝ π_t^(1−ητ) μ^(ητ)  (geometric mixture, `nash_md_mixture_logits` with β = ητ),
  π_{t+1} = argmax_π η⟨π, Pπ^μ_t⟩ − KL(π‖π^μ_t) ∝ π^μ_t exp(η Pπ^μ_t).

  With η_t = `nash_md_learning_rate(t, tau=τ)` the last iterate satisfies
  KL(π*_τ‖π_T) ≤ 8/(τ²(T+1)); ητ must be ≤ 1.

  Paper: Nash Learning from Human Feedback (Munos et al., 2023), §6. Shapes: log_pi,
  log_ref [..., n]; preference [..., n, n]; `eta` a scalar (may be traced). Returns
  `NashMDStep(log_pi [..., n], mixture [..., n])`.
  """
  _check_game("nash_md_step", log_pi, preference, log_ref)
  check_nonnegative("nash_md_step", tau=tau)
  check_positive("nash_md_step", eta=eta)
  mix = nash_md_mixture_logits(log_pi, log_ref, beta=eta * tau)
  return NashMDStep(jax.nn.log_softmax(mix + eta * win_rates(preference, mix), axis=-1), mix)


def nash_mp_iterates(log_pi0: jax.Array, *, preference: jax.Array, log_ref: jax.Array,
                     beta: float, eta: float = 2.0, num_steps: int) -> jax.Array:
  """π_0 … π_K of Nash-MP (`nash_mp_step` under `lax.scan`): log-probs [K + 1, ..., n]."""
  def step(log_pi, _):
    new = nash_mp_step(log_pi, preference=preference, log_ref=log_ref, beta=beta, eta=eta)
    return new.log_pi, new.log_pi
  _, out = jax.lax.scan(step, log_pi0, None, length=num_steps)
  return jnp.concatenate([log_pi0[None], out])


def nash_md_iterates(log_pi0: jax.Array, *, preference: jax.Array, log_ref: jax.Array,
                     tau: float, num_steps: int) -> jax.Array:
  """π_0 … π_T of Nash-MD with η_t = 2/(τ(t+2)) (`nash_md_step` under `lax.scan`):
  log-probs [T + 1, ..., n]."""
  def step(log_pi, t):
    eta = nash_md_learning_rate(t, tau=tau)
    new = nash_md_step(log_pi, preference=preference, log_ref=log_ref, tau=tau, eta=eta)
    return new.log_pi, new.log_pi
  _, out = jax.lax.scan(step, log_pi0, jnp.arange(num_steps, dtype=jnp.float32))
  return jnp.concatenate([log_pi0[None], out])


def kl_to(p: jax.Array, log_q: jax.Array) -> jax.Array:
  """KL(p‖q) = Σ p (log p − log q) over the last axis (0·log 0 = 0). [..., n] -> [...];
  p and log_q broadcast against each other (e.g. one π* [n] against iterates [K + 1, n])."""
  shape = jnp.broadcast_shapes(jnp.shape(p), jnp.shape(log_q))
  p, log_q = jnp.broadcast_to(p, shape), jnp.broadcast_to(log_q, shape)
  return jnp.sum(jnp.where(p > 0, p * (jnp.log(jnp.where(p > 0, p, 1.0)) - log_q), 0.0),
                 axis=-1)
