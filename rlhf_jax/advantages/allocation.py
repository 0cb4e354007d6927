"""Data and compute allocation rules: pure functions over per-prompt statistics.

Dynamic sampling (DAPO), PF-PPO filtration, Knapsack RL budgets, Reinforce-Ada
stopping and baselines, PCL prompt selection. Masks are boolean arrays.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from rlhf_jax.advantages import base
from rlhf_jax.advantages.registry import register
from rlhf_jax.losses.common import check_float, check_nonnegative, check_rank, check_unit_interval


def dynamic_sampling_filter(rewards: jax.Array, *, group_size: int, atol: float = 0.0,
                            per_sample: bool = False) -> jax.Array:
  """DAPO dynamic sampling: keep only groups whose rewards are not all equal.

  keep_p = max_G r − min_G r > atol.

  DAPO: An Open-Source LLM Reinforcement Learning System at Scale (Yu et al.,
  2025). Shapes: rewards [N] -> keep [N // G] bool ([N] with per_sample=True).
  """
  check_nonnegative("dynamic_sampling_filter", atol=atol)
  r = base.group_view(rewards, group_size)
  keep = (jnp.max(r, axis=-1) - jnp.min(r, axis=-1)) > atol
  return jnp.repeat(keep, group_size) if per_sample else keep


def _rank_in_group(r: jax.Array) -> jax.Array:
  """Rank of each entry within its row (0 = smallest; ties broken by position)."""
  return jnp.argsort(jnp.argsort(r, axis=-1, stable=True), axis=-1, stable=True)


def pf_ppo_filter(rewards: jax.Array, *, group_size: int, num_best: int = 1,
                  num_worst: int = 0, num_random: int = 0,
                  rng: Optional[jax.Array] = None) -> jax.Array:
  """PF-PPO policy filtration: keep samples whose reward-model score is reliable.

  Per group keep the `num_best` highest-reward samples, the `num_worst` lowest
  (best-worst, "BW") and `num_random` uniformly drawn others (best-random, "BR");
  num_worst = num_random = 0 is best-of-N.

  Policy Filtration in RLHF to Fine-Tune LLM for Code Generation (Shen et al.,
  2024). Shapes: rewards [N] -> keep [N] bool. `rng` is required iff num_random > 0.
  """
  r = base.group_view(rewards, group_size)
  if num_best + num_worst + num_random > group_size:
    raise ValueError(f"num_best + num_worst + num_random must be <= group_size={group_size}")
  rank = _rank_in_group(r)
  keep = (rank >= group_size - num_best) | (rank < num_worst)
  if num_random:
    if rng is None:
      raise ValueError("pf_ppo_filter needs rng= when num_random > 0")
    noise = jax.random.uniform(rng, r.shape)
    noise = jnp.where(keep, -1.0, noise)  # never re-pick a kept sample
    keep = keep | (_rank_in_group(noise) >= group_size - num_random)
  return keep.reshape(-1)


def knapsack_value(num_samples: jax.Array, success_rate: jax.Array) -> jax.Array:
  """Knapsack RL item value: [1 − p^N − (1 − p)^N]·p(1 − p)².

  Knapsack RL: Unlocking Exploration of LLMs via Optimizing Budget Allocation
  (Li et al., 2025). The bracket is the probability a group of N has both
  outcomes (non-zero gradient); p(1−p)² its gradient-size weight.
  """
  n = jnp.asarray(num_samples, jnp.result_type(float))
  p = success_rate
  return (1.0 - p ** n - (1.0 - p) ** n) * p * (1.0 - p) ** 2


def knapsack_allocate(success_rates: jax.Array, *, budget: int, min_samples: int = 2,
                      max_samples: Optional[int] = None) -> jax.Array:
  """Knapsack RL budget allocation: N_i maximising Σ value(N_i, p_i), Σ N_i ≤ budget.

  Greedy on marginal gains from N_i = min_samples; exact because the gain
  p^N(1−p) + (1−p)^N p of one more sample decreases in N for N ≥ 1.
  Shapes: success_rates [P] (from the last epoch) -> counts [P] int32. Ties
  (e.g. p ∈ {0, 1}, gain 0) go to the lowest index; leftover budget is spent
  too (Σ N_i = budget unless every prompt is at max_samples).
  """
  check_rank(success_rates, 1, "success_rates")
  check_float(success_rates, "success_rates")
  p_count = success_rates.shape[0]
  if min_samples < 1:
    raise ValueError(f"min_samples must be >= 1, got {min_samples}")
  if budget < p_count * min_samples:
    raise ValueError(f"budget={budget} is below {p_count} prompts x min_samples={min_samples}")
  cap = budget if max_samples is None else max_samples
  n0 = jnp.full((p_count,), min_samples, jnp.int32)

  def step(_, n):
    gain = knapsack_value(n + 1, success_rates) - knapsack_value(n, success_rates)
    gain = jnp.where(n < cap, gain, -jnp.inf)
    i = jnp.argmax(gain)
    return jnp.where(jnp.isfinite(gain[i]), n.at[i].add(1), n)

  return jax.lax.fori_loop(0, budget - p_count * min_samples, step, n0)


@register("grpo_ragged", family="group", needs=("group_ids",))
def grpo_ragged(rewards: jax.Array, *, group_ids: jax.Array, eps: float = 1e-6,
                unbiased: bool = True) -> jax.Array:
  """GRPO's z-score over groups of different sizes (Knapsack RL's allocation).

  A_i = (r_i − mean_{g(i)} r) / (std_{g(i)} r + ε), the mean and std over the samples that
  share i's group id; a group of one sample gets 0. With equal consecutive groups it is
  `grpo`. Knapsack RL (Li et al., 2025) trains GRPO on its ragged groups.
  Shapes: rewards [N], group_ids [N] int in [0, N) -> [N].
  """
  check_nonnegative("grpo_ragged", eps=eps)
  check_rank(rewards, 1, "rewards")
  if group_ids.shape != rewards.shape:
    raise ValueError(f"grpo_ragged: group_ids {group_ids.shape} must match rewards "
                     f"{rewards.shape}")
  n = rewards.shape[0]
  count = jax.ops.segment_sum(jnp.ones_like(rewards), group_ids, num_segments=n)
  mean = jax.ops.segment_sum(rewards, group_ids, num_segments=n) / jnp.maximum(count, 1.0)
  centred = rewards - mean[group_ids]
  dof = count - (1.0 if unbiased else 0.0)
  var = jax.ops.segment_sum(centred ** 2, group_ids, num_segments=n) / jnp.maximum(dof, 1.0)
  std = jnp.sqrt(jnp.maximum(var, 0.0))[group_ids]
  return jnp.where(count[group_ids] > 1, centred / (std + eps), 0.0)


def reinforce_ada_active(num_positive: jax.Array, num_negative: jax.Array, *, n: int = 4,
                         balanced: bool = True) -> jax.Array:
  """Reinforce-Ada stop rule: which prompts still need sampling.

  balanced: done when #pos ≥ ⌊n/2⌋ and #neg ≥ n − ⌊n/2⌋;  positive-focused
  (balanced=False): done when #pos ≥ 1.

  Reinforce-Ada: An Adaptive Sampling Framework for Reinforce-Style LLM
  Training (Xiong et al., 2025). Shapes: counts [P] -> active [P] bool.
  Positives are `reward > 0.7` in the official code.
  """
  if balanced:
    done = (num_positive >= n // 2) & (num_negative >= n - n // 2)
  else:
    done = num_positive >= 1
  return ~done


def reinforce_ada_advantages(rewards: jax.Array, *, prompt_means: jax.Array,
                             group_size: int) -> jax.Array:
  """Reinforce-Ada baseline: A_i = r_i − p̂, p̂ the mean over every sample drawn for the prompt.

  Shapes: rewards [N] (the kept n per prompt), prompt_means [N // G] -> [N].
  """
  r = base.group_view(rewards, group_size)
  if prompt_means.shape != (r.shape[0],):
    raise ValueError(f"prompt_means must have shape ({r.shape[0]},), got {prompt_means.shape}")
  return (r - prompt_means[:, None]).reshape(-1)


@register("reinforce_ada", family="group", needs=("group_size", "prompt_means"))
def reinforce_ada(rewards: jax.Array, *, group_size: int, prompt_means: jax.Array) -> jax.Array:
  """Reinforce-Ada's estimator: A_i = r_i − p̂, p̂ the mean reward over every sample drawn
  for the prompt (`rl.adaptive_sampling`'s pool; without it, the group itself).

  Reinforce-Ada (Xiong et al., 2025). Shapes: rewards [N], prompt_means [N // G] -> [N].
  """
  return reinforce_ada_advantages(rewards, prompt_means=prompt_means, group_size=group_size)


class AdaptiveSelection(NamedTuple):
  """Reinforce-Ada's kept samples: `rows` [B·G] (indices into the B·R·G pool, G per prompt
  in pool order), `prompt_means` [B] over the rounds used, `rounds_used` [B] int32."""
  rows: jax.Array
  prompt_means: jax.Array
  rounds_used: jax.Array


def reinforce_ada_select(rewards: jax.Array, *, group_size: int, rounds: int,
                         threshold: float = 0.7, balanced: bool = True) -> AdaptiveSelection:
  """Reinforce-Ada's sampling at a fixed shape: R rounds of G samples per prompt are drawn
  at once (`rewards` [B·R·G], each prompt's R·G rows in round order); prompt i uses rounds
  1..k_i, k_i the first round after which `reinforce_ada_active` says it is done (R if
  never), and keeps G of those samples: positives (reward > `threshold`) up to
  max(⌊G/2⌋, G − #negatives), negatives for the rest, earliest first. p̂_i is the mean
  reward of the k_i·G samples used.

  Reinforce-Ada: An Adaptive Sampling Framework for Reinforce-Style LLM Training (Xiong et
  al., 2025); the paper stops sampling a prompt once done, here every round is drawn and
  the later ones are ignored (static shapes). Shapes: [B·R·G] -> AdaptiveSelection.
  """
  check_rank(rewards, 1, "rewards")
  g, k = int(group_size), int(rounds)
  if g < 1 or k < 1 or rewards.shape[0] % (g * k):
    raise ValueError(f"reinforce_ada_select: {rewards.shape[0]} rewards are not prompts x "
                     f"rounds={k} x group_size={g}")
  r = rewards.reshape(-1, k, g)
  pos = r > threshold
  npos = jnp.cumsum(jnp.sum(pos, axis=2), axis=1)                     # [B, R] after round j
  nneg = jnp.cumsum(jnp.sum(~pos, axis=2), axis=1)
  done = ~reinforce_ada_active(npos, nneg, n=g, balanced=balanced)
  used = jnp.where(jnp.any(done, axis=1), jnp.argmax(done, axis=1) + 1, k).astype(jnp.int32)
  flat, pos = r.reshape(-1, k * g), pos.reshape(-1, k * g)
  pool = jnp.arange(k * g)[None, :] < (used * g)[:, None]
  means = jnp.sum(jnp.where(pool, flat, 0.0), axis=1) / (used * g).astype(flat.dtype)
  p_in, n_in = pos & pool, ~pos & pool
  n_pos, n_neg = jnp.sum(p_in, axis=1), jnp.sum(n_in, axis=1)
  take_pos = jnp.minimum(n_pos, jnp.maximum(g // 2, g - n_neg))
  take_neg = g - take_pos
  keep = ((p_in & (jnp.cumsum(p_in, axis=1) <= take_pos[:, None]))
          | (n_in & (jnp.cumsum(n_in, axis=1) <= take_neg[:, None])))
  order = jnp.argsort(~keep, axis=1, stable=True)[:, :g]              # kept, in pool order
  rows = order + (jnp.arange(flat.shape[0]) * k * g)[:, None]
  return AdaptiveSelection(rows.reshape(-1).astype(jnp.int32), jax.lax.stop_gradient(means),
                           used)


class PclSelection(NamedTuple):
  score: jax.Array
  keep: jax.Array


def pcl_select(predicted_success: jax.Array, *, num_select: int,
               target: float = 0.5) -> PclSelection:
  """PCL prompt selection: keep prompts whose predicted success is nearest `target`.

  score_i = −|V(x_i) − τ|, τ = 0.5 (intermediate difficulty); keep the top m.

  Prompt Curriculum Learning for Efficient LLM Post-Training (Gao et al., 2025).
  Shapes: predicted_success [P] (value-model output) -> score [P], keep [P] bool.
  """
  check_unit_interval("pcl_select", target=target)
  check_rank(predicted_success, 1, "predicted_success")
  if not 0 < num_select <= predicted_success.shape[0]:
    raise ValueError(f"num_select must be in [1, {predicted_success.shape[0]}], got {num_select}")
  score = -jnp.abs(predicted_success - target)
  _, idx = jax.lax.top_k(score, num_select)
  keep = jnp.zeros(score.shape, bool).at[idx].set(True)
  return PclSelection(score=score, keep=keep)
