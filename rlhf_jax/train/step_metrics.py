"""The online step's metrics: the sampled batch's (`step_metrics`) and the phase
variants' (`variant_metrics`: multi-turn, dynamic sampling, ReMax, PF-PPO, Reinforce-Ada,
Knapsack RL)."""

from __future__ import annotations

from typing import Dict

import jax
import jax.numpy as jnp

from rlhf_jax.train.phases import Rollout, Scores, Signals


def _masked_mean_length(lengths, select):
  select = select.astype(lengths.dtype)
  return jnp.sum(lengths * select) / jnp.maximum(jnp.sum(select), 1.0)


def _zero_variance_groups(rewards, group_size: int, group_ids=None):
  """The fraction of prompts whose samples all got the same reward (`group_ids`: ragged
  groups, each sample's prompt in [0, N // G))."""
  if group_ids is None:
    grouped = rewards.reshape(-1, group_size)
    return jnp.mean(jnp.all(grouped == grouped[:, :1], axis=1))
  b = rewards.shape[0] // group_size
  hi = jax.ops.segment_max(rewards, group_ids, num_segments=b)
  lo = jax.ops.segment_min(rewards, group_ids, num_segments=b)
  return jnp.mean(hi == lo)


def step_metrics(ro: Rollout, sc: Scores, sig: Signals, aux, group_size: int, group_ids=None):
  """Per-step metrics of the sampled batch (means of the learn phase's aux included)."""
  lengths = jnp.sum(ro.loss_mask, axis=1)
  rewards = sc.rewards
  metrics = {k: jnp.mean(v) for k, v in aux.items()}
  metrics.update({
      "reward_mean": jnp.mean(rewards), "reward_std": jnp.std(rewards),
      "response_length": jnp.mean(lengths), "seq_kl": jnp.mean(jnp.sum(sig.kl, axis=1)),
      "zero_variance_groups": _zero_variance_groups(rewards, group_size, group_ids),
      "finished_fraction": jnp.mean(ro.finished.astype(jnp.float32)),
      "num_tokens": jnp.sum(lengths),
      # Mean length of wrong (reward <= 0.5) and correct samples; 0 when there are none.
      "wrong_response_length": _masked_mean_length(lengths, rewards <= 0.5),
      "correct_response_length": _masked_mean_length(lengths, rewards > 0.5),
  })
  for i in range(sc.each.shape[1]):
    metrics[f"reward_{i}_mean"] = jnp.mean(sc.each[:, i])
    metrics[f"reward_{i}_std"] = jnp.std(sc.each[:, i])
  return metrics


def variant_metrics(info, extra) -> Dict[str, jax.Array]:
  """Metrics of the phase variants: multi-turn turns, dynamic sampling, ReMax, PF-PPO,
  Reinforce-Ada."""
  out = {}
  if info is not None:
    out.update(num_turns=jnp.mean(info.num_turns.astype(jnp.float32)),
               env_reward_mean=jnp.mean(info.reward),
               env_done_fraction=jnp.mean(info.done.astype(jnp.float32)))
  if "selected" in extra:
    out["selected_informative_groups"] = jnp.mean(extra["selected"].astype(jnp.float32))
  if "greedy" in extra:
    out["greedy_reward_mean"] = jnp.mean(extra["greedy"])
  if "kept" in extra:
    out["kept_fraction"] = jnp.mean(extra["kept"].astype(jnp.float32))
  if "knapsack" in extra:
    out.update(knapsack_max_samples=jnp.max(extra["knapsack"].counts).astype(jnp.float32),
               knapsack_min_samples=jnp.min(extra["knapsack"].counts).astype(jnp.float32))
  if "adaptive" in extra:
    out.update(adaptive_rounds_used=jnp.mean(extra["adaptive"].rounds_used.astype(jnp.float32)),
               adaptive_pool_reward_mean=jnp.mean(extra["adaptive"].prompt_means))
  return out
