"""One Flax linen decoder for Llama, Qwen2, Gemma and GPT-2 (selected by config flags).

Layers are stacked with `nn.scan` (leading layer axis on every per-layer
parameter) and optionally rematerialised with a `jax.checkpoint` policy (`remat`).
Attention goes through `rlhf_jax.models.attention.attention` with the backend named by
`DecoderConfig.attention`; the mask is passed compactly (key padding + causal offset)
so no backend needs a [T, S] array it does not build itself. The same layer code
serves full-sequence forward passes and KV-cache decoding.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.models import attention as attention_lib
from rlhf_jax.models.config import DecoderConfig, default_init_std

REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")


def normalize_remat(remat) -> str:
  """bool or policy name -> one of `REMAT_POLICIES` (True is "full", False "none")."""
  if remat is None or remat is False:
    return "none"
  if remat is True:
    return "full"
  if remat not in REMAT_POLICIES:
    raise ValueError(f"remat={remat!r} is unknown; use one of {', '.join(REMAT_POLICIES)} "
                     "(or a bool).")
  return remat


def checkpoint_late(fn, tie: int = 1):
  """`jax.checkpoint(fn)` (save nothing) whose backward recomputes `fn` only once the
  output's cotangent exists.

  Outside `lax.scan`, XLA's CPU backend merges the backward's recomputation with the
  forward pass (common-subexpression elimination: optimisation barriers are expanded
  before it), so every layer's activations stay alive as if nothing were rematerialised.
  Here the backward recomputes from `args[tie]` (the hidden state) + 0 · (a finite element
  of the cotangent): the same values, but a new expression that depends on the cotangent,
  so layer i is recomputed only when the backward pass reaches it. Arguments and outputs
  are pytrees of arrays (or None).
  """
  @jax.custom_vjp
  def run(*args):
    return fn(*args)

  def fwd(*args):
    return fn(*args), args

  def bwd(args, cotangent):
    leaf = jax.tree.leaves(cotangent)[0]
    zero = 0.0 * jnp.nan_to_num(leaf.reshape(-1)[0], posinf=0.0, neginf=0.0)
    x = args[tie]
    args = args[:tie] + ((x + zero.astype(x.dtype)),) + args[tie + 1:]
    _, vjp = jax.vjp(fn, *args)
    return vjp(cotangent)

  run.defvjp(fwd, bwd)
  return run


def remat_policy(remat: str):
  """The `jax.checkpoint` policy of a `REMAT_POLICIES` name ("full": save nothing)."""
  remat = normalize_remat(remat)
  if remat in ("none", "full"):
    return None
  return getattr(jax.checkpoint_policies, remat)


class KVCache(NamedTuple):
  """Key/value cache: k, v of shape [L, B, Hkv, S, Dh] (or tuples of L [B, Hkv, S, Dh])."""
  k: jax.Array
  v: jax.Array


# ----------------------------------------------------------------------------- RoPE


def rope_inv_freq(cfg: DecoderConfig) -> np.ndarray:
  """Inverse frequencies (float32, [Dh/2]) incl. linear and llama3 scaling."""
  dim = cfg.head_dim
  inv = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
  inv = inv.astype(np.float32)
  sc = cfg.rope_scaling_dict
  kind = sc.get("rope_type", "default")
  if kind == "linear":
    inv = inv / np.float32(sc["factor"])
  elif kind == "llama3":
    factor = sc["factor"]
    low, high = sc["low_freq_factor"], sc["high_freq_factor"]
    old_len = sc["original_max_position_embeddings"]
    low_wavelen = old_len / low
    high_wavelen = old_len / high
    wavelen = 2 * math.pi / inv
    inv_l = np.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * inv_l / factor + smooth * inv_l
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    inv = np.where(medium, smoothed, inv_l).astype(np.float32)
  return inv


def rope_cos_sin(cfg: DecoderConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
  """cos/sin tables [B, T, Dh] (float32) for integer positions [B, T]."""
  inv = jnp.asarray(rope_inv_freq(cfg))
  freqs = positions.astype(jnp.float32)[..., None] * inv
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotate-half RoPE on x [B, T, H, Dh]."""
  half = x.shape[-1] // 2
  rot = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  cos = cos[:, :, None, :].astype(x.dtype)
  sin = sin[:, :, None, :].astype(x.dtype)
  return x * cos + rot * sin


# ----------------------------------------------------------------------------- layers


def cached_attention(q, k, v, mask):
  """Softmax attention of q [B, T, H, Dh] over a cache k, v [B, Hkv, S, Dh].

  Grouped-query: query head h reads kv head h // (H / Hkv). mask: bool [B, 1, T, S].
  Scores and softmax in float32. Returns [B, T, H, Dh].
  """
  return attention_lib.attention(q, k, v, mask=mask, kv_layout="bhsd", backend="xla")


