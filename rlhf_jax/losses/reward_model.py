"""Reward-model losses: Bradley–Terry and its variants, Plackett–Luce, regret.

Pairwise losses share one signature so a generic reward-model trainer can use
any of them:

  loss(chosen_rewards [B], rejected_rewards [B], *, hyperparams) -> (losses [B], extras)

The caller reduces (mean over the batch). Distributional heads (HL-Gauss,
two-hot) live in `reward_model_dist.py`; latent/multi-user models (GPM, VPL,
MaxMin) in `reward_model_latent.py`. Importing this module registers all of
them under the "reward_model" family.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

# The sibling modules are imported to register their losses (distributional heads,
# latent-user models); neither imports this module.
from rlhf_jax.losses import reward_model_dist, reward_model_latent  # noqa: F401
from rlhf_jax.losses.common import (check_float, check_inputs, check_nonnegative, check_positive,
                                    check_range, check_rank, check_unit_interval, log_sigmoid,
                                    masked_sum)
from rlhf_jax.losses.registry import register
from rlhf_jax.losses.reward_model_base import (ArrayOrFloat, PairwiseExtras, pairwise_extras,
                                               smoothed_log_likelihood)


class RegressionExtras(NamedTuple):
  """BT + regression diagnostics: the two loss parts and the margins [B]."""
  margins: jax.Array
  accuracy: jax.Array
  bt_losses: jax.Array
  regression_losses: jax.Array


class ListwiseExtras(NamedTuple):
  """Plackett–Luce diagnostics: top-1 correct [B] and per-position terms [B, K]."""
  top1_accuracy: jax.Array
  position_losses: jax.Array


@register("bt", family="reward_model")
def bt(chosen_rewards: jax.Array, rejected_rewards: jax.Array, *,
       center_coef: float = 0.0) -> tuple[jax.Array, PairwiseExtras]:
  """Bradley–Terry reward-model loss, with an optional centring regulariser.

  ℓ = −log σ(r_w − r_l) + η·(r_w + r_l)²

  The second term (η = `center_coef`, default 0) keeps rewards centred at zero
  ("Helping or Herding? Reward Model Ensembles Mitigate but do not Eliminate
  Reward Hacking", Eisenstein et al. 2023, η = 0.01); see also
  `reward_centering`. BT: "Rank analysis of incomplete block designs"
  (Bradley & Terry 1952); "Training language models to follow instructions
  with human feedback" (Ouyang et al. 2022).

  Args:
    chosen_rewards: [B] scalar rewards of the preferred responses.
    rejected_rewards: [B] scalar rewards of the dispreferred responses.
    center_coef: η ≥ 0.

  Returns:
    (losses [B], PairwiseExtras). Sequence-level (one reward per response).
  """
  check_nonnegative("bt", center_coef=center_coef)
  check_inputs(rank=1, chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
  margins = chosen_rewards - rejected_rewards
  losses = -log_sigmoid(margins) + center_coef * (chosen_rewards + rejected_rewards) ** 2
  return losses, pairwise_extras(margins)


@register("reward_centering", family="reward_model")
def reward_centering(chosen_rewards: jax.Array, rejected_rewards: jax.Array, *,
                     coef: float = 0.01) -> tuple[jax.Array, PairwiseExtras]:
  """Centred-reward regulariser `η·(r_w + r_l)²` (add it to any pairwise loss).

  Penalises the (unidentified) offset of a BT reward so that rewards sum to
  zero per pair. "Helping or Herding? Reward Model Ensembles Mitigate but do
  not Eliminate Reward Hacking" (Eisenstein et al. 2023), η = 0.01.

  Args:
    chosen_rewards, rejected_rewards: [B].
    coef: η ≥ 0.

  Returns:
    (losses [B], PairwiseExtras).
  """
  check_inputs(rank=1, chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
  check_nonnegative("reward_centering", coef=coef)
  losses = coef * (chosen_rewards + rejected_rewards) ** 2
  return losses, pairwise_extras(chosen_rewards - rejected_rewards)


@register("bt_margin", family="reward_model")
def bt_margin(chosen_rewards: jax.Array, rejected_rewards: jax.Array, *,
              margin: ArrayOrFloat = 0.0,
              label_smoothing: float = 0.0) -> tuple[jax.Array, PairwiseExtras]:
  """BT with a (per-pair) margin and label smoothing (Secrets of RLHF II).

  ℓ = −[(1−α)·log σ(r_w − r_l − m) + α·log σ(−(r_w − r_l − m))]

  m = 0, α = 0 is `bt`. Secrets-II uses m = preference strength (or the
  adaptive margin μ̂ = mean strength) and α as label smoothing. "Secrets of
  RLHF in Large Language Models Part II: Reward Modeling" (Wang et al. 2024);
  margin as in "Llama 2" (Touvron et al. 2023).

  Args:
    chosen_rewards, rejected_rewards: [B].
    margin: scalar or [B] margin m (treated as data: gradients flow into it
      only if the caller lets them).
    label_smoothing: α in [0, 0.5).

  Returns:
    (losses [B], PairwiseExtras with margins r_w − r_l).
  """
  check_inputs(rank=1, chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
  check_range("bt_margin", "label_smoothing", label_smoothing, lambda v: 0.0 <= v < 0.5,
              "in [0, 0.5)")
  if jnp.ndim(margin) not in (0, 1) or (jnp.ndim(margin) == 1
                                        and jnp.shape(margin) != chosen_rewards.shape):
    raise ValueError(f"margin must be a scalar or shape {chosen_rewards.shape}, "
                     f"got shape {jnp.shape(margin)}")
  margins = chosen_rewards - rejected_rewards
  losses = -smoothed_log_likelihood(margins - margin, 1.0 - label_smoothing)
  return losses, pairwise_extras(margins)


def preference_strength(chosen_rewards: jax.Array,
                        rejected_rewards: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Secrets-II preference strength over an ensemble of M reward models.

  d_m = r_m(y_c) − r_m(y_r); returns (mean_m d_m [B], std_m d_m [B]) (population std).
  The mean is the adaptive margin for `bt_margin`; pairs with the lowest mean
  strength (`low_strength_mask`) are likely mislabelled. "Secrets of RLHF in
  Large Language Models Part II: Reward Modeling" (Wang et al. 2024).

  Args:
    chosen_rewards, rejected_rewards: [B, M].
  """
  check_inputs(rank=2, chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
  d = chosen_rewards - rejected_rewards
  return jnp.mean(d, axis=1), jnp.std(d, axis=1)


def low_strength_mask(strength: jax.Array, *, fraction: float = 0.2) -> jax.Array:
  """Bool [B], True for the `fraction` of pairs with the lowest strength (Secrets-II flips them).

  Exactly floor(fraction·B) entries are True (ties broken by position).
  """
  check_rank(strength, 1, "strength")
  check_unit_interval("low_strength_mask", fraction=fraction)
  k = int(fraction * strength.shape[0])
  ranks = jnp.argsort(jnp.argsort(strength, stable=True), stable=True)
  return ranks < k


@register("bt_regression", family="reward_model")
def bt_regression(chosen_rewards: jax.Array, rejected_rewards: jax.Array, *,
                  chosen_targets: jax.Array, rejected_targets: jax.Array,
                  bt_coef: float = 1.0, regression_coef: float = 1.0,
                  margin: ArrayOrFloat = 0.0) -> tuple[jax.Array, RegressionExtras]:
  """HelpSteer2-Preference style combination of BT and score regression.

  ℓ = c_bt·(−log σ(r_w − r_l − m)) + c_reg·½[(r_w − t_w)² + (r_l − t_l)²]

  t are absolute (e.g. helpfulness Likert) scores of each response; m an
  optional (scaled-BT) margin such as the annotated preference strength.
  "HelpSteer2-Preference: Complementing Ratings with Preferences" (Wang et al.
  2024). regression_coef = 0 and m = 0 gives `bt` (times c_bt).

  Args:
    chosen_rewards, rejected_rewards: [B] predicted rewards.
    chosen_targets, rejected_targets: [B] regression targets.
    bt_coef, regression_coef: non-negative weights.
    margin: scalar or [B].

  Returns:
    (losses [B], RegressionExtras).
  """
  check_nonnegative("bt_regression", bt_coef=bt_coef, regression_coef=regression_coef)
  check_inputs(rank=1, chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards,
               chosen_targets=chosen_targets, rejected_targets=rejected_targets)
  bt_losses, ex = bt_margin(chosen_rewards, rejected_rewards, margin=margin)
  reg = 0.5 * ((chosen_rewards - chosen_targets) ** 2
               + (rejected_rewards - rejected_targets) ** 2)
  losses = bt_coef * bt_losses + regression_coef * reg
  return losses, RegressionExtras(ex.margins, ex.accuracy, bt_losses, reg)


@register("plackett_luce", family="reward_model")
def plackett_luce(rewards: jax.Array, *, mask: Optional[jax.Array] = None,
                  temperature: float = 1.0) -> tuple[jax.Array, ListwiseExtras]:
  """Plackett–Luce negative log-likelihood of a ranked list of K responses.

  ℓ = −Σ_{k=1}^{K} [r_k/τ − log Σ_{j≥k} exp(r_j/τ)]   (responses ranked best first)

  K = 2 is `bt` (with τ = 1). Ragged lists: `mask[b, k] = False` drops
  response k from every denominator and numerator (put valid entries first or
  anywhere; the order of the valid ones is the ranking). "The analysis of
  permutations" (Plackett 1975); listwise RM as in "Preference Ranking
  Optimization for Human Alignment" (Song et al. 2023).

  Args:
    rewards: [B, K] rewards in ranked order (index 0 = best).
    mask: optional [B, K] bool, True for real responses.
    temperature: τ > 0.

  Returns:
    (losses [B], ListwiseExtras). Sum over positions (not normalised by K).
  """
  check_positive("plackett_luce", temperature=temperature)
  check_rank(rewards, 2, "rewards")
  check_float(rewards, "rewards")
  if mask is None:
    mask = jnp.ones(rewards.shape, bool)
  elif mask.shape != rewards.shape:
    raise ValueError(f"mask has shape {mask.shape} but rewards has shape {rewards.shape}")
  mask = mask.astype(bool)
  # A large finite (not -inf) filler keeps gradients finite for ragged lists.
  x = jnp.where(mask, rewards / temperature, jnp.finfo(rewards.dtype).min / 4)
  # log Σ_{j≥k} exp(x_j): reverse cumulative logsumexp.
  tail = jax.lax.cumlogsumexp(x, axis=1, reverse=True)
  terms = jnp.where(mask, tail - x, 0.0)
  first = jnp.argmax(mask, axis=1)
  best = jnp.take_along_axis(x, first[:, None], axis=1)[:, 0]
  top1 = (best >= jnp.max(x, axis=1)).astype(rewards.dtype)
  return jnp.sum(terms, axis=1), ListwiseExtras(top1_accuracy=top1, position_losses=terms)


@register("regret_preference", family="reward_model")
def regret_preference(chosen_advantages: jax.Array, rejected_advantages: jax.Array, *,
                      chosen_mask: Optional[jax.Array] = None,
                      rejected_mask: Optional[jax.Array] = None,
                      labels: ArrayOrFloat = 1.0) -> tuple[jax.Array, PairwiseExtras]:
  """Regret-based preference model: preferences from summed optimal advantages.

  P(σ1 ≻ σ2) = σ(Σ_t A*(s_t, a_t)|σ1 − Σ_t A*(s_t, a_t)|σ2)
  ℓ = −[p·log P + (1−p)·log(1 − P)]

  Passing per-step rewards instead of A* gives the partial-return (BT) model.
  "Models of human preference for learning reward functions" (Knox et al.
  2022), official code. A* = Q*(s,a) − V*(s) ≤ 0 (negated regret per step).

  Args:
    chosen_advantages, rejected_advantages: [B, T] per-step optimal
      advantages of the two segments (σ1 = chosen).
    chosen_mask, rejected_mask: optional [B, T] step masks.
    labels: p, probability that σ1 is preferred (scalar or [B]); 1 = hard label.

  Returns:
    (losses [B], PairwiseExtras with margins Σ A*(σ1) − Σ A*(σ2)).
  """
  check_inputs(rank=2, chosen_advantages=chosen_advantages,
               rejected_advantages=rejected_advantages)
  for m, n in ((chosen_mask, "chosen_mask"), (rejected_mask, "rejected_mask")):
    if m is not None and m.shape != chosen_advantages.shape:
      raise ValueError(f"{n} has shape {m.shape}, expected {chosen_advantages.shape}")
  margins = (masked_sum(chosen_advantages, chosen_mask, axis=1)
             - masked_sum(rejected_advantages, rejected_mask, axis=1))
  losses = -smoothed_log_likelihood(margins, labels)
  return losses, pairwise_extras(margins)
