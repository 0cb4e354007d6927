"""KV-cache sampling: prefill, then decode in `lax.while_loop`, fully inside `jit`.

The sampler only uses the model's `init_cache` and `decode` (see `rlhf_jax.models`), and
reports for every sampled token both its log-prob under the policy at temperature 1 with
no truncation (`logps`, what the trainer recomputes) and under the distribution actually
sampled from (`sampling_logps`).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from rlhf_jax import models as models_lib
from rlhf_jax.models.logps import limit_vocab
from rlhf_jax.sampling.config import DecodeState, SampleOutput, SamplingConfig


def left_pad(ids: jax.Array, mask: jax.Array):
  """Move the real tokens of every row to the right end, keeping their order.

  Works for left-, right- or arbitrarily padded rows: a stable sort of the mask puts pad
  slots (0) first and real tokens (1) last. Returns `(ids, mask)` with shapes [B, P].
  """
  order = jnp.argsort(mask.astype(jnp.int32), axis=1, stable=True)
  return (jnp.take_along_axis(ids, order, axis=1),
          jnp.take_along_axis(mask, order, axis=1))


def row_keys(rng: jax.Array, prompt_index: jax.Array, num_samples: int) -> jax.Array:
  """One key per output row: `fold_in(rng, prompt_index * G + sample_index)`. [B*G] keys."""
  rows = (prompt_index[:, None].astype(jnp.int32) * num_samples
          + jnp.arange(num_samples, dtype=jnp.int32)[None, :]).reshape(-1)
  return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, rows)


def _check_inputs(prompt_ids, prompt_mask, prompt_index):
  if prompt_ids.ndim != 2:
    raise ValueError(f"`prompt_ids` must have shape [B, P], got {prompt_ids.shape}")
  if prompt_mask.shape != prompt_ids.shape:
    raise ValueError(f"`prompt_mask` shape {prompt_mask.shape} must equal `prompt_ids` shape "
                     f"{prompt_ids.shape}")
  if not jnp.issubdtype(prompt_ids.dtype, jnp.integer):
    raise ValueError(f"`prompt_ids` must be integer token ids, got dtype {prompt_ids.dtype}")
  if prompt_index is not None and prompt_index.shape != prompt_ids.shape[:1]:
    raise ValueError(f"`prompt_index` must have shape [B] = {prompt_ids.shape[:1]}, "
                     f"got {prompt_index.shape}")


def sample(model, params, prompt_ids: jax.Array, prompt_mask: jax.Array, rng: jax.Array,
           config: SamplingConfig, *, prompt_index: Optional[jax.Array] = None) -> SampleOutput:
  """Sample `config.num_samples` completions per prompt with a KV cache.

  Prefill writes the (left-padded) prompts into cache slots 0..P-1; each decode step writes
  one token at slot P + t and attends to real prompt slots and earlier completion slots.
  Position ids are `cumsum(mask) - 1`, so a padded prompt sees the same positions as the
  unpadded one. Row r = i * G + g (prompt i, sample g) draws its t-th token by inverse CDF
  from `uniform(fold_in(rng, prompt_index[i] * G + g), [T])[t]`, so results do not depend on
  which other prompts share the batch. The loop exits early once every row has emitted an EOS.