def _layer_attention(cfg: DecoderConfig, q, k, v, mask, write_index, cached: bool):
  """Attention of one layer. `mask` is either a dense bool [B, 1, T, S] mask or the
  key-padding mask [B, S] of causal attention whose query 0 sits at slot `write_index`."""
  backend = cfg.attention
  if cached and backend in ("cudnn", "splash"):
    backend = "auto"  # those kernels do not read the [B, Hkv, S, Dh] cache layout
  kw = dict(backend=backend, chunk_size=cfg.attention_chunk,
            kv_layout="bhsd" if cached else "bshd")
  if mask.ndim == 4:
    return attention_lib.attention(q, k, v, mask=mask, **kw)
  return attention_lib.attention(q, k, v, kv_mask=mask, causal=True,
                                 q_offset=write_index if cached else None, **kw)


def _param(mod: nn.Module, name: str, shape, std: float | None, param_dtype):
  init = nn.initializers.zeros if std is None else nn.initializers.normal(std)
  return mod.param(name, init, shape, param_dtype)


def _lora(mod: nn.Module, kernel: str, inp, dt):
  """inp @ A @ B of the adapter attached to `kernel` (`lora.attach`: params
  "<kernel>_lora_a" [in, r] and "<kernel>_lora_b" [r, out], the scale folded into B), or 0
  when none is attached."""
  if not mod.has_variable("params", kernel + "_lora_a"):
    return 0.0
  a = mod.get_variable("params", kernel + "_lora_a").astype(dt)
  b = mod.get_variable("params", kernel + "_lora_b").astype(dt)
  return (inp @ a) @ b


class Norm(nn.Module):
  cfg: DecoderConfig
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    d = x.shape[-1]
    xf = x.astype(jnp.float32)
    if cfg.norm_kind == "layer":
      scale = self.param("scale", nn.initializers.ones, (d,), self.param_dtype)
      bias = self.param("bias", nn.initializers.zeros, (d,), self.param_dtype)
      mean = xf.mean(-1, keepdims=True)
      var = jnp.square(xf - mean).mean(-1, keepdims=True)
      y = (xf - mean) * jax.lax.rsqrt(var + cfg.norm_eps)
      return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)
    y = xf * jax.lax.rsqrt(jnp.square(xf).mean(-1, keepdims=True) + cfg.norm_eps)
    if cfg.norm_kind == "rms_plus1":
      scale = self.param("scale", nn.initializers.zeros, (d,), self.param_dtype)
      return (y * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)
    scale = self.param("scale", nn.initializers.ones, (d,), self.param_dtype)
    return scale.astype(x.dtype) * y.astype(x.dtype)


class Attention(nn.Module):
  cfg: DecoderConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, cos, sin, mask, layer_cache, write_index):
    cfg = self.cfg
    d, h, kh, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    std = default_init_std(cfg)
    pd, dt = self.param_dtype, self.dtype

    def proj(name, heads, use_bias):
      w = _param(self, f"{name}_kernel", (d, heads, hd), std, pd)
      # As a 2-D matmul: its gradient dots need no transposed copy of the kernel.
      y = x @ w.reshape(d, heads * hd).astype(dt) + _lora(self, f"{name}_kernel", x, dt)
      y = y.reshape(x.shape[:2] + (heads, hd))
      if use_bias:
        y = y + _param(self, f"{name}_bias", (heads, hd), None, pd).astype(dt)
      return y

    q, k, v = proj("q", h, cfg.qkv_bias), proj("k", kh, cfg.qkv_bias), proj("v", kh, cfg.qkv_bias)
    if cfg.position_kind == "rope":
      q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    new_cache = None
    if layer_cache is None:
      out = _layer_attention(cfg, q, k, v, mask, write_index, cached=False)
    elif len(layer_cache) == 3:
      # Every layer's cache [L, B, Hkv, S, Dh] and this layer's index (scanned layers): the
      # new keys / values are written in place and this layer's slice is read.
      ck, cv, i = layer_cache
      idx = (i, 0, 0, write_index, 0)
      ck = jax.lax.dynamic_update_slice(ck, k.swapaxes(1, 2)[None].astype(ck.dtype), idx)
      cv = jax.lax.dynamic_update_slice(cv, v.swapaxes(1, 2)[None].astype(cv.dtype), idx)
      new_cache = (ck, cv)
      layer = lambda c: jax.lax.dynamic_index_in_dim(c, i, keepdims=False).astype(dt)
      out = _layer_attention(cfg, q, layer(ck), layer(cv), mask, write_index, cached=True)
    else:
      ck, cv = layer_cache  # [B, Hkv, S, Dh]: the layout the attention dots read directly
      idx = (0, 0, write_index, 0)
      ck = jax.lax.dynamic_update_slice(ck, k.swapaxes(1, 2).astype(ck.dtype), idx)
      cv = jax.lax.dynamic_update_slice(cv, v.swapaxes(1, 2).astype(cv.dtype), idx)
      new_cache = (ck, cv)
      out = _layer_attention(cfg, q, ck.astype(dt), cv.astype(dt), mask, write_index,
                             cached=True)
    wo = _param(self, "o_kernel", (h, hd, d), std, pd)
    flat = out.reshape(out.shape[:2] + (h * hd,))
    y = flat @ wo.reshape(h * hd, d).astype(dt) + _lora(self, "o_kernel", flat, dt)
    if cfg.o_bias:
      y = y + _param(self, "o_bias", (d,), None, pd).astype(dt)
    return y, new_cache


