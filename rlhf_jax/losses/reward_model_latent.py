"""Reward models beyond one scalar per response: GPM, VPL, MaxMin-RLHF.

GPM scores pairs with a skew-symmetric form of response embeddings (so it can
represent cyclic preferences); VPL conditions a BT reward on a latent user
variable and trains with an ELBO; MaxMin-RLHF fits a mixture of BT models over
user groups by EM.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from rlhf_jax.losses.common import (check_float, check_inputs, check_nonnegative, check_positive,
                                    check_rank, masked_sum)
from rlhf_jax.losses.registry import register
from rlhf_jax.losses.reward_model_base import (ArrayOrFloat, PairwiseExtras, pairwise_extras,
                                               smoothed_log_likelihood)


# ----------------------------------------------------------------------------- GPM


def gpm_score(v1: jax.Array, v2: jax.Array, *,
              eigenvalues: Optional[jax.Array] = None) -> jax.Array:
  """Skew-symmetric preference score s(y1 ≻ y2) = ⟨R v1, v2⟩ (R block-diag skew).

  s = Σ_{l=1}^{k} λ_l (v1_{2l−1} v2_{2l} − v1_{2l} v2_{2l−1});  s(y1,y2) = −s(y2,y1).
  With k = 1 and v = (r, 1): s = r1 − r2, the BT logit.
  "Beyond Bradley-Terry Models: A General Preference Model for Language Model
  Alignment" (Zhang et al. 2024).

  Args:
    v1, v2: [B, 2k] embeddings.
    eigenvalues: optional λ ≥ 0, shape [k] or [B, k] (prompt-dependent); 1 if None.

  Returns:
    [B] scores.
  """
  check_inputs(rank=2, v1=v1, v2=v2)
  d = v1.shape[-1]
  if d % 2:
    raise ValueError(f"GPM embeddings must have an even last dimension 2k, got {d}")
  a = v1.reshape(v1.shape[0], d // 2, 2)
  b = v2.reshape(v2.shape[0], d // 2, 2)
  per_block = a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0]  # [B, k]
  if eigenvalues is not None:
    if eigenvalues.shape not in ((d // 2,), (v1.shape[0], d // 2)):
      raise ValueError(f"eigenvalues must have shape ({d // 2},) or ({v1.shape[0]}, {d // 2}), "
                       f"got {eigenvalues.shape}")
    per_block = per_block * jnp.broadcast_to(eigenvalues, per_block.shape)
  return jnp.sum(per_block, axis=-1)


def gpm_probability(v1: jax.Array, v2: jax.Array, *,
                    eigenvalues: Optional[jax.Array] = None,
                    beta: float = 0.1) -> jax.Array:
  """P(y1 ≻ y2) = σ(s(y1, y2)/β) of the General Preference Model. [B]."""
  return jax.nn.sigmoid(gpm_score(v1, v2, eigenvalues=eigenvalues) / beta)


@register("gpm", family="reward_model")
def gpm(chosen_embeddings: jax.Array, rejected_embeddings: jax.Array, *,
        eigenvalues: Optional[jax.Array] = None, beta: float = 0.1,
        labels: ArrayOrFloat = 1.0) -> tuple[jax.Array, PairwiseExtras]:
  """General Preference Model loss over skew-symmetric embeddings.

  ℓ = −[P_D·log σ(s/β) + (1 − P_D)·log σ(−s/β)],  s = `gpm_score(v_w, v_l)`.

  With 2-dim embeddings (r, 1) and β = 1 this is exactly `bt`. Paper β = 0.1,
  unit-normalised v. "Beyond Bradley-Terry Models: A General Preference Model
  for Language Model Alignment" (Zhang et al. 2024).

  Args:
    chosen_embeddings, rejected_embeddings: [B, 2k].
    eigenvalues: optional [k] or [B, k] non-negative block scales λ(x).
    beta: temperature β > 0.
    labels: P_D, probability that chosen ≻ rejected (scalar or [B]).

  Returns:
    (losses [B], PairwiseExtras with margins s/β).
  """
  check_positive("gpm_probability", beta=beta)
  logits = gpm_score(chosen_embeddings, rejected_embeddings, eigenvalues=eigenvalues) / beta
  losses = -smoothed_log_likelihood(logits, labels)
  return losses, pairwise_extras(logits)


# ----------------------------------------------------------------------------- VPL


class VPLExtras(NamedTuple):
  """nll: [B] summed BT negative log-likelihood per user; kl: [B] KL(q‖N(0, I))."""
  nll: jax.Array
  kl: jax.Array
  accuracy: jax.Array


def gaussian_kl(mean: jax.Array, log_var: jax.Array) -> jax.Array:
  """KL(N(μ, diag σ²) ‖ N(0, I)) = ½ Σ_d (μ² + σ² − log σ² − 1). [B, Z] -> [B]."""
  return 0.5 * jnp.sum(mean ** 2 + jnp.exp(log_var) - log_var - 1.0, axis=-1)


def reparameterize(rng: jax.Array, mean: jax.Array, log_var: jax.Array) -> jax.Array:
  """z = μ + σ·ε, ε ~ N(0, I) (the VAE reparameterisation). [B, Z]."""
  return mean + jnp.exp(0.5 * log_var) * jax.random.normal(rng, mean.shape, mean.dtype)


@register("vpl", family="reward_model")
def vpl(chosen_rewards: jax.Array, rejected_rewards: jax.Array, *,
        mean: jax.Array, log_var: jax.Array, mask: Optional[jax.Array] = None,
        kl_coef: float = 0.01) -> tuple[jax.Array, VPLExtras]:
  """Negative ELBO of Variational Preference Learning (latent-user BT).

  −ELBO_b = −Σ_p log σ(r(s_A^{b,p}, z_b) − r(s_B^{b,p}, z_b)) + β·KL(q(z|C_b) ‖ N(0, I))

  z_b ~ q = N(mean, exp(log_var)) comes from the user encoder over user b's
  context pairs (`rlhf_jax.models.reward_heads.VPLEncoder`), sampled with
  `reparameterize`; the rewards were computed with that z. β = 0.01 for LMs.
  "Personalizing Reinforcement Learning from Human Feedback with Variational
  Preference Learning" (Poddar et al. 2024), official code.

  Args:
    chosen_rewards, rejected_rewards: [B, P] rewards of each user's P pairs
      under that user's sampled z.
    mean, log_var: [B, Z] posterior parameters.
    mask: optional [B, P], True for real pairs.
    kl_coef: β ≥ 0.

  Returns:
    (losses [B] per user, VPLExtras). Summed over pairs (not normalised).
  """
  check_nonnegative("vpl", kl_coef=kl_coef)
  check_inputs(rank=2, chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
  check_inputs(rank=2, mean=mean, log_var=log_var)
  if mean.shape[0] != chosen_rewards.shape[0]:
    raise ValueError(f"mean has {mean.shape[0]} users but chosen_rewards has "
                     f"{chosen_rewards.shape[0]}; one posterior per user row")
  if mask is not None and mask.shape != chosen_rewards.shape:
    raise ValueError(f"mask has shape {mask.shape}, expected {chosen_rewards.shape}")
  margins = chosen_rewards - rejected_rewards
  nll = -masked_sum(jax.nn.log_sigmoid(margins), mask, axis=1)
  kl = gaussian_kl(mean, log_var)
  acc = masked_sum((margins > 0).astype(margins.dtype), mask, axis=1) / jnp.maximum(
      masked_sum(jnp.ones_like(margins), mask, axis=1), 1.0)
  return nll + kl_coef * kl, VPLExtras(nll=nll, kl=kl, accuracy=acc)


# ----------------------------------------------------------------------------- MaxMin


def maxmin_e_step(chosen_rewards: jax.Array, rejected_rewards: jax.Array,
                  user_ids: jax.Array, *, num_users: int, hard: bool = True,
                  log_prior: Optional[jax.Array] = None) -> jax.Array:
  """E-step of MaxMin-RLHF: assign each user to the BT group that explains them.

  ℓ_{u,g} = Σ_{b: user(b)=u} log σ(r_g(y_w^b) − r_g(y_l^b));
  hard: one_hot(argmax_g ℓ_{u,g}); soft: softmax_g(ℓ_{u,g} + log π_g).
  [unverified reconstruction] "MaxMin-RLHF: Alignment with Diverse Human
  Preferences" (Chakraborty et al. 2024).

  Args:
    chosen_rewards, rejected_rewards: [B, G], reward of each of G group RMs.
    user_ids: [B] int in [0, num_users).
    num_users: static number of users U.
    hard: hard (argmax) or soft (posterior) assignment.
    log_prior: optional [G] log mixture weights (soft only).

  Returns:
    [U, G] responsibilities (rows sum to 1). Users with no pairs get the prior.
  """
  check_inputs(rank=2, chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
  check_rank(user_ids, 1, "user_ids")
  if user_ids.shape[0] != chosen_rewards.shape[0]:
    raise ValueError(f"user_ids has {user_ids.shape[0]} entries, expected {chosen_rewards.shape[0]}")
  if not jnp.issubdtype(user_ids.dtype, jnp.integer):
    raise ValueError(f"user_ids must be integers, got dtype {user_ids.dtype}")
  ll = jax.ops.segment_sum(jax.nn.log_sigmoid(chosen_rewards - rejected_rewards), user_ids,
                           num_segments=num_users)  # [U, G]
  num_groups = chosen_rewards.shape[1]
  if log_prior is None:
    log_prior = jnp.zeros((num_groups,), ll.dtype)
  if hard:
    return jax.nn.one_hot(jnp.argmax(ll + log_prior[None, :], axis=-1), num_groups, dtype=ll.dtype)
  return jax.nn.softmax(ll + log_prior[None, :], axis=-1)


class MaxMinExtras(NamedTuple):
  """group_losses: [B, G] BT loss of each group RM; accuracy [B] of the weighted margin."""
  group_losses: jax.Array
  accuracy: jax.Array


@register("maxmin_em", family="reward_model")
def maxmin_em(chosen_rewards: jax.Array, rejected_rewards: jax.Array, *,
              weights: jax.Array) -> tuple[jax.Array, MaxMinExtras]:
  """M-step loss of MaxMin-RLHF: responsibility-weighted BT per user group.

  ℓ_b = Σ_g w_{b,g} · (−log σ(r_g(y_w^b) − r_g(y_l^b))),  w_{b,·} = E-step row of user(b)
  (e.g. `maxmin_e_step(...)[user_ids]`, treated as constant). The policy then
  maximises the egalitarian min_g E[r_g] (`rlhf_jax.rewards.ensemble.wco`).
  [unverified reconstruction] "MaxMin-RLHF: Alignment with Diverse Human
  Preferences" (Chakraborty et al. 2024).

  Args:
    chosen_rewards, rejected_rewards: [B, G] rewards of the G group RMs.
    weights: [B, G] responsibilities.

  Returns:
    (losses [B], MaxMinExtras).
  """
  check_inputs(rank=2, chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards,
               weights=weights)
  check_float(weights, "weights")
  margins = chosen_rewards - rejected_rewards
  group_losses = -jax.nn.log_sigmoid(margins)
  w = jax.lax.stop_gradient(weights)
  losses = jnp.sum(w * group_losses, axis=1)
  acc = (jnp.sum(w * margins, axis=1) > 0).astype(margins.dtype)
  return losses, MaxMinExtras(group_losses=group_losses, accuracy=acc)
