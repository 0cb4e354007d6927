"""KV-cache sampling: prefill, then decode in `lax.while_loop`, fully inside `jit`.

The sampler only uses the model's `init_cache` and `decode` (see `rlhf_jax.models`), and
reports for every sampled token both its log-prob under the policy at temperature 1 with
no truncation (`logps`, what the trainer recomputes) and under the distribution actually
sampled from (`sampling_logps`).

With `mixture=(ref_params, beta)` it samples Nash-MD's opponent: token by token from the
geometric mixture π_mix(y_t|·) ∝ π(y_t|·)^(1−β) π_ref(y_t|·)^β, running the policy's and
the reference's KV caches side by side in the same decode loop.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp

from rlhf_jax import models as models_lib
from rlhf_jax.losses.preference_online import nash_md_mixture_logits
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


def decode_params(params, scan_layers: bool):
  """The layer layout a decode loop reads: per-layer weights (each read in place by the
  unrolled decode step), or with `scan_layers` the stacked layers the decode step scans over.
  The barrier materialises the layout once, shared by the prefill and every decode step."""
  layout = models_lib.stack_layers if scan_layers else models_lib.unstack_layers
  return jax.lax.optimization_barrier(layout(params))


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


def _check_mixture(mixture):
  if not isinstance(mixture, (tuple, list)) or len(mixture) != 2:
    raise ValueError("`mixture` must be a pair (ref_params, beta) (the reference model's "
                     f"parameters and the mixture weight β in [0, 1]), got {type(mixture)}")
  beta = mixture[1]
  if jnp.ndim(beta) != 0:
    raise ValueError(f"mixture beta must be a scalar in [0, 1], got shape {jnp.shape(beta)}")
  if not isinstance(beta, jax.core.Tracer) and not 0.0 <= float(beta) <= 1.0:
    raise ValueError(f"mixture beta must be in [0, 1] (0: the policy, 1: the reference), "
                     f"got {float(beta)}")


_ROW_FIELDS = ("logits", "cache", "positions", "tokens", "mask", "logps", "sampling_logps",
               "done", "ref_logits", "ref_cache", "uniforms", "kv_mask")
_OUTPUT_FIELDS = ("tokens", "mask", "logps", "sampling_logps", "done")


def _decode_stages(state: DecodeState, cond, body, stages: int) -> DecodeState:
  """Runs the decode loop, halving the batch up to `stages` times (`compact_stages`).

  Stage k decodes while more than half of its rows are live; then the live rows (and enough
  finished ones to fill half the batch) are gathered, decoded by the next stage, and their
  output columns scattered back. Every per-row field leads with the row axis (the
  per-layer cache is [N, Hkv, S, Dh] per layer), except a stacked cache ([L, N, ...]).
  """
  rows = state.done.shape[0]
  half = -(-rows // 2)
  if stages == 0 or rows == 1:
    return jax.lax.while_loop(cond, body, state)
  state = jax.lax.while_loop(
      lambda st: cond(st) & (jnp.sum(~st.done) > half), body, state)
  keep = jnp.argsort(state.done, stable=True)[:half]  # live rows first

  def take(field, x):
    if x is None:
      return None
    # A stacked cache ([L, N, ...], `scan_layers`) has its rows on axis 1.
    axis = 1 if field.endswith("cache") and not isinstance(x.k, (tuple, list)) else 0
    return jax.tree.map(lambda a: jnp.take(a, keep, axis=axis), x)

  sub = state.replace(**{f: take(f, getattr(state, f)) for f in _ROW_FIELDS})
  sub = _decode_stages(sub, cond, body, stages - 1)
  out = {f: getattr(state, f).at[keep].set(getattr(sub, f)) for f in _OUTPUT_FIELDS}
  return state.replace(step=sub.step, **out)


def sample(model, params, prompt_ids: jax.Array, prompt_mask: jax.Array, rng: jax.Array,
           config: SamplingConfig, *, prompt_index: Optional[jax.Array] = None,
           mixture: Optional[Tuple[Any, Any]] = None) -> SampleOutput:
  """Sample `config.num_samples` completions per prompt with a KV cache.

  Prefill writes the (left-padded) prompts into cache slots 0..P-1; each decode step writes
  one token at slot P + t and attends to real prompt slots and earlier completion slots.
  Position ids are `cumsum(mask) - 1`, so a padded prompt sees the same positions as the
  unpadded one. Row r = i * G + g (prompt i, sample g) draws its t-th token by inverse CDF
  from `uniform(fold_in(rng, prompt_index[i] * G + g), [T])[t]`, so results do not depend on
  which other prompts share the batch. The loop exits early once every row has emitted an EOS.
  With `config.vocab_limit`, ids >= vocab_limit (a padded vocabulary's extra rows) are never
  chosen and both log-probs are over the real vocabulary only.

  Nash-MD mixture (`mixture=(ref_params, beta)`, `ref_params` for the same `model`
  architecture): each token is drawn from the normalised geometric mixture

    log π_mix(·|prefix) = log_softmax((1−β) log π(·|prefix) + β log π_ref(·|prefix))

  (`rlhf_jax.losses.preference_online.nash_md_mixture_logits`), after which the config's
  temperature / top-k / top-p apply to the mixture logits. β = 0 is the policy (the plain
  sampler's draws for the same rng), β = 1 the reference. The prompt is prefilled into a
  second KV cache for the reference and both caches advance in the same `while_loop`.
  `logps` stay the POLICY's log π(token) (temperature 1, no truncation); `sampling_logps`
  are the mixture's (warped) log π_mix(token), the distribution actually sampled from.
  β may be traced (e.g. a schedule).

  Args:
    model: a `rlhf_jax.models` decoder (uses `init_cache` and `decode`); static.
    params: the model's parameters.
    prompt_ids: int [B, P] prompts, left- or right-padded; every row needs >= 1 real token.
    prompt_mask: bool/int [B, P], 1 at real tokens.
    rng: a PRNG key.
    config: static `SamplingConfig`.
    prompt_index: optional int [B] global index of each prompt used to derive its rng
      (default `arange(B)`); pass dataset-level indices to make draws independent of batching.
    mixture: optional `(ref_params, beta)`: sample from the Nash-MD geometric mixture of
      the policy and the reference (see above); None samples the policy.

  Returns:
    `SampleOutput` with N = B * G rows (groups contiguous).
  """
  _check_inputs(prompt_ids, prompt_mask, prompt_index)
  if mixture is not None:
    _check_mixture(mixture)
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

  params = decode_params(params, config.scan_layers)
  # Prefill each prompt once, then give its cache and last logits to its G samples.
  h, cache = models_lib.prefill_groups(model, params, ids, mask, extra_slots=tnew,
                                       group_size=group, in_place=True)
  logits = model.logits_from_hidden(params, h)
  ref_logits = ref_cache = ref_params = beta = None
  if mixture is not None:
    ref_params, beta = mixture
    ref_params = decode_params(ref_params, config.scan_layers)
    h_ref, ref_cache = models_lib.prefill_groups(model, ref_params, ids, mask,
                                                 extra_slots=tnew, group_size=group,
                                                 in_place=True)
    ref_logits = model.logits_from_hidden(ref_params, h_ref)[:, -1]
  ids, mask = jnp.repeat(ids, group, axis=0), jnp.repeat(mask, group, axis=0)
  kv_mask = jnp.concatenate([mask, jnp.ones((n, tnew), bool)], axis=1)
  eos = jnp.asarray(config.eos_ids, jnp.int32) if config.eos_ids else None

  def choose(state: DecodeState) -> DecodeState:
    """Pick token `state.step` from `state.logits` and record it."""
    t = state.step
    logits32 = limit_vocab(state.logits.astype(jnp.float32), config.vocab_limit)
    u = jax.lax.dynamic_index_in_dim(state.uniforms, t, axis=1, keepdims=False)
    if mixture is not None:
      # Mix the full-vocabulary log-softmaxes (finite), then drop padded ids: the
      # normalisers only shift each model's log-probs by a per-row constant.
      mix = nash_md_mixture_logits(state.logits.astype(jnp.float32),
                                   state.ref_logits.astype(jnp.float32), beta=beta)
      tok, slogp = method.select(limit_vocab(mix, config.vocab_limit), u)
    else:
      tok, slogp = method.select(logits32, u)
    if getattr(method, "is_plain", False) and mixture is None:
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
    pos, slot = state.positions[:, None], plen + state.step - 1
    logits, cache = model.decode(params, prev, pos, state.cache, write_index=slot,
                                 kv_mask=state.kv_mask, in_place=True)
    # The barrier keeps the LM-head matmul a library dot instead of a loop fused into the
    # softmax reductions that follow (several times slower on CPU).
    logits = jax.lax.optimization_barrier(logits[:, -1])
    state = state.replace(logits=logits, cache=cache, positions=state.positions + 1)
    if mixture is not None:
      ref_logits, ref_cache = model.decode(ref_params, prev, pos, state.ref_cache,
                                           write_index=slot, kv_mask=state.kv_mask,
                                           in_place=True)
      ref_logits = jax.lax.optimization_barrier(ref_logits[:, -1])
      state = state.replace(ref_logits=ref_logits, ref_cache=ref_cache)
    return choose(state)

  state = DecodeState(
      step=jnp.zeros((), jnp.int32), logits=logits[:, -1], cache=cache,
      positions=jnp.sum(mask, axis=1, dtype=jnp.int32),
      tokens=jnp.full((n, tnew), config.pad_id, jnp.int32), mask=jnp.zeros((n, tnew), bool),
      logps=jnp.zeros((n, tnew), jnp.float32), sampling_logps=jnp.zeros((n, tnew), jnp.float32),
      done=jnp.zeros((n,), bool), ref_logits=ref_logits, ref_cache=ref_cache,
      uniforms=uniforms, kv_mask=kv_mask)
  state = _decode_stages(choose(state), cond, body, config.compact_stages)
  return SampleOutput(
      prompt_ids=ids, prompt_mask=mask, completion_ids=state.tokens, completion_mask=state.mask,
      logps=state.logps, sampling_logps=state.sampling_logps,
      lengths=jnp.sum(state.mask, axis=1, dtype=jnp.int32), finished=state.done)


def sample_mixture(model, params, ref_params, prompt_ids: jax.Array, prompt_mask: jax.Array,
                   rng: jax.Array, config: SamplingConfig, *, beta,
                   prompt_index: Optional[jax.Array] = None) -> SampleOutput:
  """Nash-MD opponent sampling: `sample(..., mixture=(ref_params, beta))`.

  Draws y′ token by token from π_mix(y_t|·) ∝ π(y_t|·)^(1−β) π_ref(y_t|·)^β (Munos et
  al., 2023, "Nash Learning from Human Feedback", §7). Returned `logps` [N, T] are the
  policy's log π(y_t|·); `sampling_logps` [N, T] the mixture's log π_mix(y_t|·) (after the
  config's temperature / truncation). β = 0 is `sample` itself, β = 1 samples π_ref.
  """
  return sample(model, params, prompt_ids, prompt_mask, rng, config,
                prompt_index=prompt_index, mixture=(ref_params, beta))
