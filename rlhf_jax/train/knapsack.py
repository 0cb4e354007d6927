"""Knapsack RL's sample allocation as a phase of the online step (`rl.knapsack`).

Each prompt i of a batch of B gets N_i of the step's B·G samples, N_i maximising
Σ value(N_i, p_i) (`advantages.allocation.knapsack_allocate`), p_i its success rate when it
was last trained on (kept per dataset record in `state.alloc_state`; a record not seen yet
counts as p = 0.5). The shapes stay fixed: the sampler draws exactly B·G rows, row r from
prompt `rows[r]` (the prompts' rows consecutive), so groups are ragged and the estimator
reads them by `group_ids` (`rl.advantage="grpo_ragged"`).

    alloc = allocate(state.alloc_state, batch["record_index"], ...)   # -> Allocation
    ro = rollout(gather(batch, alloc.rows), num_samples=1)            # B·G rows
    ...
    alloc_state = update(alloc_state, batch["record_index"], rewards, alloc.rows, ...)

Knapsack RL: Unlocking Exploration of LLMs via Optimizing Budget Allocation (Li et al., 2025).
"""

from __future__ import annotations

from typing import Mapping, NamedTuple

import flax
import jax
import jax.numpy as jnp

from rlhf_jax.advantages import allocation as allocation_lib

UNSEEN_RATE = 0.5


@flax.struct.dataclass
class AllocState:
  """rates [R] float32: each record's success rate when last trained on; seen [R] bool."""
  rates: jax.Array
  seen: jax.Array


def init(num_records: int) -> AllocState:
  return AllocState(rates=jnp.full((num_records,), UNSEEN_RATE, jnp.float32),
                    seen=jnp.zeros((num_records,), bool))


class Allocation(NamedTuple):
  """counts [B] int32 (Σ = B·G), rows [B·G] int32: the prompt of each sample, ascending."""
  counts: jax.Array
  rows: jax.Array


def _record_index(prompt_batch: Mapping[str, jax.Array]) -> jax.Array:
  if "record_index" not in prompt_batch:
    raise ValueError("rl.knapsack keeps each prompt's success rate by its dataset record: the "
                     "prompt batch needs 'record_index' [B] (the loop's tasks provide it)")
  return prompt_batch["record_index"]


def allocate(state: AllocState, prompt_batch: Mapping[str, jax.Array], *, group_size: int,
             min_samples: int = 2, max_samples: int = 0) -> Allocation:
  """Each prompt's sample count from its records' last success rates (`max_samples` 0:
  no cap beyond the budget)."""
  idx = _record_index(prompt_batch)
  b = idx.shape[0]
  if state.rates.shape[0] == 0:
    raise ValueError("rl.knapsack: the success-rate table is empty (init(num_records))")
  p = jnp.where(state.seen[idx], state.rates[idx], UNSEEN_RATE)
  counts = allocation_lib.knapsack_allocate(jax.lax.stop_gradient(p), budget=b * group_size,
                                            min_samples=min_samples,
                                            max_samples=max_samples or None)
  rows = jnp.repeat(jnp.arange(b, dtype=jnp.int32), counts, total_repeat_length=b * group_size)
  return Allocation(counts=counts, rows=rows)


def gather(prompt_batch: Mapping[str, jax.Array], rows: jax.Array) -> dict:
  """Every prompt-level array taken at `rows` (the samples' prompts)."""
  return {k: jnp.take(v, rows, axis=0) for k, v in prompt_batch.items()}


def success_rates(rewards: jax.Array, rows: jax.Array, num_prompts: int, *,
                  threshold: float = 0.5) -> jax.Array:
  """[B] the fraction of each prompt's samples with reward > threshold."""
  hit = (rewards > threshold).astype(jnp.float32)
  n = jax.ops.segment_sum(jnp.ones_like(hit), rows, num_segments=num_prompts)
  return jax.ops.segment_sum(hit, rows, num_segments=num_prompts) / jnp.maximum(n, 1.0)


def update(state: AllocState, prompt_batch: Mapping[str, jax.Array], rewards: jax.Array,
           rows: jax.Array, *, threshold: float = 0.5) -> AllocState:
  """Records the batch's success rates for its records (the allocation of their next visit)."""
  idx = _record_index(prompt_batch)
  rates = success_rates(jax.lax.stop_gradient(rewards), rows, idx.shape[0], threshold=threshold)
  return AllocState(rates=state.rates.at[idx].set(rates), seen=state.seen.at[idx].set(True))
