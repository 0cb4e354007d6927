"""Compiled memory of a fused sample-then-score program (XLA's memory analysis, CPU)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import rlhf_jax.models as M
from rlhf_jax.sampling import SamplingConfig, sample

HF = dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48,
          num_hidden_layers=12, num_attention_heads=4, num_key_value_heads=4,
          max_position_embeddings=256)
B, G, P, T = 2, 8, 32, 96


def _temp(fn, *args) -> int:
  return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_reference_prompt_pass_waits_for_the_decode_loop():
  """`completion_logps` of sampled rows (the reference pass of the online step) runs its
  prompt prefill only after the sampler's decode loop: the program holds one full-length
  KV cache at a time, not the sampler's and the reference's together."""
  model = M.from_config(HF)
  params = jax.eval_shape(M.unstack_layers, jax.eval_shape(model.init, jax.random.key(0)))
  sc = SamplingConfig(max_new_tokens=T, num_samples=G)
  ids = jax.ShapeDtypeStruct((B, P), jnp.int32)
  mask = jax.ShapeDtypeStruct((B, P), jnp.bool_)
  rng = jax.eval_shape(lambda: jax.random.key(0))

  def sampled(p, i, m, r):
    return sample(model, p, i, m, r, sc).completion_ids

  def sampled_and_scored(p, i, m, r):
    out = sample(model, p, i, m, r, sc)
    return M.completion_logps(model, p, i, m, out.completion_ids, out.completion_mask,
                              group_size=G)[0]

  def scored(p, i, m, c, cm):
    return M.completion_logps(model, p, i, m, c, cm, group_size=G)[0]

  cfg = model.config
  cache = 2 * cfg.num_layers * B * G * cfg.num_kv_heads * (P + T) * cfg.head_dim * 4
  alone = _temp(sampled, params, ids, mask, rng)
  comp = jax.ShapeDtypeStruct((B * G, T), jnp.int32)
  scoring = _temp(scored, params, ids, mask, comp, jax.ShapeDtypeStruct(comp.shape, jnp.bool_))
  fused = _temp(sampled_and_scored, params, ids, mask, rng)
  assert alone > cache and scoring > cache  # each pass holds one cache
  assert fused < max(alone, scoring) + cache // 2, (fused, alone, scoring, cache)


def test_scanned_decode_updates_the_stacked_cache_in_place():
  """With stacked layers the sampler's decode step writes each layer's keys / values into
  the carried cache (`Model.decode(..., in_place=True)`): sampling holds one full-length
  cache, as with per-layer weights, and the in-place decode equals the scanned-in /
  scanned-out one."""
  model = M.from_config(HF)
  stacked = jax.eval_shape(model.init, jax.random.key(0))
  ids = jax.ShapeDtypeStruct((B, P), jnp.int32)
  mask = jax.ShapeDtypeStruct((B, P), jnp.bool_)
  rng = jax.eval_shape(lambda: jax.random.key(0))
  cfg = model.config
  cache = 2 * cfg.num_layers * B * G * cfg.num_kv_heads * (P + T) * cfg.head_dim * 4

  def temp(scan):
    sc = SamplingConfig(max_new_tokens=T, num_samples=G, scan_layers=scan)
    return _temp(lambda p, i, m, r: sample(model, p, i, m, r, sc).completion_ids,
                 stacked, ids, mask, rng)
  scanned, unrolled = temp(True), temp(False)
  assert cache < scanned < 1.5 * cache, (scanned, cache)
  assert scanned < unrolled + cache // 4, (scanned, unrolled)

  params = model.init(jax.random.key(1))
  c0 = model.init_cache(3, 12)
  tok = jax.random.randint(jax.random.key(2), (3, 5), 0, cfg.vocab_size)
  pos = jnp.broadcast_to(jnp.arange(5, dtype=jnp.int32), (3, 5))
  kv = jnp.ones((3, 12), bool)
  outs = [model.decode(params, tok, pos, c0, write_index=2, kv_mask=kv, in_place=flag)
          for flag in (False, True)]
  for a, b in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)
  assert float(jnp.abs(outs[1][1].k[:, :, :, 2:7]).max()) > 0  # the new slots are written