With `config.vocab_limit`, ids >= vocab_limit (a padded vocabulary's extra rows) are never
chosen and both log-probs are over the real vocabulary only.

  Args:
    model: a `rlhf_jax.models` decoder (uses `init_cache` and `decode`); static.
    params: the model's parameters.
    prompt_ids: int [B, P] prompts, left- or right-padded; every row needs >= 1 real token.
    prompt_mask: bool/int [B, P], 1 at real tokens.
    rng: a PRNG key.
    config: static `SamplingConfig`.
    prompt_index: optional int [B] global index of each prompt used to derive its rng
      (default `arange(B)`); pass dataset-level indices to make draws independent of batching.

  Returns:
    `SampleOutput` with N = B * G rows (groups contiguous).
  """
  _check_inputs(prompt_ids, prompt_mask, prompt_index)
  method = config.method()
  batch, plen = prompt_ids.shape
  group, tnew = config.num_samples, config.max_new_tokens
  n = batch * group
  if prompt_index is None:
    prompt_index = jnp.arange(batch, dtype=jnp.int32)
  keys = row_keys(rng, prompt_index, group)
  # All randomness up front: one uniform per row and step (inverse-CDF draws in the loop).
  uniforms = jax.vmap(lambda k: jax.random.uniform(k, (tnew,), jnp.float32))(keys)

  ids, mask = left_pad(prompt_ids.astype(jnp.int32), prompt_mask.astype(bool))

  # Per-layer weights and cache: the decode loop then reads each weight in place.
  # (The barrier materialises each layer's weights once, shared by prefill and decode.)
  params = jax.lax.optimization_barrier(models_lib.unstack_layers(params))
  # Prefill each prompt once, then give its cache and last logits to its G samples.
  h, cache = models_lib.prefill_groups(model, params, ids, mask, extra_slots=tnew,
                                       group_size=group)
  logits = model.logits_from_hidden(params, h)
  ids, mask = jnp.repeat(ids, group, axis=0), jnp.repeat(mask, group, axis=0)
  kv_mask = jnp.concatenate([mask, jnp.ones((n, tnew), bool)], axis=1)
  eos = jnp.asarray(config.eos_ids, jnp.int32) if config.eos_ids else None

  def choose(state: DecodeState) -> DecodeState:
    """Pick token `state.step` from `state.logits` and record it."""
    t = state.step
    logits32 = limit_vocab(state.logits.astype(jnp.float32), config.vocab_limit)
    u = jax.lax.dynamic_index_in_dim(uniforms, t, axis=1, keepdims=False)
    tok, slogp = method.select(logits32, u)
    if getattr(method, "is_plain", False):
      logp = slogp
    else:
      logp = jnp.take_along_axis(jax.nn.log_softmax(logits32, axis=-1), tok[:, None],
                                 axis=-1)[:, 0]
    live = ~state.done
    tok = jnp.where(live, tok, config.pad_id)
    done = state.done
    if eos is not None:
      done = done | (live & jnp.any(tok[:, None] == eos[None, :], axis=-1))
    col = lambda a, v: jax.lax.dynamic_update_slice(a, v[:, None].astype(a.dtype), (0, t))
    return state.replace(
        tokens=col(state.tokens, tok), mask=col(state.mask, live),
        logps=col(state.logps, jnp.where(live, logp, 0.0)),
        sampling_logps=col(state.sampling_logps, jnp.where(live, slogp, 0.0)),
        done=done, step=t + 1)

  def cond(state: DecodeState):
    return (state.step < tnew) & ~jnp.all(state.done)

  def body(state: DecodeState) -> DecodeState:
    prev = jax.lax.dynamic_slice_in_dim(state.tokens, state.step - 1, 1, axis=1)
    logits, cache = model.decode(params, prev, state.positions[:, None], state.cache,
                                 write_index=plen + state.step - 1, kv_mask=kv_mask)
    # The barrier keeps the LM-head matmul a library dot instead of a loop fused into the
    # softmax reductions that follow (several times slower on CPU).
    logits = jax.lax.optimization_barrier(logits[:, -1])
    state = state.replace(logits=logits, cache=cache, positions=state.positions + 1)
    return choose(state)

  state = DecodeState(
      step=jnp.zeros((), jnp.int32), logits=logits[:, -1], cache=cache,
      positions=jnp.sum(mask, axis=1, dtype=jnp.int32),
      tokens=jnp.full((n, tnew), config.pad_id, jnp.int32), mask=jnp.zeros((n, tnew), bool),
      logps=jnp.zeros((n, tnew), jnp.float32), sampling_logps=jnp.zeros((n, tnew), jnp.float32),
      done=jnp.zeros((n,), bool))
  state = jax.lax.while_loop(cond, body, choose(state))
  return SampleOutput(
      prompt_ids=ids, prompt_mask=mask, completion_ids=state.tokens, completion_mask=state.mask,
      logps=state.logps, sampling_logps=state.sampling_logps,
      lengths=jnp.sum(state.mask, axis=1, dtype=jnp.int32), finished=state.done)
