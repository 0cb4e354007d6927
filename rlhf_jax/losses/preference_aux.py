"""Preference losses with extra inputs: ORPO, KTO, CPL, VPO, SSPO, T-REG, POWER-DL.

Same pairwise interface as `rlhf_jax.losses.preference` (positional
`chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
chosen_lengths, rejected_lengths`, keyword-only hyper-parameters and extra
inputs), except KTO, which is unpaired. All return `(losses [B], extras)`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from rlhf_jax.losses.common import (check_inputs, check_nonnegative, check_positive, check_rank,
                                    check_unit_interval, log_sigmoid, masked_sum)
from rlhf_jax.losses.preference import check_batch_vector, check_pair, logratios, pair_extras, soft_bce
from rlhf_jax.losses.registry import register

sg = jax.lax.stop_gradient


def _log1mexp(x):
  """log(1 − exp(x)) for x < 0, stable (x is clipped to ≤ −1e-6 to stay finite)."""
  x = jnp.minimum(x, -1e-6)
  return jnp.where(x > -0.693, jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


@register("orpo", family="preference")
def orpo(chosen_logps, rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None,
         chosen_lengths=None, rejected_lengths=None, *, lam: float = 0.1):
  """ORPO: token-mean NLL on the chosen response plus a log-odds-ratio penalty.

  ℓ̄ = log π(y)/|y| (average log-prob), log odds(y) = ℓ̄ − log(1 − exp ℓ̄);
  ℓ = −ℓ̄_w − λ log σ(log odds(y_w) − log odds(y_l)).

  Paper: ORPO: Monolithic Preference Optimization without Reference Model (Hong
  et al., 2024). Shapes [B] -> [B]; token-normalised (lengths required);
  reference arguments are ignored. ℓ̄ is clipped to ≤ −1e-6 inside log(1 − e^ℓ̄).
  """
  check_nonnegative("orpo", lam=lam)
  lc, lr = check_pair(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                      chosen_lengths, rejected_lengths, need_lengths=True, method="orpo")
  mw, ml = chosen_logps / lc, rejected_logps / lr
  log_odds = (mw - ml) - (_log1mexp(mw) - _log1mexp(ml))
  loss = -mw - lam * log_sigmoid(log_odds)
  return loss, pair_extras(lam * mw, lam * ml)


class KTOExtras(NamedTuple):
  """rewards: β(log π − log π_ref) [B] (no gradient); desirable: float mask [B]."""
  rewards: jax.Array
  desirable: jax.Array


@register("kto", family="preference")
def kto(logps, ref_logps, desirable, *, reference_point, beta: float = 0.1,
        desirable_weight: float = 1.0, undesirable_weight: float = 1.0):
  """KTO: prospect-theoretic loss on unpaired desirable/undesirable examples.

  r = log π(y) − log π_ref(y);  z = reference point (no gradient);
  ℓ = λ_D (1 − σ(β (r − z))) if y desirable,  λ_U (1 − σ(β (z − r))) otherwise.

  Pass z as the paper does: max(0, mean over mismatched (x, y′) pairs of
  log π(y′|x) − log π_ref(y′|x)) (a scalar or [B]; it is stop-gradient'ed).
  Paper: KTO: Model Alignment as Prospect Theoretic Optimization (Ethayarajh et
  al., 2024). Shapes: logps, ref_logps [B], desirable [B] bool -> [B];
  sequence-level.
  """
  check_positive("kto", beta=beta)
  check_nonnegative("kto", desirable_weight=desirable_weight, undesirable_weight=undesirable_weight)
  check_inputs(logps=logps, ref_logps=ref_logps)
  check_batch_vector(logps, "logps")
  if jnp.shape(desirable) != jnp.shape(logps):
    raise ValueError(f"desirable has shape {desirable.shape} but logps has {logps.shape}")
  z = sg(jnp.asarray(reference_point, logps.dtype))
  if z.ndim > 1 or (z.ndim == 1 and z.shape != logps.shape):
    raise ValueError(f"kto: reference_point must be a scalar or [B]={logps.shape}, got {z.shape}")
  r = logps - ref_logps
  d = desirable.astype(bool)
  loss = jnp.where(d, desirable_weight * jax.nn.sigmoid(-beta * (r - z)),
                   undesirable_weight * jax.nn.sigmoid(-beta * (z - r)))
  return loss, KTOExtras(sg(beta * r), d.astype(logps.dtype))


def discounted_logp_sum(token_logps, mask, *, gamma: float = 1.0):
  """Σ_t γ^t log π(a_t) over unmasked tokens (t counts from 0): CPL's segment score input.

  Shapes: token_logps, mask [B, T] -> [B].
  """
  check_unit_interval("discounted_logp_sum", gamma=gamma)
  check_inputs(rank=2, token_logps=token_logps)
  check_rank(mask, 2, "mask")
  disc = gamma ** jnp.arange(token_logps.shape[1], dtype=token_logps.dtype)
  return masked_sum(token_logps * disc, mask, axis=1)


@register("cpl", family="preference")
def cpl(chosen_logps, rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None,
        chosen_lengths=None, rejected_lengths=None, chosen_mask=None, rejected_mask=None, *,
        alpha: float = 0.1, lam: float = 0.5, gamma: float = 1.0):
  """Contrastive Preference Learning: reference-free contrast of discounted log-likelihoods.

  A± = α Σ_t γ^t log π(a_t|s_t) over the preferred (+) / other (−) segment;
  ℓ = −log σ(A+ − λ A−) = softplus(λ A− − A+),  λ ∈ (0, 1] the conservative bias.

  `chosen_logps` / `rejected_logps` are either summed log-probs [B] (then γ must be 1:
  A± = α log π(segment)) or per-token log-probs [B, T] with `chosen_mask` /
  `rejected_mask` [B, T], discounted as in `discounted_logp_sum` (t counts from column 0,
  the segment's first token). γ = 1 (default) on tokens equals the summed form.
  Paper: Contrastive Preference Learning: Learning from Human Feedback without
  RL (Hejna et al., 2024); α = 0.1, λ = 0.5 are the paper's configs, γ = 1 its code's.
  For ranked lists apply to every sorted pair. Shapes [B] or [B, T] -> [B];
  sequence-level; reference arguments are ignored.
  """
  check_positive("cpl", alpha=alpha)
  check_nonnegative("cpl", lam=lam)
  check_unit_interval("cpl", gamma=gamma)
  if jnp.ndim(chosen_logps) == 2:
    if chosen_mask is None or rejected_mask is None:
      raise ValueError("cpl: per-token chosen_logps/rejected_logps [B, T] need chosen_mask "
                       "and rejected_mask [B, T] (1 at the segment's tokens)")
    check_rank(rejected_logps, 2, "rejected_logps")
    for name, x, ref in (("chosen_mask", chosen_mask, chosen_logps),
                         ("rejected_mask", rejected_mask, rejected_logps)):
      if jnp.shape(x) != jnp.shape(ref):
        raise ValueError(f"cpl: {name} has shape {jnp.shape(x)} but its log-probs have "
                         f"{jnp.shape(ref)}; they must match")
    chosen_logps = discounted_logp_sum(chosen_logps, chosen_mask, gamma=gamma)
    rejected_logps = discounted_logp_sum(rejected_logps, rejected_mask, gamma=gamma)
  elif isinstance(gamma, (int, float)) and gamma != 1.0:
    raise ValueError(f"cpl: gamma={gamma} discounts per token: pass chosen_logps / "
                     "rejected_logps as per-token log-probs [B, T] with chosen_mask / "
                     "rejected_mask, or pre-discount them with discounted_logp_sum and "
                     "keep gamma=1.0")
  check_pair(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
             chosen_lengths, rejected_lengths, method="cpl")
  ap, am = alpha * chosen_logps, alpha * rejected_logps
  return -log_sigmoid(ap - lam * am), pair_extras(ap, am)


@register("vpo", family="preference")
def vpo(chosen_logps, rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None,
        chosen_lengths=None, rejected_lengths=None, *, beta: float = 0.1, alpha: float = 0.1,
        online: bool = False, cal_logps=None, ref_cal_logps=None):
  """VPO: DPO regularised by the value (expected log-ratio) of a calibration policy.

  ℓ = −log σ(β h) + s·α·β·[log π(y_c) − log π_ref(y_c)],
  s = +1 online (optimism; y_c ~ π_ref samples passed as `cal_logps`,
  `ref_cal_logps`), s = −1 offline (pessimism; y_c = the chosen response by default).

  Paper: Value-Incentivized Preference Optimization: A Unified Approach to Online
  and Offline RLHF (Cen et al., 2024). [unverified: the abstract says the MLE is
  regularised by the value function "modulated by a sign"; with the DPO
  reparametrisation the value of π_cal is β·E_{π_cal}[log π/π_ref] up to a
  constant, giving the term above.] Shapes [B] -> [B]; sequence-level.
  """
  check_positive("vpo", beta=beta)
  check_nonnegative("vpo", alpha=alpha)
  args = (chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
          chosen_lengths, rejected_lengths)
  check_pair(*args, need_ref=True, method="vpo")
  a, b = logratios(*args[:4])
  if cal_logps is None and ref_cal_logps is None:
    if online:
      raise ValueError("vpo(online=True) needs cal_logps and ref_cal_logps [B]: "
                       "log-probs of samples from the reference policy")
    cal = a
  else:
    if cal_logps is None or ref_cal_logps is None:
      raise ValueError("vpo: pass both cal_logps and ref_cal_logps, or neither")
    check_inputs(chosen_logps=chosen_logps, cal_logps=cal_logps,
                 ref_cal_logps=ref_cal_logps)
    cal = cal_logps - ref_cal_logps
  s = 1.0 if online else -1.0
  loss = -log_sigmoid(beta * (a - b)) + s * alpha * beta * cal
  return loss, pair_extras(beta * a, beta * b)


@register("sspo", family="preference")
def sspo(chosen_logps, rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None,
         chosen_lengths=None, rejected_lengths=None, *, degree_logits, degree_labels,
         degree_mask=None, beta: float = 0.1, weight: float = 0.1):
  """SSPO (self-supervised preference-degree PO): DPO + preference-degree classification.

  ℓ = −log σ(β h) + w · mean_m CE(softmax(degree_logits[m]), k_m),
  where response variant m had k_m key parts removed and a head predicts k_m.

  Paper: Self-supervised Preference Optimization: Enhance Your Language Model with
  Preference Degree Awareness (Li et al., 2024) — the paper calls itself "SPO";
  registered as `sspo` to avoid the clash with self-play SPO. [unverified:
  auxiliary term as in methods-exact.md; the alignment term is DPO.] Shapes:
  logps [B]; degree_logits [B, M, C]; degree_labels int [B, M]; degree_mask
  [B, M] (masked variants are ignored) -> [B]. Sequence-level.
  """
  check_positive("sspo", beta=beta)
  check_nonnegative("sspo", weight=weight)
  args = (chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
          chosen_lengths, rejected_lengths)
  check_pair(*args, method="sspo")
  check_inputs(rank=3, degree_logits=degree_logits)
  check_rank(degree_labels, 2, "degree_labels")
  if not jnp.issubdtype(degree_labels.dtype, jnp.integer):
    raise ValueError(f"degree_labels must be integer class ids, got dtype {degree_labels.dtype}")
  if degree_labels.shape != degree_logits.shape[:2] or degree_logits.shape[0] != chosen_logps.shape[0]:
    raise ValueError(f"degree_labels {degree_labels.shape} must be [B, M] matching "
                     f"degree_logits[:2] {degree_logits.shape[:2]} with B={chosen_logps.shape[0]}")
  if degree_mask is not None and degree_mask.shape != degree_labels.shape:
    raise ValueError(f"degree_mask has shape {degree_mask.shape}, expected {degree_labels.shape}")
  a, b = logratios(*args[:4])
  logp = jax.nn.log_softmax(degree_logits, axis=-1)
  ce = -jnp.take_along_axis(logp, degree_labels[..., None], axis=-1)[..., 0]
  m = jnp.ones(ce.shape, bool) if degree_mask is None else degree_mask.astype(bool)
  ce = masked_sum(ce, m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1).astype(ce.dtype)
  return -log_sigmoid(beta * (a - b)) + weight * ce, pair_extras(beta * a, beta * b)


def treg_token_rewards(better_token_logps, worse_token_logps, mask):
  """T-REG token rewards r̂_t = σ(log π(y_t|x_better) − log π(y_t|x_worse)) − ½, 0 where masked.

  The two log-probs score the same tokens under the contrastive revision
  prompts. Shapes [B, T] -> [B, T] (no gradient).
  """
  check_inputs(rank=2, better_token_logps=better_token_logps,
               worse_token_logps=worse_token_logps)
  r = jax.nn.sigmoid(better_token_logps - worse_token_logps) - 0.5
  return sg(jnp.where(mask.astype(bool), r, 0.0))


@register("treg", family="preference")
def treg(chosen_logps, rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None,
         chosen_lengths=None, rejected_lengths=None, *, chosen_token_logps,
         rejected_token_logps, chosen_token_rewards, rejected_token_rewards, chosen_mask,
         rejected_mask, beta: float = 0.1, alpha: float = 0.25):
  """T-REG: DPO with a token-level reward regulariser weighted by the DPO error.

  ℓ = −log σ(β h) + α w (L_REG(y_w) + L_REG(y_l)),  L_REG(y) = −Σ_t β r̂_t log π(y_t),
  w = sg(σ(r(y_l) − r(y_w))), r(y) = β (log π(y) − log π_ref(y)).

  r̂ from `treg_token_rewards` (no gradient). Paper: T-REG: Preference
  Optimization with Token-Level Reward Regularization (Zhou et al., 2024).
  [summary form from methods-exact.md.] Shapes: logps [B]; token arrays
  [B, T] -> [B]. DPO term sequence-level; regulariser token-summed.
  """
  check_positive("treg", beta=beta)
  check_nonnegative("treg", alpha=alpha)
  args = (chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
          chosen_lengths, rejected_lengths)
  check_pair(*args, need_ref=True, method="treg")
  check_inputs(rank=2, chosen_token_logps=chosen_token_logps,
               chosen_token_rewards=chosen_token_rewards)
  check_inputs(rank=2, rejected_token_logps=rejected_token_logps,
               rejected_token_rewards=rejected_token_rewards)
  a, b = logratios(*args[:4])
  w = sg(jax.nn.sigmoid(beta * (b - a)))
  reg = (-beta * masked_sum(sg(chosen_token_rewards) * chosen_token_logps, chosen_mask, axis=1)
         - beta * masked_sum(sg(rejected_token_rewards) * rejected_token_logps, rejected_mask,
                             axis=1))
  return -log_sigmoid(beta * (a - b)) + alpha * w * reg, pair_extras(beta * a, beta * b)


@register("power_dl", family="preference")
def power_dl(chosen_logps, rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None,
             chosen_lengths=None, rejected_lengths=None, *, labels=None, beta: float = 2.0,
             eta: float = 0.0):
  """POWER-DL: length-normalised reference-free reward, weighted-entropy term, dynamic labels.

  r(y) = (β/|y|) log π(y);  m = r(y_w) − r(y_l);
  ℓ = −[l log σ(m) + (1 − l) log σ(−m)] − η r(y_w),  l ∈ [0, 1] per pair (default 1).
  Update the labels between steps with `power_dl_update_labels`.

  Paper: Sail into the Headwind: Alignment via Robust Rewards and Dynamic Labels
  against Reward Hacking (Rashidinejad & Tian, 2024). [unverified: form from
  methods-exact.md.] Shapes [B] (labels [B]) -> [B]; token-normalised
  (lengths required); reference arguments are ignored.
  """
  check_positive("power_dl", beta=beta)
  check_nonnegative("power_dl", eta=eta)
  lc, lr = check_pair(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                      chosen_lengths, rejected_lengths, need_lengths=True, method="power_dl")
  rw, rl = beta * chosen_logps / lc, beta * rejected_logps / lr
  if labels is None:
    l = jnp.ones_like(rw)
  else:
    check_inputs(chosen_logps=chosen_logps, labels=labels)
    l = sg(labels)
  return soft_bce(rw - rl, l) - eta * rw, pair_extras(rw, rl)


def power_dl_update_labels(labels, margins, *, gamma: float = 0.1):
  """Dynamic labels l ← (1 − γ) l + γ σ(m) with m the (stop-gradient) reward margins [B]."""
  check_unit_interval("power_dl_update_labels", gamma=gamma)
  check_inputs(rank=1, labels=labels, margins=margins)
  return (1.0 - gamma) * labels + gamma * jax.nn.sigmoid(sg(margins))
