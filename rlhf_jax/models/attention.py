"""Softmax attention with selectable backends: XLA, chunked (online softmax), cuDNN, splash.

  out = attention(q, k, v, kv_mask=mask, causal=True, backend="auto")

One function for the full-sequence forward and for reads of a KV cache. Grouped-query
attention never repeats K/V: the H query heads are viewed as [Hkv, G] (G = H / Hkv)
and each group reads its own key/value head.

Backends:
  "xla"      `jax.nn.dot_product_attention(implementation="xla")` with a boolean
             [B, 1, T, S] mask (and, for the cache layout, the same math as one
             grouped einsum that reads the cache in place). Holds [B, H, T, S] scores.
  "chunked"  flash-style online softmax in plain XLA: `lax.scan` over key blocks of
             `chunk_size` slots inside `lax.map` over query blocks, with a custom VJP
             that recomputes each block in the backward pass. Memory O(T + S) per
             head besides one [chunk, chunk] score block; any platform.
  "cudnn"    `jax.nn.dot_product_attention(implementation="cudnn")`: GPU only,
             bfloat16/float16 inputs.
  "splash"   the Pallas splash-attention kernel (imported lazily): TPU only, lengths
             that are multiples of 128, causal offset known at trace time.
  "auto"     cudnn on GPU and splash on TPU where their conditions hold; otherwise
             "xla" while T * S <= `AUTO_CHUNKED_MIN_SCORES` and "chunked" beyond.

Which keys a query sees (every condition given must hold):
  kv_mask[b, s]                       key slot s holds a real token (padding);
  s <= q_offset + i                   when `causal` (query i sits at slot q_offset + i);
  q_segment_ids[b, i] == kv_segment_ids[b, s]   (packed sequences);
  mask[b, h, i, s]                    an explicit boolean mask [B|1, 1|H, T, S].
Rows where no key is visible (padding queries) are finite but otherwise unspecified
(xla and chunked: the mean of all values; splash: padding attends to padding).

Chunk sizes need not divide the lengths: queries and keys are padded up to a multiple
of the chunk, padded keys get exactly zero weight and padded queries are dropped.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

BACKENDS = ("auto", "xla", "chunked", "cudnn", "splash")
# Backends that only run on some platforms (as `jax.default_backend()` names them).
BACKEND_PLATFORMS = {"cudnn": ("gpu", "cuda"), "splash": ("tpu",)}
KV_LAYOUTS = ("bshd", "bhsd")
# "auto" switches from the XLA path to the chunked one past this many scores per head.
AUTO_CHUNKED_MIN_SCORES = 2048 * 2048
DEFAULT_CHUNK = 512

# As `jax.nn.dot_product_attention`: masked scores take this finite value, so a row with
# nothing visible is uniform rather than NaN.
_MASKED = float(-0.7 * np.finfo(np.float32).max)
# Test hook: run the splash kernel in Pallas interpret mode (any platform).
_SPLASH_INTERPRET = False


def _platform() -> str:
  return jax.default_backend()


def validate_backend(backend: str, platform: Optional[str] = None) -> None:
  """Raises ValueError for an unknown backend or one this platform cannot run."""
  if backend not in BACKENDS:
    raise ValueError(f"attention backend {backend!r} is unknown; choose one of "
                     f"{', '.join(BACKENDS)}.")
  platform = _platform() if platform is None else platform
  need = BACKEND_PLATFORMS.get(backend)
  if need and platform not in need and not (backend == "splash" and _SPLASH_INTERPRET):
    raise ValueError(
        f"attention backend {backend!r} runs only on {need[0].upper()}; this process "
        f"runs on {platform!r}. Use 'auto', 'xla' or 'chunked'.")


def resolve_backend(backend: str, *, platform: str, q_len: int, kv_len: int, dtype,
                    head_dim: int, kv_layout: str = "bshd", dense_mask: bool = False,
                    static_offset: bool = True) -> str:
  """The backend `attention` runs for these shapes ("auto" resolved, others validated)."""
  validate_backend(backend, platform)
  if backend != "auto":
    return backend
  if platform in BACKEND_PLATFORMS["cudnn"] and kv_layout == "bshd" and _cudnn_fits(
      dtype, head_dim, q_len, kv_len) is None:
    return "cudnn"
  if platform == "tpu" and kv_layout == "bshd" and not dense_mask and static_offset and \
      _splash_fits(q_len, kv_len) is None:
    return "splash"
  return "chunked" if q_len * kv_len > AUTO_CHUNKED_MIN_SCORES else "xla"


def _cudnn_fits(dtype, head_dim, q_len, kv_len) -> Optional[str]:
  """None if cuDNN flash attention takes these inputs, else the reason."""
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return f"needs bfloat16 or float16 inputs, got {jnp.dtype(dtype).name}"
  if head_dim > 128 or head_dim % 8:
    return f"needs head_dim <= 128 and a multiple of 8, got {head_dim}"
  if q_len % 2 or kv_len % 2:
    return f"needs even sequence lengths with a mask, got {q_len} and {kv_len}"
  return None


def _splash_fits(q_len, kv_len) -> Optional[str]:
  if q_len % 128 or kv_len % 128:
    return f"needs lengths that are multiples of 128, got {q_len} and {kv_len}"
  return None


def attention(q, k, v, *, kv_mask=None, causal: bool = False, q_offset=None,
              q_segment_ids=None, kv_segment_ids=None, mask=None, kv_layout: str = "bshd",
              backend: str = "auto", chunk_size: int = DEFAULT_CHUNK,
              scale: Optional[float] = None):
  """softmax(q k^T * scale, masked) v for every query head.

  Args:
    q: [B, T, H, Dh].
    k, v: [B, S, Hkv, Dh] (`kv_layout="bshd"`) or [B, Hkv, S, Dh] (`"bhsd"`, the KV-cache
      layout, read in place by the xla and chunked backends); H a multiple of Hkv.
    kv_mask: bool [B, S], true where the key slot holds a real token.
    causal: query i sees slots s <= q_offset + i.
    q_offset: slot of query 0 (int or int32 scalar; None means 0). A traced offset rules
      out splash.
    q_segment_ids, kv_segment_ids: int [B, T], [B, S]: queries see keys of their segment.
    mask: bool [B|1, 1|H, T, S]: extra explicit mask (not for splash).
    backend: one of `BACKENDS`. chunk_size: block length of the chunked backend.
    scale: score scale (default 1 / sqrt(Dh)).
  Returns:
    [B, T, H, Dh] in q's dtype. Scores and softmax run in float32.
  """
  if kv_layout not in KV_LAYOUTS:
    raise ValueError(f"kv_layout {kv_layout!r} is unknown; use one of {KV_LAYOUTS}.")
  if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
    raise ValueError(f"attention: q {q.shape} must be [B, T, H, Dh] and k {k.shape}, "
                     f"v {v.shape} equal 4-D arrays.")
  if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) \
      or chunk_size <= 0:
    raise ValueError(f"attention chunk_size must be a positive int, got {chunk_size!r}.")
  if (q_segment_ids is None) != (kv_segment_ids is None):
    raise ValueError("attention: pass both q_segment_ids and kv_segment_ids, or neither.")
  b, t, h, d = q.shape
  kh, s = (k.shape[2], k.shape[1]) if kv_layout == "bshd" else (k.shape[1], k.shape[2])
  if h % kh:
    raise ValueError(f"attention: {h} query heads are not a multiple of {kh} kv heads.")
  if mask is not None and (mask.ndim != 4 or mask.shape[-2:] != (t, s)
                           or mask.shape[1] not in (1, h)):
    raise ValueError(f"attention: mask {mask.shape} must be [B|1, 1|H, {t}, {s}].")
  if kv_mask is not None and kv_mask.shape != (b, s):
    raise ValueError(f"attention: kv_mask {kv_mask.shape} must be [B, S] = {(b, s)}.")
  scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
  static_offset = q_offset is None or isinstance(q_offset, (int, np.integer))
  name = resolve_backend(backend, platform=_platform(), q_len=t, kv_len=s, dtype=q.dtype,
                         head_dim=d, kv_layout=kv_layout, dense_mask=mask is not None,
                         static_offset=static_offset)
  kv_mask = None if kv_mask is None else kv_mask.astype(bool)
  spec = _Spec(kv_mask=kv_mask, causal=causal, q_offset=q_offset, q_seg=q_segment_ids,
               kv_seg=kv_segment_ids, dense=mask)
  if name == "xla":
    return _xla(q, k, v, spec, kv_layout, scale)
  if name == "chunked":
    kc = k if kv_layout == "bhsd" else k.swapaxes(1, 2)
    vc = v if kv_layout == "bhsd" else v.swapaxes(1, 2)
    return _chunked(q, kc, vc, spec, scale, int(chunk_size))
  if name == "cudnn":
    return _cudnn(q, k, v, spec, kv_layout, scale)
  return _splash(q, k, v, spec, kv_layout, scale)


class _Spec(NamedTuple):
  kv_mask: Any
  causal: bool
  q_offset: Any
  q_seg: Any
  kv_seg: Any
  dense: Any


def dense_mask(spec: _Spec, t: int, s: int):
  """The [B|1, 1|H, T, S] boolean mask a `_Spec` describes (None: everything visible)."""
  keep = None

  def both(a, x):
    return x if a is None else a & x

  if spec.causal:
    off = 0 if spec.q_offset is None else spec.q_offset
    keep = both(keep, (jnp.arange(s)[None, :] <= jnp.arange(t)[:, None] + off)[None, None])
  if spec.kv_mask is not None:
    keep = both(keep, spec.kv_mask[:, None, None, :])
  if spec.q_seg is not None:
    keep = both(keep, (spec.q_seg[:, :, None] == spec.kv_seg[:, None, :])[:, None])
  if spec.dense is not None:
    keep = both(keep, spec.dense.astype(bool))
  return keep


# ----------------------------------------------------------------------------- xla


def _xla(q, k, v, spec, kv_layout, scale):
  b, t, h, d = q.shape
  s = k.shape[1] if kv_layout == "bshd" else k.shape[2]
  keep = dense_mask(spec, t, s)
  if keep is not None:
    keep = jnp.broadcast_to(keep, (keep.shape[0], keep.shape[1], t, s))
  if kv_layout == "bshd":
    return jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask=keep,
                                        scale=scale, implementation="xla")
  kh = k.shape[1]
  qg = q.reshape(b, t, kh, h // kh, d)
  scores = jnp.einsum("btkgd,bksd->bkgts", qg, k.astype(q.dtype),
                      preferred_element_type=jnp.float32)
  scores = scores * jnp.float32(scale)
  if keep is not None:
    scores = jnp.where(_grouped(keep, kh), scores, _MASKED)
  probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
  out = jnp.einsum("bkgts,bksd->btkgd", probs, v.astype(q.dtype))
  return out.reshape(b, t, h, d)


def _grouped(keep, kh):
  """[B|1, 1|H, T, S] -> broadcastable to [B, Hkv, G, T, S]."""
  b, hm, t, s = keep.shape
  if hm == 1:
    return keep[:, :, None]
  return keep.reshape(b, kh, hm // kh, t, s)


# ----------------------------------------------------------------------------- chunked


class _Static(NamedTuple):
  causal: bool
  scale: float
  cq: int
  ck: int
  s_len: int  # real key slots; slots past it are padding


def _chunked(q, k, v, spec, scale, chunk):
  """q [B, T, H, D]; k, v [B, Hkv, S, D] -> [B, T, H, D]."""
  b, t, h, d = q.shape
  kh, s = k.shape[1], k.shape[2]
  cq, ck = min(chunk, t), min(chunk, s)
  tp, sp = -(-t // cq) * cq, -(-s // ck) * ck
  qg = q.reshape(b, t, kh, h // kh, d)
  if tp != t:
    qg = jnp.pad(qg, ((0, 0), (0, tp - t), (0, 0), (0, 0), (0, 0)))
  if sp != s:
    k = jnp.pad(k, ((0, 0), (0, 0), (0, sp - s), (0, 0)))
    v = jnp.pad(v, ((0, 0), (0, 0), (0, sp - s), (0, 0)))

  def pad_to(x, axis, n):
    if x is None or x.shape[axis] == n:
      return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, n - x.shape[axis])
    return jnp.pad(x, widths)

  dense = spec.dense
  if dense is not None:
    dense = pad_to(pad_to(dense.astype(bool), 2, tp), 3, sp)
  aux = dict(kv_mask=pad_to(spec.kv_mask, 1, sp),
             q_offset=None if spec.q_offset is None else jnp.asarray(spec.q_offset, jnp.int32),
             q_seg=pad_to(spec.q_seg, 1, tp), kv_seg=pad_to(spec.kv_seg, 1, sp), dense=dense)
  static = _Static(causal=bool(spec.causal), scale=scale, cq=cq, ck=ck, s_len=s)
  out = _flash(qg, k.astype(q.dtype), v.astype(q.dtype), aux, static)
  return out[:, :t].reshape(b, t, h, d)


def _tile_scores(qb, kb, aux, st, i0, j0):
  """Masked float32 scores [B, Hkv, G, cq, ck] of one (query block, key block) tile.

  Returns (scores, keep): keep (or None) is where the masks allow the pair.
  """
  s = jnp.einsum("btkgd,bksd->bkgts", qb, kb, preferred_element_type=jnp.float32)
  s = s * jnp.float32(st.scale)
  kh = kb.shape[1]
  q_idx = i0 + jnp.arange(st.cq)
  k_idx = j0 + jnp.arange(st.ck)
  keep = None

  def both(a, x):
    return x if a is None else a & x

  if st.causal:
    off = 0 if aux["q_offset"] is None else aux["q_offset"]
    keep = both(keep, (k_idx[None, :] <= q_idx[:, None] + off)[None, None, None])
  if aux["kv_mask"] is not None:
    km = jax.lax.dynamic_slice_in_dim(aux["kv_mask"], j0, st.ck, axis=1)
    keep = both(keep, km[:, None, None, None, :])
  if aux["q_seg"] is not None:
    qs = jax.lax.dynamic_slice_in_dim(aux["q_seg"], i0, st.cq, axis=1)
    ks = jax.lax.dynamic_slice_in_dim(aux["kv_seg"], j0, st.ck, axis=1)
    keep = both(keep, (qs[:, :, None] == ks[:, None, :])[:, None, None])
  if aux["dense"] is not None:
    dm = jax.lax.dynamic_slice_in_dim(aux["dense"], i0, st.cq, axis=2)
    dm = jax.lax.dynamic_slice_in_dim(dm, j0, st.ck, axis=3)
    keep = both(keep, _grouped(dm, kh))
  if keep is not None:
    s = jnp.where(keep, s, _MASKED)
  if st.s_len % st.ck:
    # Slots past the real keys (chunk padding) get exactly zero weight, even in rows
    # where every real key is masked.
    s = jnp.where((k_idx < st.s_len)[None, None, None, None], s, -jnp.inf)
  return s, keep


def _flash_forward(qg, k, v, aux, st):
  """Online softmax over key blocks: (out [B, Tp, Hkv, G, D], (m, l) [B, Hkv, G, Tp]).

  m is each row's maximum score and l its sum of exp(score - m); they stay separate
  because m + log(l) rounds back to m in rows whose scores are all the masked value.
  """
  b, tp, kh, g, d = qg.shape
  sp = k.shape[2]
  nq, nk = tp // st.cq, sp // st.ck

  def q_block(i):
    i0 = i * st.cq
    qb = jax.lax.dynamic_slice_in_dim(qg, i0, st.cq, axis=1)

    def k_step(carry, j):
      m, l, acc = carry
      j0 = j * st.ck
      kb = jax.lax.dynamic_slice_in_dim(k, j0, st.ck, axis=2)
      vb = jax.lax.dynamic_slice_in_dim(v, j0, st.ck, axis=2)
      s, _ = _tile_scores(qb, kb, aux, st, i0, j0)
      m_new = jnp.maximum(m, s.max(-1))
      corr = jnp.exp(m - m_new)
      p = jnp.exp(s - m_new[..., None])
      l = l * corr + p.sum(-1)
      pv = jnp.einsum("bkgts,bksd->bkgtd", p.astype(v.dtype), vb,
                      preferred_element_type=jnp.float32)
      return (m_new, l, acc * corr[..., None] + pv), None

    init = (jnp.full((b, kh, g, st.cq), -jnp.inf, jnp.float32),
            jnp.zeros((b, kh, g, st.cq), jnp.float32),
            jnp.zeros((b, kh, g, st.cq, d), jnp.float32))
    (m, l, acc), _ = jax.lax.scan(k_step, init, jnp.arange(nk))
    out = (acc / l[..., None]).astype(qg.dtype)  # [B, Hkv, G, cq, D]
    return jnp.moveaxis(out, 3, 1), jnp.stack([m, l])

  if nq == 1:
    out, ml = q_block(0)
    return out, ml
  outs, mls = jax.lax.map(q_block, jnp.arange(nq))  # [nq, B, cq, Hkv, G, D], [nq, 2, B, Hkv, G, cq]
  out = jnp.moveaxis(outs, 0, 1).reshape(b, tp, kh, g, d)
  ml = jnp.moveaxis(mls, 0, 4).reshape(2, b, kh, g, tp)
  return out, ml


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(qg, k, v, aux, st):
  return _flash_forward(qg, k, v, aux, st)[0]


def _flash_fwd(qg, k, v, aux, st):
  out, ml = _flash_forward(qg, k, v, aux, st)
  return out, (qg, k, v, aux, out, ml)


def _flash_bwd(st, res, g_out):
  """Recomputes each tile's probabilities from the saved row max and sum (FlashAttention-2)."""
  qg, k, v, aux, out, ml = res
  b, tp, kh, g, d = qg.shape
  sp = k.shape[2]
  nq, nk = tp // st.cq, sp // st.ck
  delta = jnp.einsum("btkgd,btkgd->bkgt", g_out.astype(jnp.float32),
                     out.astype(jnp.float32))

  def q_step(carry, i):
    dk_acc, dv_acc = carry
    i0 = i * st.cq
    qb = jax.lax.dynamic_slice_in_dim(qg, i0, st.cq, axis=1)
    gb = jax.lax.dynamic_slice_in_dim(g_out, i0, st.cq, axis=1).astype(qg.dtype)
    m_b = jax.lax.dynamic_slice_in_dim(ml[0], i0, st.cq, axis=3)
    inv_l = 1.0 / jax.lax.dynamic_slice_in_dim(ml[1], i0, st.cq, axis=3)
    delta_b = jax.lax.dynamic_slice_in_dim(delta, i0, st.cq, axis=3)

    def k_step(dq, j):
      j0 = j * st.ck
      kb = jax.lax.dynamic_slice_in_dim(k, j0, st.ck, axis=2)
      vb = jax.lax.dynamic_slice_in_dim(v, j0, st.ck, axis=2)
      s, keep = _tile_scores(qb, kb, aux, st, i0, j0)
      p = jnp.exp(s - m_b[..., None]) * inv_l[..., None]
      dv = jnp.einsum("bkgts,btkgd->bksd", p.astype(v.dtype), gb,
                      preferred_element_type=jnp.float32)
      dp = jnp.einsum("btkgd,bksd->bkgts", gb, vb, preferred_element_type=jnp.float32)
      ds = p * (dp - delta_b[..., None])
      if keep is not None:  # masked scores are constants: no gradient reaches q or k
        ds = jnp.where(keep, ds, 0.0)
      ds = ds * jnp.float32(st.scale)
      dq = dq + jnp.einsum("bkgts,bksd->btkgd", ds.astype(k.dtype), kb,
                           preferred_element_type=jnp.float32)
      dk = jnp.einsum("bkgts,btkgd->bksd", ds.astype(qg.dtype), qb,
                      preferred_element_type=jnp.float32)
      return dq, (dk, dv)

    dq, (dks, dvs) = jax.lax.scan(
        k_step, jnp.zeros((b, st.cq, kh, g, d), jnp.float32), jnp.arange(nk))
    # [nk, B, Hkv, ck, D] -> [B, Hkv, Sp, D]
    dks = jnp.moveaxis(dks, 0, 2).reshape(b, kh, sp, d)
    dvs = jnp.moveaxis(dvs, 0, 2).reshape(b, kh, sp, d)
    return (dk_acc + dks, dv_acc + dvs), dq

  zeros = jnp.zeros((b, kh, sp, d), jnp.float32)
  (dk, dv), dqs = jax.lax.scan(q_step, (zeros, zeros), jnp.arange(nq))
  dq = jnp.moveaxis(dqs, 0, 1).reshape(b, tp, kh, g, d)
  return dq.astype(qg.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------- cudnn


def _cudnn(q, k, v, spec, kv_layout, scale):
  t = q.shape[1]
  s = k.shape[1] if kv_layout == "bshd" else k.shape[2]
  why = _cudnn_fits(q.dtype, q.shape[-1], t, s)
  if why:
    raise ValueError(f"attention backend 'cudnn' {why}; use backend 'auto', 'xla' or "
                     "'chunked' (or model dtype bfloat16).")
  if kv_layout == "bhsd":
    k, v = k.swapaxes(1, 2), v.swapaxes(1, 2)
  k, v = k.astype(q.dtype), v.astype(q.dtype)
  # Plain causal self-attention goes to cuDNN's built-in causal mask; the rest (padding,
  # segments, offsets) becomes a [B, 1, T, S] mask that cuDNN adds as a bias.
  static_zero = spec.q_offset is None or (isinstance(spec.q_offset, (int, np.integer))
                                          and spec.q_offset == 0)
  plain_causal = bool(spec.causal) and static_zero and t == s
  keep = dense_mask(spec._replace(causal=spec.causal and not plain_causal), t, s)
  if keep is not None:
    keep = jnp.broadcast_to(keep, (keep.shape[0], keep.shape[1], t, s))
  return jax.nn.dot_product_attention(q, k, v, mask=keep, scale=scale,
                                      is_causal=plain_causal, implementation="cudnn")


# ----------------------------------------------------------------------------- splash


@functools.lru_cache(maxsize=64)
def _splash_kernel(t: int, s: int, groups: int, causal: bool, offset: int, interpret: bool):
  from jax.experimental.pallas.ops.tpu.splash_attention import (  # TPU only: lazy
      splash_attention_kernel as sk, splash_attention_mask as sm)
  one = sm.CausalMask((t, s), offset=offset) if causal else sm.FullMask((t, s))
  bq = next(x for x in (512, 256, 128) if t % x == 0)
  bk = next(x for x in (512, 256, 128) if s % x == 0)
  sizes = sk.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq,
                        block_kv_dkv=bk, block_kv_dkv_compute=bk, block_q_dq=bq,
                        block_kv_dq=bk)
  return sk.make_splash_mqa_single_device(sm.MultiHeadMask([one] * groups),
                                          block_sizes=sizes, interpret=interpret), sk