class Mlp(nn.Module):
  cfg: DecoderConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    d, f = cfg.hidden_size, cfg.intermediate_size
    std = default_init_std(cfg)
    pd, dt = self.param_dtype, self.dtype

    def dense(name, din, dout, inp):
      y = (inp @ _param(self, f"{name}_kernel", (din, dout), std, pd).astype(dt)
           + _lora(self, f"{name}_kernel", inp, dt))
      if cfg.mlp_bias:
        y = y + _param(self, f"{name}_bias", (dout,), None, pd).astype(dt)
      return y

    up = dense("up", d, f, x)
    if cfg.mlp_kind == "gelu":
      act = jax.nn.gelu(up, approximate=True)
    else:
      gate = dense("gate", d, f, x)
      if cfg.mlp_kind == "swiglu":
        act = jax.nn.silu(gate) * up
      else:
        act = jax.nn.gelu(gate, approximate=True) * up
    return dense("down", f, d, act)


class Block(nn.Module):
  """Pre-norm transformer layer; scanned over layers.

  Called as (h, layer_cache, ctx) -> (h, new layer cache): the carry is the hidden states
  and the layer's (k, v) cache is scanned in and out. In place (`Model.decode(...,
  in_place=True)`) the carry is (h, k, v) holding every layer's cache [L, B, Hkv, S, Dh]
  and the scanned input is the layer index: each layer writes its new keys / values in
  place, so a decode step holds one cache, not the cache scanned in and the one scanned out.
  """
  cfg: DecoderConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h, layer_cache, ctx):
    carried = isinstance(h, tuple)
    if carried:  # (h, every layer's k, v) and this layer's index
      h, layer_cache = h[0], (h[1], h[2], layer_cache)
    kw = dict(cfg=self.cfg, param_dtype=self.param_dtype)
    a, new_cache = Attention(**kw, dtype=self.dtype, name="attn")(
        Norm(**kw, name="attn_norm")(h), ctx["cos"], ctx["sin"], ctx["mask"],
        layer_cache, ctx["write_index"])
    h = h + a
    h = h + Mlp(**kw, dtype=self.dtype, name="mlp")(Norm(**kw, name="mlp_norm")(h))
    if carried:
      return (h, *new_cache), None
    return h, new_cache


def last_index(attention_mask: jax.Array) -> jax.Array:
  """[B, T] mask -> [B] int: the position of each row's last non-pad token (0 if none)."""
  t = attention_mask.shape[1]
  return jnp.argmax(jnp.arange(t) * attention_mask.astype(jnp.int32), axis=-1)


