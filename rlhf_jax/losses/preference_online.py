"""Online / self-play preference methods: CoPG, DNO, INPO, Nash-MD, SPO rewards,
RSO rejection sampling and RA-DPO relabelling.

Pairwise losses use the interface of `rlhf_jax.losses.preference`; the
sampling and relabelling helpers return arrays (they are not losses) and are
registered in the family "preference_data", so `config.loss` and
`rl.preference_loss` refuse them by name.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from rlhf_jax.losses.common import (check_float, check_inputs, check_nonnegative, check_positive,
                                    check_rank, check_unit_interval, log_sigmoid)
from rlhf_jax.losses.preference import check_batch_vector, check_pair, logratios, pair_extras
from rlhf_jax.losses.registry import register

sg = jax.lax.stop_gradient


@register("copg", family="preference")
def copg(chosen_logps, rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None,
         chosen_lengths=None, rejected_lengths=None, *, chosen_rewards, rejected_rewards,
         beta: float = 0.06):
  """Contrastive Policy Gradient: off-policy squared-loss contrast of two scored samples.

  Δ = ln π(y)/π_ref(y) − ln π(y′)/π_ref(y′);  ℓ = −[(R(y) − R(y′)) Δ − (β/2) Δ²].
  The maximiser is π* ∝ π_ref exp(R/β); on-policy it equals RLOO with k=2. With
  R(y) = −R(y′) = 1/4, ℓ = (β/2)(Δ − 1/(2β))² − 1/(8β), i.e. (β/2)·IPO(τ=β) − 1/(8β).

  Paper: Contrastive Policy Gradient: Aligning LLMs on sequence-level scores in a
  supervised-friendly fashion (Flet-Berliac et al., 2024). "chosen"/"rejected"
  are just the two samples y, y′ with rewards [B]. Shapes [B] -> [B]; sequence-level.
  """
  check_positive("copg", beta=beta)
  args = (chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
          chosen_lengths, rejected_lengths)
  check_pair(*args, need_ref=True, method="copg")
  check_inputs(chosen_logps=chosen_logps, chosen_rewards=chosen_rewards,
               rejected_rewards=rejected_rewards)
  a, b = logratios(*args[:4])
  d = a - b
  loss = -(sg(chosen_rewards - rejected_rewards) * d - 0.5 * beta * d ** 2)
  return loss, pair_extras(beta * a, beta * b)


@register("dno", family="preference")
def dno(chosen_logps, rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None,
        chosen_lengths=None, rejected_lengths=None, *, eta: float = 0.1):
  """Direct Nash Optimization (batched on-policy): DPO against the previous iterate π_t.

  ℓ = −log σ(η log(π(y+)/π_t(y+)) − η log(π(y−)/π_t(y−))).

  The reference arguments carry the previous iterate's log-probs log π_t [B]
  (treated as constants: stop-gradient). Pairs (y+, y−) are on-policy samples
  ranked by a preference oracle (win-rate, with a large-margin filter) — that
  selection is the caller's. Paper: Direct Nash Optimization: Teaching Language
  Models to Self-Improve with General Preferences (Rosset et al., 2024).
  Shapes [B] -> [B]; sequence-level.
  """
  check_positive("dno", eta=eta)
  args = (chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
          chosen_lengths, rejected_lengths)
  check_pair(*args, need_ref=True, method="dno (ref_* = previous iterate π_t)")
  a, b = logratios(chosen_logps, rejected_logps, sg(ref_chosen_logps), sg(ref_rejected_logps))
  return -log_sigmoid(eta * (a - b)), pair_extras(eta * a, eta * b)


@register("inpo", family="preference")
def inpo(chosen_logps, rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None,
         chosen_lengths=None, rejected_lengths=None, *, prev_chosen_logps,
         prev_rejected_logps, eta: float = 0.005, tau: float = 0.005 / 3):
  """Iterative Nash Policy Optimization: no-regret square loss with π_t and π_ref terms.

  h_t = log(π(y_w)/π(y_l)) − (τ/η) log(π_ref(y_w)/π_ref(y_l)) − ((η−τ)/η) log(π_t(y_w)/π_t(y_l));
  ℓ = (h_t − 1/(2η))²;  π_t is the frozen previous iterate. τ = 0: no KL.

  Paper: Iterative Nash Policy Optimization: Aligning LLMs with General
  Preferences via No-Regret Learning (Zhang et al., 2024). Shapes [B] -> [B];
  sequence-level.
  """
  check_positive("inpo", eta=eta)
  check_nonnegative("inpo", tau=tau)
  args = (chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
          chosen_lengths, rejected_lengths)
  check_pair(*args, need_ref=True, method="inpo")
  check_inputs(chosen_logps=chosen_logps, prev_chosen_logps=prev_chosen_logps,
               prev_rejected_logps=prev_rejected_logps)
  pol = chosen_logps - rejected_logps
  ref = ref_chosen_logps - ref_rejected_logps
  prev = sg(prev_chosen_logps - prev_rejected_logps)
  h = pol - (tau / eta) * ref - ((eta - tau) / eta) * prev
  a, b = logratios(*args[:4])
  return (h - 0.5 / eta) ** 2, pair_extras(eta * a, eta * b)


def nash_md_mixture_logits(logits, ref_logits, *, beta: float = 0.125):
  """Nash-MD opponent: normalised geometric mixture log π_mix ∝ (1−β) log π + β log π_ref.

  Per token over the vocabulary: log_softmax((1−β) log_softmax(logits) + β
  log_softmax(ref_logits)). β = 0 is the policy itself (self-play); β = 1 is the
  reference. No gradient flows (the opponent is sampled). Shapes [..., V] -> [..., V].
  """
  check_unit_interval("nash_md_mixture_logits", beta=beta)
  check_inputs(logits=logits, ref_logits=ref_logits)
  lp = jax.nn.log_softmax(logits, axis=-1)
  lr = jax.nn.log_softmax(ref_logits, axis=-1)
  return sg(jax.nn.log_softmax((1.0 - beta) * lp + beta * lr, axis=-1))


class NashMDExtras(NamedTuple):
  """coefficient: sg(P(y≻y′) − ½ − τ log(π(y)/π_ref(y))) [B]; log_ratio: log π/π_ref [B]."""
  coefficient: jax.Array
  log_ratio: jax.Array


@register("nash_md", family="preference")
def nash_md(logps, ref_logps, preference_probs, *, tau: float = 0.008):
  """Nash-MD policy loss: REINFORCE on the preference against the mixture opponent.

  ℓ = −sg(P(y ≻ y′) − ½ − τ (log π(y) − log π_ref(y))) · log π(y),
  y ~ π, y′ ~ π_mix (`nash_md_mixture_logits`), P from a preference model. Its
  gradient is the paper's ∇log π(y)(P(y≻y′) − ½ − τ log(π(y)/π_ref(y))).

  Paper: Nash Learning from Human Feedback (Munos et al., 2023). With mixture
  β = 0 the opponent is π itself and this is self-play (SPO-style) policy
  gradient on the win-rate. Shapes: logps, ref_logps, preference_probs [B] -> [B];
  sequence-level.
  """
  check_nonnegative("nash_md", tau=tau)
  check_inputs(logps=logps, ref_logps=ref_logps, preference_probs=preference_probs)
  check_batch_vector(logps, "logps")
  lr = logps - ref_logps
  coef = sg(preference_probs - 0.5 - tau * lr)
  return -coef * logps, NashMDExtras(coef, sg(lr))


@register("spo_rewards", family="preference_data")
def spo_rewards(preference_matrix, mask):
  """SPO self-play rewards: each sample's mean win-probability against the rest of its group.

  r_i = (1/(n−1)) Σ_{j ≠ i, valid} P(y_i ≻ y_j),  n = number of valid samples.
  Masked samples get 0 and do not count as opponents. Use r with any policy
  gradient. Paper: A Minimaximalist Approach to Reinforcement Learning from
  Human Feedback (Swamy et al., 2024) — self-play "SPO", not SSPO. Shapes:
  preference_matrix [B, K, K] (P[b, i, j] = P(y_i ≻ y_j)), mask [B, K] -> rewards [B, K].
  """
  check_rank(preference_matrix, 3, "preference_matrix")
  check_float(preference_matrix, "preference_matrix")
  check_rank(mask, 2, "mask")
  b, k, k2 = preference_matrix.shape
  if k != k2 or mask.shape != (b, k):
    raise ValueError(f"preference_matrix must be [B, K, K] and mask [B, K]; got "
                     f"{preference_matrix.shape} and {mask.shape}")
  m = mask.astype(bool)
  pair = m[:, :, None] & m[:, None, :] & ~jnp.eye(k, dtype=bool)[None]
  wins = jnp.sum(jnp.where(pair, preference_matrix, 0.0), axis=-1)
  n = jnp.sum(pair, axis=-1).astype(preference_matrix.dtype)
  return jnp.where(m, wins / jnp.maximum(n, 1.0), 0.0)


class RSOSample(NamedTuple):
  """indices [N] into the K candidates in acceptance order; valid [N] bool (False: fewer than N)."""
  indices: jax.Array
  valid: jax.Array


@register("rso_sample", family="preference_data")
def rso_sample(rng, rewards, mask=None, *, num_samples: int, beta: float = 0.5):
  """RSO statistical rejection sampling from π_r ∝ π_sft exp(r/β) over K candidates.

  Pass p = 0, 1, …: r_max = max reward among remaining candidates; in index
  order each remaining candidate is accepted if u < exp((r − r_max)/β) with
  u = uniform(fold_in(rng, p))[k], until `num_samples` are accepted; accepted
  ones leave the pool (the paper's Algorithm 1, vectorised per pass; the
  remaining maximum is always accepted, so ≤ N passes are needed).

  Paper: Statistical Rejection Sampling Improves Preference Optimization (Liu
  et al., 2024). Shapes: rewards [K], mask [K] -> RSOSample([N], [N]); vmap for
  batches. Not a loss: pair the accepted samples and use `hinge` or `dpo`.
  """
  check_positive("rso_sample", beta=beta)
  check_rank(rewards, 1, "rewards")
  check_float(rewards, "rewards")
  if not isinstance(num_samples, int) or num_samples < 1:
    raise ValueError(f"rso_sample: num_samples must be a positive int, got {num_samples!r}")
  k = rewards.shape[0]
  m = jnp.ones((k,), bool) if mask is None else mask.astype(bool)
  if m.shape != (k,):
    raise ValueError(f"mask has shape {m.shape} but rewards has {(k,)}")
  rewards = sg(rewards)
  neg = jnp.finfo(rewards.dtype).min

  def one_pass(p, carry):
    remaining, order, count = carry
    r_max = jnp.max(jnp.where(remaining, rewards, neg))
    u = jax.random.uniform(jax.random.fold_in(rng, p), (k,), rewards.dtype)
    accept = remaining & (u < jnp.exp(jnp.minimum(rewards - r_max, 0.0) / beta))
    rank = count + jnp.cumsum(accept) - 1
    accept = accept & (rank < num_samples)
    order = jnp.where(accept, rank, order)
    return remaining & ~accept, order, count + jnp.sum(accept)

  order0 = jnp.full((k,), num_samples + k, jnp.int32)
  _, order, count = jax.lax.fori_loop(0, num_samples, one_pass, (m, order0, jnp.int32(0)))
  idx = jnp.argsort(order)
  if k < num_samples:
    idx = jnp.concatenate([idx, jnp.zeros((num_samples - k,), idx.dtype)])
  else:
    idx = idx[:num_samples]
  return RSOSample(idx.astype(jnp.int32), jnp.arange(num_samples) < count)


class RelabelledPairs(NamedTuple):
  """goal_rewards [2B]; chosen_index / rejected_index [2B] into the original pair (0 = y_w, 1 = y_l);
  source [2B] the original pair index."""
  goal_rewards: jax.Array
  chosen_index: jax.Array
  rejected_index: jax.Array
  source: jax.Array


@register("ra_dpo_relabel", family="preference_data")
def ra_dpo_relabel(chosen_rewards, rejected_rewards):
  """RA-DPO reward-augmented relabelling: condition each pair on both responses' scores.

  Pair (x, y_w, y_l) with scores (r_w, r_l) becomes two pairs:
  (x | goal r_w): y_w ≻ y_l,  and  (x | goal r_l): y_l ≻ y_w.
  Entries [0, B) are the first kind, [B, 2B) the second. Then train any direct
  alignment loss (DPO) on the goal-conditioned prompts.

  Paper: Reward-Augmented Data Enhances Direct Preference Alignment of LLMs
  (Zhang et al., 2024). Shapes: [B] -> RelabelledPairs of [2B]. Not a loss.
  """
  check_inputs(rank=1, chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
  b = chosen_rewards.shape[0]
  zeros, ones = jnp.zeros((b,), jnp.int32), jnp.ones((b,), jnp.int32)
  src = jnp.arange(b, dtype=jnp.int32)
  return RelabelledPairs(jnp.concatenate([chosen_rewards, rejected_rewards]),
                         jnp.concatenate([zeros, ones]), jnp.concatenate([ones, zeros]),
                         jnp.concatenate([src, src]))
