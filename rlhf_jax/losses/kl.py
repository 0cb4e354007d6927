"""KL estimators between the policy and a reference, KL placement, and β controllers.

Estimators take `logps, ref_logps [B, T]` (log-probs of the *sampled* tokens,
samples drawn from π) and an optional `mask`, and return per-token estimates
`[B, T]` (0 where masked). With x = π_ref(a)/π(a) (Schulman, "Approximating KL
Divergence", 2020):  k1 = −log x,  k2 = ½(log x)²,  k3 = (x − 1) − log x.
k1 and k3 are unbiased for KL(π‖π_ref); k3 ≥ 0 and has lower variance.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from rlhf_jax.losses.common import check_inputs, check_nonnegative, check_positive, check_rank
from rlhf_jax.losses.registry import register


def _log_ratio(logps, ref_logps, mask):
  check_inputs(logps=logps, ref_logps=ref_logps)
  if mask is not None and jnp.shape(mask) != jnp.shape(logps):
    raise ValueError(f"mask has shape {jnp.shape(mask)} but logps has {jnp.shape(logps)}")
  return ref_logps - logps


def _masked(x, mask):
  return x if mask is None else jnp.where(mask.astype(bool), x, 0.0)


@register("k1", family="kl")
def k1(logps, ref_logps, mask=None):
  """k1 = log π(a) − log π_ref(a): unbiased for KL(π‖π_ref), can be negative. [B, T]."""
  return _masked(-_log_ratio(logps, ref_logps, mask), mask)


@register("k2", family="kl")
def k2(logps, ref_logps, mask=None):
  """k2 = ½(log π(a) − log π_ref(a))²: biased, ≥ 0. [B, T].

  As a loss on on-policy samples its gradient equals the reverse-KL gradient.
  """
  return _masked(0.5 * _log_ratio(logps, ref_logps, mask) ** 2, mask)


@register("k3", family="kl")
def k3(logps, ref_logps, mask=None, *, clamp: Optional[float] = None,
       log_ratio_clamp: Optional[float] = None):
  """k3 = exp(log π_ref − log π) − (log π_ref − log π) − 1 ≥ 0 (unbiased, low variance).

  `log_ratio_clamp` clips log(π_ref/π) to ±c before exp; `clamp` caps the
  result at +clamp. Used by GRPO (Shao et al., 2024). Shapes: [B, T] -> [B, T].
  """
  check_positive("k3", clamp=clamp, log_ratio_clamp=log_ratio_clamp)
  lr = _masked(_log_ratio(logps, ref_logps, mask), mask)  # padding cannot overflow expm1
  if log_ratio_clamp is not None:
    lr = jnp.clip(lr, -log_ratio_clamp, log_ratio_clamp)
  out = jnp.expm1(lr) - lr
  if clamp is not None:
    out = jnp.minimum(out, clamp)
  return _masked(out, mask)


@register("low_var_kl", family="kl")
def low_var_kl(logps, ref_logps, mask=None):
  """Clamped k3 as in common GRPO trainers: log-ratio clipped to ±20, result to ≤ 10. [B, T]."""
  return k3(logps, ref_logps, mask, clamp=10.0, log_ratio_clamp=20.0)


@register("abs_kl", family="kl")
def abs_kl(logps, ref_logps, mask=None):
  """|log π(a) − log π_ref(a)|: a ≥ 0 surrogate penalty (not an unbiased KL). [B, T]."""
  return _masked(jnp.abs(_log_ratio(logps, ref_logps, mask)), mask)


def kl_in_reward(scores, kl, mask, *, beta: float):
  """KL in the reward: r_t = −β·kl_t, plus the sequence score at the last valid token.

  Fine-Tuning Language Models from Human Preferences (Ziegler et al., 2019).
  Shapes: scores [B], kl [B, T] (e.g. `k1`), mask [B, T] right-padded -> token
  rewards [B, T] for `advantages.gae` / `advantages.reinforce_pp`.
  The KL is a constant here (stop-gradient).
  """
  check_nonnegative("kl_in_reward", beta=beta)
  check_rank(scores, 1, "scores")
  check_rank(kl, 2, "kl")
  if kl.shape != mask.shape or scores.shape[0] != kl.shape[0]:
    raise ValueError(f"need scores [B], kl [B, T] and mask [B, T]; got {scores.shape}, "
                     f"{kl.shape}, {mask.shape}")
  m = mask.astype(kl.dtype)
  length = jnp.sum(m, axis=-1).astype(jnp.int32)
  last = jax.nn.one_hot(jnp.maximum(length - 1, 0), kl.shape[1], dtype=kl.dtype)
  last = last * (length > 0)[:, None]
  return (-beta * jax.lax.stop_gradient(kl) + scores[:, None] * last) * m


class KLExtras(NamedTuple):
  kl: jax.Array


def kl_in_loss(kl, mask, *, beta: float):
  """KL in the loss: ℓ_t = β·kl_t (gradients flow through kl).

  Shapes: kl, mask [B, T] -> (loss [B, T], KLExtras); reduce with `aggregate`.
  """
  check_nonnegative("kl_in_loss", beta=beta)
  check_rank(kl, 2, "kl")
  return _masked(beta * kl, mask), KLExtras(kl=jax.lax.stop_gradient(kl))


class KLState(NamedTuple):
  """Current KL coefficient β."""
  beta: jax.Array


class KLController(NamedTuple):
  """An `(init, update)` pair: init() -> KLState; update(state, kl, n_steps) -> KLState."""
  init: Callable[[], KLState]
  update: Callable[..., KLState]


def adaptive_kl_controller(*, init_beta: float = 0.2, target: float = 6.0,
                           horizon: float = 10000.0) -> KLController:
  """Adaptive β: e = clip(KL/KL_target − 1, −0.2, 0.2);  β ← β·(1 + e·n_steps/horizon).

  Ziegler et al. (2019), Section 2.2. `kl` is the observed mean sequence KL,
  `n_steps` the number of samples since the last update.
  """
  check_nonnegative("adaptive_kl_controller", init_beta=init_beta)
  check_positive("adaptive_kl_controller", target=target, horizon=horizon)

  def init() -> KLState:
    return KLState(beta=jnp.asarray(init_beta, jnp.float32))

  def update(state: KLState, kl, n_steps) -> KLState:
    err = jnp.clip(kl / target - 1.0, -0.2, 0.2)
    return KLState(beta=state.beta * (1.0 + err * n_steps / horizon))

  return KLController(init, update)


def fixed_kl_controller(*, beta: float) -> KLController:
  """Constant β; `update` ignores the observed KL."""
  check_nonnegative("fixed_kl_controller", beta=beta)

  def init() -> KLState:
    return KLState(beta=jnp.asarray(beta, jnp.float32))

  def update(state: KLState, kl, n_steps) -> KLState:
    del kl, n_steps
    return state

  return KLController(init, update)