class Decoder(nn.Module):
  """Embeddings -> scanned layers -> final norm; plus LM and scalar heads.

  head: "lm" (logits), "value" (per-token scalar) or "reward" (scalar at last token).
  remat: a `REMAT_POLICIES` name (or a bool), applied to each layer.
  """
  cfg: DecoderConfig
  head: str = "lm"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: Any = "none"

  def setup(self):
    cfg = self.cfg
    std = default_init_std(cfg)
    self.embed = self.param("embed", nn.initializers.normal(std),
                            (cfg.vocab_size, cfg.hidden_size), self.param_dtype)
    if cfg.position_kind == "learned":
      self.pos_embed = self.param("pos_embed", nn.initializers.normal(std),
                                  (cfg.max_position_embeddings, cfg.hidden_size),
                                  self.param_dtype)
    block = Block
    if normalize_remat(self.remat) != "none":
      block = nn.remat(Block, prevent_cse=False, policy=remat_policy(self.remat))
    self.layers = nn.scan(
        block, variable_axes={"params": 0}, split_rngs={"params": True},
        in_axes=(0, nn.broadcast), length=cfg.num_layers)(
            cfg=cfg, dtype=self.dtype, param_dtype=self.param_dtype)
    self.final_norm = Norm(cfg=cfg, param_dtype=self.param_dtype)
    if self.head == "lm":
      if not cfg.tie_embeddings:
        self.lm_head = self.param("lm_head", nn.initializers.normal(std),
                                  (cfg.hidden_size, cfg.vocab_size), self.param_dtype)
    else:
      self.score = self.param("score", nn.initializers.normal(1.0 / math.sqrt(cfg.hidden_size + 1)),
                              (cfg.hidden_size, 1), self.param_dtype)

  def _run(self, input_ids, positions, mask, cache, write_index, in_place=False):
    """mask: bool [B, S] key mask of causal attention (query i at slot write_index + i),
    or an explicit bool [B, 1, T, S] mask (then nothing else is applied). `in_place`: a
    stacked cache rides in the scan's carry (`Block`); see `Model.decode`."""
    cfg = self.cfg
    x = jnp.take(self.embed, input_ids, axis=0).astype(self.dtype)
    if cfg.embed_scale:
      x = x * jnp.asarray(math.sqrt(cfg.hidden_size), self.dtype)
    cos = sin = None
    if cfg.position_kind == "learned":
      x = x + jnp.take(self.pos_embed, positions, axis=0).astype(self.dtype)
    else:
      cos, sin = rope_cos_sin(cfg, positions)
    ctx = dict(cos=cos, sin=sin, mask=mask, write_index=write_index)
    layers = None if self.is_initializing() else self.variables["params"].get("layers")
    if isinstance(layers, (tuple, list)):
      h, new = self._run_unrolled(x, layers, cache, ctx)
    elif cache is not None and in_place:  # the stacked cache rides in the carry (`Block`)
      layer_ids = jnp.arange(cfg.num_layers, dtype=jnp.int32)
      (h, ck, cv), _ = self.layers((x, cache.k, cache.v), layer_ids, ctx)
      new = KVCache(ck, cv)
    else:
      layer_cache = None if cache is None else (cache.k, cache.v)
      h, new = self.layers(x, layer_cache, ctx)
      new = None if new is None else KVCache(*new)
    h = self.final_norm(h)
    return h, new

  def _run_unrolled(self, x, layers, cache, ctx):
    """Runs per-layer parameters (a tuple, see `unstack_layers`) as a Python loop."""
    block = Block(cfg=self.cfg, dtype=self.dtype, param_dtype=self.param_dtype, parent=None)
    apply = block.apply
    remat = normalize_remat(self.remat)
    if remat == "full":  # per-layer weights: recompute each layer when the backward reaches it
      apply = checkpoint_late(block.apply)
    elif remat != "none":
      apply = jax.checkpoint(block.apply, policy=remat_policy(remat))
    ks, vs = [], []
    for i, p in enumerate(layers):
      layer_cache = None if cache is None else (cache.k[i], cache.v[i])
      x, new = apply({"params": p}, x, layer_cache, ctx)
      if new is not None:
        ks.append(new[0])
        vs.append(new[1])
    if cache is None:
      return x, None
    if isinstance(cache.k, (tuple, list)):
      return x, KVCache(tuple(ks), tuple(vs))
    return x, KVCache(jnp.stack(ks), jnp.stack(vs))

  def hidden(self, input_ids, attention_mask):
    mask = attention_mask.astype(bool)
    positions = jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)
    h, _ = self._run(input_ids, positions, mask, None, 0)  # causal over the key mask
    return h

  def logits_from_hidden(self, h):
    if self.head != "lm":
      raise ValueError(f"logits_from_hidden needs head='lm', this model has head={self.head!r}.")
    if self.cfg.tie_embeddings:
      return jnp.einsum("btd,vd->btv", h, self.embed.astype(h.dtype))
    return h @ self.lm_head.astype(h.dtype)

  def scores_from_hidden(self, h):
    return (h @ self.score.astype(h.dtype))[..., 0]

  def head_output(self, h, attention_mask):
    if self.head == "lm":
      return self.logits_from_hidden(h)
    values = self.scores_from_hidden(h)
    if self.head == "value":
      return values
    return jnp.take_along_axis(values, last_index(attention_mask)[:, None], axis=1)[:, 0]

  def __call__(self, input_ids, attention_mask):
    return self.head_output(self.hidden(input_ids, attention_mask), attention_mask)

  def decode_hidden(self, input_ids, positions, cache, write_index, kv_mask, in_place=False):
    # Query i sits at slot write_index + i and sees slots s <= it with kv_mask[:, s].
    return self._run(input_ids, positions, kv_mask.astype(bool), cache, write_index,
                     in_place)

  def decode(self, input_ids, positions, cache, write_index, kv_mask, in_place=False):
    h, cache = self.decode_hidden(input_ids, positions, cache, write_index, kv_mask, in_place)
    if self.head == "lm":
      return self.logits_from_hidden(h), cache
    return self.scores_from_hidden(h), cache

  def decode_in_place(self, *args):
    return self.decode(*args, in_place=True)

  def decode_hidden_in_place(self, *args):
    return self.decode_hidden(*args, in_place=True)
