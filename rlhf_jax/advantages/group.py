"""Group-relative advantage estimators over sequence rewards `[N]` (N = prompts x G).

Every estimator here takes `rewards [N]` whose groups of `group_size` samples
of the same prompt are contiguous, keyword-only hyper-parameters, and returns
sequence advantages `[N]` (broadcast over tokens with `base.expand_to_tokens`).
A group whose rewards are all equal gets exactly zero advantage (no NaN).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from rlhf_jax.advantages import base
from rlhf_jax.advantages.registry import register
from rlhf_jax.losses.common import check_float, check_nonnegative, check_rank


@register("grpo", family="group", needs=("group_size",))
def grpo(rewards: jax.Array, *, group_size: int, eps: float = 1e-6,
         unbiased: bool = True) -> jax.Array:
  """GRPO group z-score.

  A_i = (r_i − mean_G r) / (std_G r + ε).

  DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language
  Models (Shao et al., 2024). Shapes: rewards [N] -> [N]. `unbiased` picks the
  (G−1) std used by common implementations; all-equal groups give 0.
  """
  check_nonnegative("grpo", eps=eps)
  r = base.group_view(rewards, group_size)
  return base.safe_div(base.centred(r), base.group_std(r, unbiased=unbiased), eps).reshape(-1)


@register("dr_grpo", family="group", needs=("group_size",))
def dr_grpo(rewards: jax.Array, *, group_size: int) -> jax.Array:
  """Dr. GRPO advantage: the group-mean baseline without std division.

  A_i = r_i − mean_G r.

  Understanding R1-Zero-Like Training: A Critical Perspective (Liu et al., 2025).
  Shapes: rewards [N] -> [N]. Pair with `aggregate(mode="seq_mean_token_sum_norm")`.
  """
  return base.centred(base.group_view(rewards, group_size)).reshape(-1)


@register("rec", family="group", needs=("group_size",))
def rec(rewards: jax.Array, *, group_size: int) -> jax.Array:
  """REC / OPMD advantage: group-relative REINFORCE, A_i = r_i − mean_G r.

  Group-Relative REINFORCE Is Secretly an Off-Policy Algorithm (Yao et al., 2025).
  Shapes: rewards [N] -> [N]. Use with `losses.policy_gradient.opmd` (τ=0 is REC).
  """
  return dr_grpo(rewards, group_size=group_size)


@register("asymre", family="group", needs=("group_size",))
def asymre(rewards: jax.Array, *, group_size: int, shift: float = 0.1) -> jax.Array:
  """AsymRE: group-mean baseline lowered by `shift`.

  A_i = r_i − (mean_G r − c), c = `shift` (0.1 in the official code).

  Asymmetric REINFORCE for off-policy RL (Arnal et al., 2025), via Yao et al.
  (2025). Shapes: rewards [N] -> [N]. By design an all-equal group gets A = c,
  not 0 (equivalent to a −c·log π regulariser); set shift=0 to recover REC.
  """
  return dr_grpo(rewards, group_size=group_size) + shift


@register("rloo", family="group", needs=("group_size",))
def rloo(rewards: jax.Array, *, group_size: int) -> jax.Array:
  """REINFORCE leave-one-out baseline.

  A_i = r_i − (1/(G−1)) Σ_{j≠i} r_j = (G/(G−1))·(r_i − mean_G r).

  Back to Basics: Revisiting REINFORCE Style Optimization for Learning from
  Human Feedback in LLMs (Ahmadian et al., 2024). Shapes: rewards [N] -> [N]; G ≥ 2.
  """
  if group_size < 2:
    raise ValueError(f"rloo needs group_size >= 2 (leave-one-out), got {group_size}")
  r = base.group_view(rewards, group_size)
  return (group_size / (group_size - 1) * base.centred(r)).reshape(-1)


@register("reinforce_pp_baseline", family="group", needs=("group_size",))
def reinforce_pp_baseline(rewards: jax.Array, *, group_size: int, eps: float = 1e-6) -> jax.Array:
  """REINFORCE++-baseline: group-mean baseline, then batch normalisation.

  a_i = r_i − mean_G r;  A_i = a_i / (std_batch a + ε).

  REINFORCE++: An Efficient RLHF Algorithm with Robustness to Both Prompt and
  Reward Models (Hu et al., 2025). Shapes: rewards [N] -> [N]. The batch mean of
  a is 0 exactly (each group sums to 0), so only the std is divided out; this
  keeps all-equal groups at exactly 0.
  """
  check_nonnegative("reinforce_pp_baseline", eps=eps)
  a = dr_grpo(rewards, group_size=group_size)
  return a / (base.safe_sqrt(jnp.mean(a ** 2)) + eps)


@register("remax", family="group", needs=("greedy_rewards", "group_size"))
def remax(rewards: jax.Array, *, greedy_rewards: jax.Array, group_size: int = 1) -> jax.Array:
  """ReMax: the reward of the greedy response is the baseline.

  A_i = r_i − r(x, ŷ_greedy(x)).

  ReMax: A Simple, Effective, and Efficient Reinforcement Learning Method for
  Aligning Large Language Models (Li et al., 2023). Shapes: rewards [N],
  greedy_rewards [N // group_size] (one greedy decode per prompt) -> [N].
  """
  r = base.group_view(rewards, group_size)
  check_rank(greedy_rewards, 1, "greedy_rewards")
  check_float(greedy_rewards, "greedy_rewards")
  if greedy_rewards.shape[0] != r.shape[0]:
    raise ValueError(f"greedy_rewards has {greedy_rewards.shape[0]} entries but rewards has "
                     f"{r.shape[0]} groups of {group_size}; pass one greedy reward per prompt")
  return (r - greedy_rewards[:, None]).reshape(-1)


@register("opo", family="group", needs=("lengths", "group_size"))
def opo(rewards: jax.Array, *, lengths: jax.Array, group_size: int) -> jax.Array:
  """OPO: length-weighted optimal baseline.

  b = Σ_i l_i r_i / Σ_i l_i over the group;  A_i = r_i − b.

  On-Policy RL with Optimal Reward Baseline (Hao et al., 2025). Shapes: rewards
  [N], lengths [N] (response token counts, > 0) -> [N].
  """
  r = base.group_view(rewards, group_size)
  check_rank(lengths, 1, "lengths")
  if lengths.shape != rewards.shape:
    raise ValueError(f"lengths has shape {lengths.shape} but rewards has {rewards.shape}")
  l = lengths.astype(r.dtype).reshape(r.shape)
  shifted = r - r[:, :1]  # constant groups become exact zeros
  b = jnp.sum(l * shifted, axis=-1, keepdims=True) / jnp.maximum(
      jnp.sum(l, axis=-1, keepdims=True), jnp.finfo(r.dtype).tiny)
  return (shifted - b).reshape(-1)


@register("gpg", family="group", needs=("group_size",))
def gpg(rewards: jax.Array, *, group_size: int, correct_invalid: bool = True) -> jax.Array:
  """GPG: group-mean baseline scaled by the valid-sample correction α.

  A_i = α·(r_i − mean_G r),  α = B / (B − M), M = samples in zero-variance groups.

  GPG: A Simple and Strong Reinforcement Learning Baseline for Model Reasoning
  (Chu et al., 2025). Shapes: rewards [N] -> [N]. α = 1 when every group is
  degenerate (the advantages are all 0 then).
  """
  r = base.group_view(rewards, group_size)
  a = base.centred(r)
  if not correct_invalid:
    return a.reshape(-1)
  invalid = jnp.all(r == r[:, :1], axis=-1)
  b = rewards.shape[0]
  m = jnp.sum(invalid) * group_size
  alpha = b / jnp.maximum(b - m, 1).astype(r.dtype)
  alpha = jnp.where(m == b, 1.0, alpha)
  return (alpha * a).reshape(-1)


@register("gdpo", family="multi_reward", needs=("group_size",))
def gdpo(rewards: jax.Array, *, group_size: int, weights: Optional[jax.Array] = None,
         eps: float = 1e-4, unbiased: bool = True) -> jax.Array:
  """GDPO: normalise each reward within its group, weight-sum, then batch-normalise.

  A_k = (r_k − mean_G r_k)/(std_G r_k + ε);  a = Σ_k w_k A_k;  A = a/(std_batch a + ε).

  GDPO (group reward-decoupled normalisation for multi-reward RL). Shapes:
  rewards [N, K] with K ≥ 2, weights [K] (default ones) -> [N]. The batch mean
  of a is 0 exactly, so only the std is divided out (all-equal groups stay 0).
  """
  check_nonnegative("gdpo", eps=eps)
  check_rank(rewards, 2, "rewards")
  check_float(rewards, "rewards")
  k = rewards.shape[1]
  if k < 2:
    raise ValueError(f"gdpo needs rewards [N, K] with K >= 2 rewards, got K={k}; use grpo")
  w = jnp.ones((k,), rewards.dtype) if weights is None else weights
  if w.shape != (k,):
    raise ValueError(f"weights must have shape ({k},) to match rewards [N, K], got {w.shape}")
  per = jax.vmap(lambda col: grpo(col, group_size=group_size, eps=eps, unbiased=unbiased),
                 in_axes=1, out_axes=1)(rewards)
  a = per @ w
  n = a.shape[0]
  std = base.safe_sqrt(jnp.sum(a ** 2) / (n - 1 if unbiased and n > 1 else n))
  return a / (std + eps)
