"""`Model`: a small hashable handle (config + linen module) with a functional API.

  model = from_config(hf_config_dict, dtype=jnp.float32)
  params = model.init(rng)                     # plain nested dict, no boxes
  logits = model.apply(params, input_ids, attention_mask=mask)
  model = model.with_options(dtype="bfloat16", param_dtype="float32", remat="full",
                             attention="chunked", cache_dtype="bfloat16")
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.models.config import DecoderConfig, config_from_hf, default_init_std
from rlhf_jax.models.decoder import Decoder, KVCache, normalize_remat
from rlhf_jax.models.vocab_chunked import check_vocab_chunk

HEADS = ("lm", "value", "reward")


def _dtype_name(dtype) -> str:
  return jnp.dtype(dtype).name


def check_token_ids(input_ids, vocab_size: int, *, name: str = "input_ids") -> None:
  """Raises ValueError if concrete `input_ids` contain ids outside [0, vocab_size).

  Tracers are skipped (nothing to check at trace time).
  """
  if isinstance(input_ids, jax.core.Tracer):
    return
  ids = np.asarray(input_ids)
  if ids.size == 0:
    return
  hi, lo = int(ids.max()), int(ids.min())
  if hi >= vocab_size or lo < 0:
    bad = hi if hi >= vocab_size else lo
    raise ValueError(
        f"{name} contains token id {bad} outside the model vocabulary "
        f"[0, {vocab_size}); vocab_size={vocab_size}. Check the tokenizer matches "
        f"the model (or resize the embeddings).")


def _check_ids_mask(input_ids, attention_mask):
  if input_ids.ndim != 2:
    raise ValueError(f"input_ids must have shape [B, T], got {input_ids.shape}.")
  if attention_mask is not None and attention_mask.shape != input_ids.shape:
    raise ValueError(
        f"attention_mask shape {attention_mask.shape} must equal input_ids shape "
        f"{input_ids.shape}.")


FLOAT_DTYPES = ("float32", "bfloat16", "float16", "float64")


def _float_dtype_name(dtype, what: str) -> str:
  try:
    name = jnp.dtype(dtype).name
  except TypeError:
    name = None
  if name not in FLOAT_DTYPES:
    raise ValueError(f"{what}={dtype!r} is not a supported dtype; use one of "
                     f"{', '.join(FLOAT_DTYPES)}.")
  return name


@dataclasses.dataclass(frozen=True)
class Model:
  """Hashable model handle; all methods are pure functions of `params`.

  Precision: parameters are stored in `param_dtype` (e.g. float32 master weights) and
  cast to the compute `dtype` (e.g. bfloat16) where each is used inside the forward;
  norms, RoPE, softmax and log-softmax run in float32. The KV cache is stored in
  `cache_dtype` (None: the compute dtype). `remat` is a `REMAT_POLICIES` name (True and
  False mean "full" and "none"), applied to every layer. `vocab_chunk` (None: off): the
  log-prob functions (`token_logps`, ...) stream the LM head over chunks of that many
  vocabulary ids (`rlhf_jax.models.vocab_chunked`).
  """

  config: DecoderConfig
  head: str = "lm"
  dtype_name: str = "float32"
  param_dtype_name: str = "float32"
  remat: Any = "none"
  cache_dtype_name: str | None = None
  vocab_chunk: int | None = None

  def __post_init__(self):
    if self.head not in HEADS:
      raise ValueError(f"head must be one of {HEADS}, got {self.head!r}.")
    object.__setattr__(self, "remat", normalize_remat(self.remat))
    _float_dtype_name(self.dtype_name, "dtype")
    _float_dtype_name(self.param_dtype_name, "param_dtype")
    if self.cache_dtype_name is not None:
      _float_dtype_name(self.cache_dtype_name, "cache_dtype")
    check_vocab_chunk(self.vocab_chunk)

  @property
  def dtype(self):
    return jnp.dtype(self.dtype_name)

  @property
  def param_dtype(self):
    return jnp.dtype(self.param_dtype_name)

  @property
  def cache_dtype(self):
    return self.dtype if self.cache_dtype_name is None else jnp.dtype(self.cache_dtype_name)

  def with_options(self, *, dtype=None, param_dtype=None, cache_dtype=None, remat=None,
                   attention: str | None = None, attention_chunk: int | None = None,
                   vocab_chunk: int | None = None) -> "Model":
    """A copy with the given settings changed (None keeps the current one).

    dtype / param_dtype / cache_dtype: "float32", "bfloat16" or "float16" (or dtypes);
    remat: one of `REMAT_POLICIES` or a bool; attention: one of
    `rlhf_jax.models.attention.BACKENDS`; attention_chunk, vocab_chunk: positive ints
    (vocab_chunk: ids per LM-head chunk of the log-prob functions). Parameters are
    not converted: cast them with `jax.tree.map(lambda x: x.astype(model.param_dtype), p)`
    when `param_dtype` changes.
    """
    kw = {}
    if dtype is not None:
      kw["dtype_name"] = _float_dtype_name(dtype, "dtype")
    if param_dtype is not None:
      kw["param_dtype_name"] = _float_dtype_name(param_dtype, "param_dtype")
    if cache_dtype is not None:
      kw["cache_dtype_name"] = _float_dtype_name(cache_dtype, "cache_dtype")
    if remat is not None:
      kw["remat"] = normalize_remat(remat)
    if vocab_chunk is not None:
      kw["vocab_chunk"] = vocab_chunk
    cfg = {}
    if attention is not None:
      cfg["attention"] = attention
    if attention_chunk is not None:
      cfg["attention_chunk"] = attention_chunk
    if cfg:
      kw["config"] = dataclasses.replace(self.config, **cfg)
    return dataclasses.replace(self, **kw)

  @property
  def module(self) -> Decoder:
    return Decoder(cfg=self.config, head=self.head, dtype=self.dtype,
                   param_dtype=self.param_dtype, remat=self.remat)

  def with_head(self, head: str) -> "Model":
    return dataclasses.replace(self, head=head)

  # -- parameters -----------------------------------------------------------
  def init(self, rng: jax.Array) -> dict:
    """Fresh parameters: a plain nested dict (leading layer axis on per-layer leaves)."""
    return _jit_init(self, rng)

  def init_score(self, rng: jax.Array) -> jax.Array:
    """A fresh scalar-head kernel [D, 1] (same initialiser as `init`)."""
    d = self.config.hidden_size
    return (jax.random.normal(rng, (d, 1), jnp.float32) / math.sqrt(d + 1)).astype(
        self.param_dtype)

  def _call(self, params, *args, method):
    return _jit_call(self, method.__name__, params, *args)

  # -- forward --------------------------------------------------------------
  def apply(self, params, input_ids, attention_mask=None):
    """LM head: logits [B,T,V]; value head: values [B,T]; reward head: rewards [B]."""
    input_ids = jnp.asarray(input_ids)
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    attention_mask = jnp.asarray(attention_mask)
    _check_ids_mask(input_ids, attention_mask)
    check_token_ids(input_ids, self.config.vocab_size)
    return self._call(params, input_ids, attention_mask, method=Decoder.__call__)

  __call__ = apply

  def hidden(self, params, input_ids, attention_mask=None):
    """Final-norm hidden states [B,T,D]."""
    input_ids = jnp.asarray(input_ids)
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    _check_ids_mask(input_ids, jnp.asarray(attention_mask))
    check_token_ids(input_ids, self.config.vocab_size)
    return self._call(params, input_ids, jnp.asarray(attention_mask), method=Decoder.hidden)

  def logits_from_hidden(self, params, h):
    return self._call(params, h, method=Decoder.logits_from_hidden)

  def scores_from_hidden(self, params, h):
    """Per-token scalar head output [B,T] (value/reward heads)."""
    return self._call(params, h, method=Decoder.scores_from_hidden)

  # -- KV cache decoding ------------------------------------------------------
  def init_cache(self, batch_size: int, max_len: int, dtype=None) -> KVCache:
    """Zeros [L, B, Hkv, max_len, Dh] in `dtype` (default `self.cache_dtype`)."""
    cfg = self.config
    dt = self.cache_dtype if dtype is None else jnp.dtype(dtype)
    shape = (cfg.num_layers, batch_size, cfg.num_kv_heads, max_len, cfg.head_dim)
    return KVCache(jnp.zeros(shape, dt), jnp.zeros(shape, dt))

  def decode(self, params, input_ids, positions, cache: KVCache, *, write_index, kv_mask,
             in_place: bool = False):
    """Writes K/V of `input_ids` [B,t] at slots write_index..write_index+t-1.

    Each query attends to slots s with kv_mask[b, s] and s <= its own slot.
    Returns (logits [B,t,V] (or scores [B,t] for scalar heads), new cache).

    `in_place=True` (for passes that are not differentiated, such as a decode loop): with
    stacked layers the cache rides in the layer scan's carry and each layer writes its
    keys / values in place, so the step holds one cache instead of the cache scanned in
    and the one scanned out. Under `jax.grad` it would make every layer's saved input the
    whole cache. Per-layer caches are separate buffers and are always updated in place.
    """
    args = self._decode_args(input_ids, positions, cache, write_index, kv_mask)
    return self._call(params, *args,
                      method=Decoder.decode_in_place if in_place else Decoder.decode)

  def decode_hidden(self, params, input_ids, positions, cache: KVCache, *, write_index,
                    kv_mask, in_place: bool = False):
    """As `decode`, but returns the final-norm hidden states [B,t,D] instead of logits."""
    args = self._decode_args(input_ids, positions, cache, write_index, kv_mask)
    return self._call(params, *args, method=Decoder.decode_hidden_in_place if in_place
                      else Decoder.decode_hidden)

  def _decode_args(self, input_ids, positions, cache, write_index, kv_mask):
    if input_ids.ndim != 2 or positions.shape != input_ids.shape:
      raise ValueError(f"decode: input_ids {input_ids.shape} and positions "
                       f"{positions.shape} must both be [B, t].")
    # [L, B, Hkv, S, Dh], or L arrays [B, Hkv, S, Dh] in the per-layer layout.
    shape = (1,) + cache.k[0].shape if isinstance(cache.k, (tuple, list)) else cache.k.shape
    batch_slots = (shape[1], shape[3])
    if kv_mask.shape != batch_slots:
      raise ValueError(f"decode: kv_mask shape {kv_mask.shape} must be [B, S] = "
                       f"{batch_slots}.")
    check_token_ids(input_ids, self.config.vocab_size)
    return (input_ids, positions.astype(jnp.int32), cache, jnp.asarray(write_index, jnp.int32),
            kv_mask)

  # -- sharding ---------------------------------------------------------------
  def logical_axes(self, params=None):
    from rlhf_jax.models.axes import logical_axes
    return logical_axes(self, params)


@functools.partial(jax.jit, static_argnums=(0,))
def _jit_init(model: Model, rng):
  """Initialises every leaf from one random draw (cheap to compile).

  Kernels/embeddings ~ N(0, initializer_range^2); norm scales 1 (0 for Gemma's
  (1 + w) form); biases 0; the scalar head ~ N(0, 1/(D+1)).
  """
  ids = jnp.zeros((1, 2), jnp.int32)
  shapes = jax.eval_shape(model.module.init, jax.random.key(0), ids, ids)["params"]
  leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
  total = sum(math.prod(x.shape) for _, x in leaves)
  noise = jax.random.normal(rng, (total,), jnp.float32)
  std = default_init_std(model.config)
  out, offset = [], 0
  for path, x in leaves:
    name = path[-1].key
    n = math.prod(x.shape)
    if name == "scale":
      v = jnp.full(x.shape, 0.0 if model.config.norm_kind == "rms_plus1" else 1.0)
    elif name.endswith("bias"):
      v = jnp.zeros(x.shape)
    else:
      scale = 1.0 / math.sqrt(model.config.hidden_size + 1) if name == "score" else std
      v = noise[offset:offset + n].reshape(x.shape) * scale
    offset += n
    out.append(v.astype(x.dtype))
  return _plain(jax.tree_util.tree_unflatten(treedef, out))


def _plain(tree):
  if hasattr(tree, "items"):
    return {k: _plain(v) for k, v in tree.items()}
  return tree


@functools.partial(jax.jit, static_argnums=(0, 1))
def _jit_call(model: Model, method_name: str, params, *args):
  return model.module.apply({"params": params}, *args, method=getattr(Decoder, method_name))


def from_config(hf_config: Any, *, dtype=jnp.float32, param_dtype=jnp.float32,
                remat: bool | str = False, head: str = "lm", cache_dtype=None,
                attention: str | None = None, attention_chunk: int | None = None) -> Model:
  """Builds a `Model` from a transformers config dict (or a `DecoderConfig`).

  remat: a bool or one of `REMAT_POLICIES`; attention / attention_chunk override the
  `DecoderConfig` fields; cache_dtype: KV-cache dtype (None: `dtype`).
  """
  cfg = hf_config if isinstance(hf_config, DecoderConfig) else config_from_hf(hf_config)
  model = Model(config=cfg, head=head, dtype_name=_dtype_name(dtype),
                param_dtype_name=_dtype_name(param_dtype), remat=remat)
  return model.with_options(cache_dtype=cache_dtype, attention=attention,
                            attention_chunk=attention_chunk)


def ValueModel(hf_config: Any, **kw) -> Model:  # noqa: N802
  """A decoder with a per-token scalar value head (values [B,T])."""
  return from_config(hf_config, head="value", **kw)


def RewardModel(hf_config: Any, **kw) -> Model:  # noqa: N802
  """A decoder with a sequence reward head scored at the last non-pad token (rewards [B])."""
  return from_config(hf_config, head="reward", **kw)


def unstack_layers(params):
  """Per-layer view of `params`: `layers` becomes a tuple of per-layer dicts.

  Every model method accepts either layout. The unstacked one runs the layers as an
  unrolled loop (no per-layer weight slicing inside a scan), which is faster for
  KV-cache decoding; its gradient w.r.t. the stacked params is one concatenate.
  """
  layers = params["layers"]
  if isinstance(layers, (tuple, list)):
    return params
  n = jax.tree.leaves(layers)[0].shape[0]
  split = jax.tree.map(lambda x: [jnp.squeeze(s, 0) for s in jnp.split(x, n)], layers)
  per_layer = tuple(jax.tree.map(lambda _, s: s[i], layers, split) for i in range(n))
  return {**params, "layers": per_layer}


def stack_layers(params):
  """Inverse of `unstack_layers`: a tuple of per-layer dicts back to one stacked dict."""
  layers = params["layers"]
  if not isinstance(layers, (tuple, list)):
    return params
  return {**params, "layers": jax.tree.map(lambda *xs: jnp.stack(xs), *layers)}


def prefill_groups(model: "Model", params, prompt_ids, prompt_mask, *, extra_slots: int,
                   group_size: int, in_place: bool = False):
  """Runs each prompt once and hands its KV cache to the G rows that continue it.

  prompt_ids, prompt_mask: [B, P], left-padded (the last slot holds a real token). The cache
  has P + `extra_slots` slots (the extra ones empty) and the layout of `params` (stacked or
  per layer). Returns (hidden state of each prompt's last token [B * G, 1, D], cache with
  B * G rows); row i * G + g continues prompt i. `in_place`: as `Model.decode` (not under
  `jax.grad`).
  """
  b, p = prompt_ids.shape
  mask = prompt_mask.astype(bool)
  per_layer = isinstance(params["layers"], (tuple, list))
  cache = model.init_cache(b, p + extra_slots)
  if per_layer:
    cache = unstack_cache(cache)
  kv_mask = jnp.concatenate([mask, jnp.zeros((b, extra_slots), bool)], axis=1)
  positions = jnp.maximum(jnp.cumsum(mask, axis=1, dtype=jnp.int32) - 1, 0)
  h, cache = model.decode_hidden(params, prompt_ids, positions, cache, write_index=0,
                                 kv_mask=kv_mask, in_place=in_place)
  batch_axis = 0 if per_layer else 1  # stacked caches lead with the layer axis
  cache = jax.tree.map(lambda x: jnp.repeat(x, group_size, axis=batch_axis), cache)
  return jnp.repeat(h[:, -1:], group_size, axis=0), cache


def unstack_cache(cache: KVCache) -> KVCache:
  """Per-layer tuples of a stacked `KVCache` (for decoding with unstacked params)."""
  if isinstance(cache.k, (tuple, list)):
    return cache
  return KVCache(tuple(cache.k), tuple(cache.v))