def _splash(q, k, v, spec, kv_layout, scale):
  b, t, h, d = q.shape
  s = k.shape[1] if kv_layout == "bshd" else k.shape[2]
  problems = [_splash_fits(t, s)]
  if spec.dense is not None:
    problems.append("takes no explicit mask (pass kv_mask / segment ids)")
  if spec.q_offset is not None and not isinstance(spec.q_offset, (int, np.integer)):
    problems.append("needs a causal offset known at trace time (not a traced write index)")
  if spec.kv_mask is not None and spec.q_seg is None and t != s:
    problems.append("expresses kv_mask only for self-attention (T == S)")
  problems = [p for p in problems if p]
  if problems:
    raise ValueError(f"attention backend 'splash' {'; '.join(problems)}; use backend "
                     "'auto', 'xla' or 'chunked'.")
  if kv_layout == "bshd":
    k, v = k.swapaxes(1, 2), v.swapaxes(1, 2)  # [B, Hkv, S, D]
  kh = k.shape[1]
  kernel, sk = _splash_kernel(t, s, h // kh, bool(spec.causal), int(spec.q_offset or 0),
                              bool(_SPLASH_INTERPRET))
  qh = (q * jnp.asarray(scale, q.dtype)).reshape(b, t, kh, h // kh, d).transpose(0, 2, 3, 1, 4)
  k, v = k.astype(q.dtype), v.astype(q.dtype)
  # Padding and segments become segment ids: a query sees keys of equal id (pads: id 0).
  q_ids = kv_ids = None
  if spec.q_seg is not None:
    q_ids, kv_ids = spec.q_seg.astype(jnp.int32) + 1, spec.kv_seg.astype(jnp.int32) + 1
    if spec.kv_mask is not None:
      kv_ids = jnp.where(spec.kv_mask, kv_ids, 0)
      if t == s:
        q_ids = jnp.where(spec.kv_mask, q_ids, 0)
  elif spec.kv_mask is not None:
    q_ids = kv_ids = spec.kv_mask.astype(jnp.int32)
  if q_ids is None:
    per_head = jax.vmap(kernel, in_axes=(0, 0, 0))
    out = jax.vmap(per_head)(qh, k, v)
  else:
    def one(qx, kx, vx, qi, ki):
      seg = sk.SegmentIds(q=qi, kv=ki)
      return jax.vmap(lambda a, bb, c: kernel(a, bb, c, segment_ids=seg))(qx, kx, vx)
    out = jax.vmap(one)(qh, k, v, q_ids, kv_ids)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d).astype(q.dtype)
