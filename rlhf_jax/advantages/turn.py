"""Turn-level credit for multi-turn rollouts: turn returns, and turn -> token advantages.

A multi-turn episode has K turns; turn-level ("step" family) estimators take per-turn
inputs `[N, K]` (rewards, a valid-turn mask, anchor ids) and return per-turn advantages
`[N, K]`; `per_token` spreads them over each turn's tokens with the turn index of every
token (`TurnInfo.token_turn`, -1 for padding). GiGPO (`token.gigpo`) has the same form.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.advantages import base
from rlhf_jax.advantages.registry import register
from rlhf_jax.advantages.token import check_steps, discounted_returns
from rlhf_jax.losses.common import (check_float, check_nonnegative, check_positive, check_rank,
                                    check_unit_interval, grouped)


def per_token(turn_advantages: jax.Array, token_turn: jax.Array, mask: jax.Array) -> jax.Array:
  """Per-token advantages from per-turn ones: A_t = A_{turn(t)} where mask, else 0.

  Shapes: turn_advantages [N, K] float, token_turn [N, T] int (the turn of each token,
  -1 for padding), mask [N, T] (the trained tokens) -> [N, T].

  Examples:
    >>> import jax.numpy as jnp
    >>> per_token(jnp.array([[1., -2.]]), jnp.array([[0, 0, 1, 1, -1]]),
    ...           jnp.array([[1, 1, 0, 1, 0]])).tolist()
    [[1.0, 1.0, 0.0, -2.0, 0.0]]
  """
  check_rank(turn_advantages, 2, "turn_advantages")
  check_rank(token_turn, 2, "token_turn")
  if token_turn.shape != mask.shape or token_turn.shape[0] != turn_advantages.shape[0]:
    raise ValueError(f"token_turn {token_turn.shape} and mask {mask.shape} must both be "
                     f"[N={turn_advantages.shape[0]}, T]")
  if not jnp.issubdtype(token_turn.dtype, jnp.integer):
    raise ValueError(f"token_turn must be integer turn indices, got dtype {token_turn.dtype}")
  k = turn_advantages.shape[1]
  idx = jnp.clip(token_turn, 0, k - 1)
  adv = jnp.take_along_axis(turn_advantages, idx, axis=1)
  keep = mask.astype(bool) & (token_turn >= 0) & (token_turn < k)
  return jnp.where(keep, adv, 0.0)


def with_residual(rewards: jax.Array, step_rewards: jax.Array, step_mask: jax.Array) -> jax.Array:
  """Step rewards whose last valid turn also gets `rewards − Σ_k step_rewards`.

  The episode's turn rewards then sum to the sequence reward the step scored (reward
  functions beyond the environment's, shaping); rows without a valid turn are unchanged.
  Shapes: rewards [N], step_rewards, step_mask [N, K] -> [N, K].
  """
  m = step_mask.astype(bool)
  r = jnp.where(m, step_rewards, 0.0)
  k = step_rewards.shape[1]
  last = k - 1 - jnp.argmax(m[:, ::-1], axis=1)
  is_last = (jnp.arange(k)[None, :] == last[:, None]) & m
  return r + jnp.where(is_last, (rewards - jnp.sum(r, axis=1))[:, None], 0.0)


@register("turn_returns", family="step", needs=("step_rewards", "step_mask", "group_size"))
def turn_returns(rewards: jax.Array, *, step_rewards: jax.Array, step_mask: jax.Array,
                 group_size: int, gamma: float = 1.0, normalize_std: bool = False,
                 residual_to_last: bool = True, eps: float = 1e-6) -> jax.Array:
  """Turn-level discounted return-to-go minus the group's mean episode return.

  R_{i,k} = Σ_{j≥k} γ^{j−k} r_{i,j} over the valid turns;
  A_{i,k} = (R_{i,k} − mean_G R_{·,0}) / F;  F = std_G R_{·,0} + ε (population), or 1.

  Each turn is credited with the rewards from that turn on (reward-to-go, REINFORCE
  with a per-prompt baseline), so a late tool result does not credit the turns before
  it unless γ > 0 carries it back; with one turn and no step rewards it is Dr. GRPO's
  advantage (GRPO's with `normalize_std`, population std). With `residual_to_last`,
  `rewards − Σ_k r_{i,k}` (the part of the scored reward the environment did not assign
  to a turn) is added to the last valid turn (`with_residual`).

  Simple statistical gradient-following algorithms for connectionist reinforcement
  learning (Williams, 1992); group baseline as in GRPO (Shao et al., 2024).
  Shapes: rewards [N] sequence rewards, step_rewards [N, K], step_mask [N, K] ->
  advantages [N, K] (0 on invalid turns); spread them over tokens with `per_token`.
  """
  check_unit_interval("turn_returns", gamma=gamma)
  check_nonnegative("turn_returns", eps=eps)
  check_steps("turn_returns", rewards, step_rewards, step_mask=step_mask)
  r = with_residual(rewards, step_rewards, step_mask) if residual_to_last else step_rewards
  ret = discounted_returns(r, step_mask, gamma=gamma)
  r0 = ret[:, 0]
  c0 = base.centred(base.group_view(r0, group_size, "episode returns"))
  adv = (ret - r0[:, None]) + c0.reshape(-1)[:, None]
  if normalize_std:
    std = base.group_std(base.group_view(r0, group_size, "episode returns"))
    adv = adv / (jnp.repeat(std.reshape(-1), group_size)[:, None] + eps)
  return jnp.where(step_mask.astype(bool), adv, 0.0)


def pure_min_form(step_rewards: jax.Array, mask: jax.Array, *,
                  temperature: float = 0.1) -> tuple[jax.Array, jax.Array]:
  """PURE min-form credit assignment for process rewards.

  r*_i = softmax_i(−r/T)·r_i over valid steps; G_t = Σ_{i≥t} r*_i (≈ min_{i≥t} r_i
  as T → 0). "Stop Summation: Min-Form Credit Assignment Is All Process Reward
  Model Needs for Reasoning" (Cheng et al. 2025), T = 0.1; pair with an RLOO baseline.

  Args:
    step_rewards: [N, S]; mask: [N, S] valid steps.

  Returns:
    (weighted step rewards r* [N, S], returns G [N, S]); 0 on invalid steps.
  """
  check_rank(step_rewards, 2, "step_rewards")
  if mask.shape != step_rewards.shape:
    raise ValueError(f"mask has shape {mask.shape} but step_rewards has {step_rewards.shape}")
  check_positive("pure_min_form", temperature=temperature)
  m = mask.astype(bool)
  logits = jnp.where(m, -step_rewards / temperature, jnp.finfo(step_rewards.dtype).min / 4)
  w = jax.nn.softmax(logits, axis=1)
  weighted = jnp.where(m, w * step_rewards, 0.0)
  returns = jnp.where(m, jnp.cumsum(weighted[:, ::-1], axis=1)[:, ::-1], 0.0)
  return weighted, returns


def _loo_mean(x: jax.Array, group_size: int) -> jax.Array:
  """Leave-one-out group means: (Σ_G x − x_i) / (G − 1) [N] (0 for G = 1)."""
  g = base.group_view(x, group_size, "episode values")
  return ((jnp.sum(g, axis=1, keepdims=True) - g) / max(group_size - 1, 1)).reshape(-1)


@register("pure", family="step", needs=("step_rewards", "step_mask", "group_size"))
def pure(rewards: jax.Array, *, step_rewards: jax.Array, step_mask: jax.Array,
         group_size: int, temperature: float = 0.1, outcome_coef: float = 1.0) -> jax.Array:
  """PURE: min-form credit for process (turn) rewards, plus the outcome, RLOO baselines.

  r*_{i,k} = softmax_k(−r_i/T)_k · r_{i,k} over the valid turns (`pure_min_form`);
  G_{i,k} = Σ_{j≥k} r*_{i,j} (≈ min_{j≥k} r_{i,j} as T → 0);
  A_{i,k} = (G_{i,k} − loo(G_{·,0})_i) + c·(R_i − loo(R)_i),  loo(x)_i the mean of x over
  the other G − 1 samples of the group.

  The process rewards are the environment's per-turn rewards (`step_rewards`), R the
  scored sequence reward (the verifiable outcome), c = `outcome_coef` [choice: the
  paper's RLOO baseline applied to both returns]. "Stop Summation: Min-Form Credit
  Assignment Is All Process Reward Model Needs for Reasoning" (Cheng et al., 2025), T = 0.1.
  Shapes: rewards [N], step_rewards, step_mask [N, K] -> advantages [N, K] (0 on invalid
  turns).
  """
  check_nonnegative("pure", outcome_coef=outcome_coef)
  check_steps("pure", rewards, step_rewards, step_mask=step_mask)
  _, ret = pure_min_form(step_rewards, step_mask, temperature=temperature)
  adv = (ret - _loo_mean(ret[:, 0], group_size)[:, None]
         + outcome_coef * (rewards - _loo_mean(rewards, group_size))[:, None])
  return jnp.where(step_mask.astype(bool), adv, 0.0)


def igpo_turn_rewards(rewards: jax.Array, answer_probs: jax.Array,
                      step_mask: jax.Array) -> jax.Array:
  """IGPO's turn rewards: the information gain of each turn, the outcome on the last one.

  r_k = P_{k+1} − P_k on every valid turn but the last, r_last = R (the outcome reward),
  0 on turns not taken; P_k is the policy's probability of the ground-truth answer given
  the history before turn k (P_0: the prompt alone). Shapes: rewards [N], answer_probs
  [N, K + 1], step_mask [N, K] -> [N, K].
  """
  k = step_mask.shape[1]
  if answer_probs.shape != (step_mask.shape[0], k + 1):
    raise ValueError(f"igpo: answer_probs has shape {answer_probs.shape}; expected [N, K + 1] = "
                     f"{(step_mask.shape[0], k + 1)} (P_0 after the prompt, P_k after turn k)")
  m = step_mask.astype(bool)
  last = k - 1 - jnp.argmax(m[:, ::-1], axis=1)
  is_last = (jnp.arange(k)[None, :] == last[:, None]) & m
  gain = answer_probs[:, 1:] - answer_probs[:, :-1]
  return jnp.where(is_last, rewards[:, None], jnp.where(m, gain, 0.0))


@register("igpo", family="step", needs=("answer_probs", "step_mask", "group_size"))
def igpo(rewards: jax.Array, *, answer_probs: jax.Array, step_mask: jax.Array, group_size: int,
         gamma: float = 1.0, eps: float = 1e-6) -> jax.Array:
  """IGPO: information-gain turn rewards, normalised over the group, summed to go.

  P_k = exp(mean_j log π_θ(a_j | prompt, turns < k with their observations)) for the
  ground-truth answer a; r_k = P_{k+1} − P_k, except r_last = R, the outcome reward
  (`igpo_turn_rewards`); r̂ = (r − mean) / (std + ε) over every valid turn of the G
  episodes of a prompt (population std); Â_k = Σ_{j≥k} γ^{j−k} r̂_j over the valid turns.

  Information Gain-based Policy Optimization: A Simple and Effective Approach for
  Multi-Turn LLM Agents (Wang et al., 2025). Shapes: rewards [N] sequence rewards,
  answer_probs [N, K + 1] (the multi-turn step computes them: `multiturn.answer_probs`),
  step_mask [N, K] -> advantages [N, K] (0 on invalid turns); spread them over tokens
  with `per_token`.
  """
  check_unit_interval("igpo", gamma=gamma)
  check_nonnegative("igpo", eps=eps)
  check_rank(rewards, 1, "rewards")
  check_float(rewards, "rewards")
  check_rank(answer_probs, 2, "answer_probs")
  check_float(answer_probs, "answer_probs")
  r = igpo_turn_rewards(rewards, answer_probs, step_mask)
  rg = grouped(r, group_size, "turn rewards")  # [B, G, K]
  mg = grouped(step_mask, group_size, "turn masks")
  normed = base.masked_normalise(rg, mg, (1, 2), eps=eps).reshape(r.shape)
  return jnp.where(step_mask.astype(bool), discounted_returns(normed, step_mask, gamma=gamma),
                   0.0)
