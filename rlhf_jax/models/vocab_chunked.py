"""Log-prob, log-partition and entropy of an LM head streamed over vocabulary chunks.

For hidden states h [b, c, D] and an LM-head kernel W (logits l = h W, [b, c, V]),

  logz = log sum_v exp(l_v),   logp(y) = l_y - logz,   H = logz - sum_v p_v l_v,

computed with an online (streaming) logsumexp over chunks of `vocab_chunk` ids: a running
maximum m, s = sum_v exp(l_v - m) and u = sum_v exp(l_v - m) l_v are rescaled as m grows
(Milakov & Gimelshein, "Online normalizer calculation for softmax",
https://arxiv.org/abs/1805.02867), so only one [b, c, vocab_chunk] float32 block of logits
exists at a time. The backward pass (a custom VJP) recomputes each block from the saved
logz and E_p[l]:

  d/dl_v = g_logp (1[v = y] - p_v) - g_H p_v (l_v - E_p[l]),

and never stores per-chunk logits either.

A chunk that does not divide the vocabulary: the last chunk is read as the last
`vocab_chunk` ids of the kernel, and the ids it shares with the previous chunk are masked
to -inf (as ids >= `vocab_limit` are), so no padded copy of the kernel is made. Chunks
that lie wholly at or beyond `vocab_limit` are not computed at all.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp


def check_vocab_chunk(vocab_chunk) -> None:
  """Raises ValueError unless `vocab_chunk` is None or a positive int."""
  if vocab_chunk is not None and (isinstance(vocab_chunk, bool) or not isinstance(vocab_chunk, int)
                                  or vocab_chunk < 1):
    raise ValueError(f"vocab_chunk must be None (no vocabulary chunking) or a positive int "
                     f"(ids per chunk, e.g. 8192), got {vocab_chunk!r}")


def lm_kernel(model, params):
  """(kernel, tied) of an LM-head `Model`: the [V, D] embedding when tied, else [D, V].

  Exactly what `Decoder.logits_from_hidden` multiplies `h` by; a model of another kind
  (no `config.tie_embeddings`, or a non-LM head) is a ValueError.
  """
  cfg = getattr(model, "config", None)
  if getattr(model, "head", None) != "lm" or not hasattr(cfg, "tie_embeddings"):
    raise ValueError(f"vocab_chunk needs an LM-head rlhf_jax Model (the kernel is read from its "
                     f"params); got {type(model).__name__} with head="
                     f"{getattr(model, 'head', None)!r}. Set vocab_chunk=None.")
  if cfg.tie_embeddings:
    return params["embed"], True
  return params["lm_head"], False


def _chunk_logits(h, kernel, tied, start, vc):
  """float32 logits [b, c, vc] of ids start..start+vc-1, as `logits_from_hidden` computes them."""
  if tied:
    w = jax.lax.dynamic_slice_in_dim(kernel, start, vc, axis=0).astype(h.dtype)
    return jnp.einsum("btd,vd->btv", h, w).astype(jnp.float32), w
  w = jax.lax.dynamic_slice_in_dim(kernel, start, vc, axis=1).astype(h.dtype)
  return (h @ w).astype(jnp.float32), w


def _geometry(v: int, vocab_chunk: int, vocab_limit: Optional[int]):
  limit = v if vocab_limit is None else min(int(vocab_limit), v)
  vc = min(int(vocab_chunk), v)
  return limit, vc, -(-limit // vc)


def _chunk(k, v, vc, limit):
  """(read start, ids [vc], valid [vc]) of chunk k: the slice is clamped to the kernel and
  ids before k * vc (read twice) or >= limit are invalid."""
  start = jnp.minimum(k * vc, v - vc)
  ids = start + jnp.arange(vc, dtype=jnp.int32)
  return start, ids, (ids >= k * vc) & (ids < limit)


def _forward(h, kernel, targets, tied, vc, limit):
  v = kernel.shape[0] if tied else kernel.shape[1]
  n = -(-limit // vc)
  b, c = targets.shape

  def body(carry, k):
    m, s, u, picked = carry
    start, ids, valid = _chunk(k, v, vc, limit)
    logits, _ = _chunk_logits(h, kernel, tied, start, vc)
    safe = jnp.where(valid, logits, 0.0)
    masked = jnp.where(valid, logits, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(masked, axis=-1))
    scale = jnp.exp(m - m_new)  # m = -inf only before the first chunk: scale 0
    e = jnp.where(valid, jnp.exp(safe - m_new[..., None]), 0.0)
    s = s * scale + jnp.sum(e, axis=-1)
    u = u * scale + jnp.sum(e * safe, axis=-1)
    hit = valid & (ids == targets[..., None])
    picked = picked + jnp.sum(jnp.where(hit, safe, 0.0), axis=-1)
    return (m_new, s, u, picked), None

  zeros = jnp.zeros((b, c), jnp.float32)
  init = (jnp.full((b, c), -jnp.inf, jnp.float32), zeros, zeros, zeros)
  (m, s, u, picked), _ = jax.lax.scan(body, init, jnp.arange(n, dtype=jnp.int32))
  logz = m + jnp.log(s)
  mean_logit = u / s
  lp = jnp.where(targets < limit, picked - logz, -jnp.inf)
  return lp, logz - mean_logit, logz, mean_logit


def _seq_split(x, c):
  """[b, n, ...] -> [n / c, b, c, ...] (n a multiple of c)."""
  b, n = x.shape[:2]
  return x.reshape((b, n // c, c) + x.shape[2:]).swapaxes(0, 1)


def _seq_join(x):
  """[k, b, c, ...] -> [b, k c, ...]."""
  return x.swapaxes(0, 1).reshape((x.shape[1], -1) + x.shape[3:])


def _forward_seq(h, kernel, targets, tied, vc, limit, c):
  """`_forward` over chunks of `c` positions (lax.map): one [b, c, vc] block at a time."""
  outs = jax.lax.map(lambda a: _forward(a[0], kernel, a[1], tied, vc, limit),
                     (_seq_split(h, c), _seq_split(targets, c)))
  return tuple(_seq_join(o) for o in outs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _stream(h, kernel, targets, tied, vc, limit, c):
  lp, ent, _, _ = _forward_seq(h, kernel, targets, tied, vc, limit, c)
  return lp, ent


def _stream_fwd(h, kernel, targets, tied, vc, limit, c):
  lp, ent, logz, mean_logit = _forward_seq(h, kernel, targets, tied, vc, limit, c)
  # Residuals: the inputs and two [b, n] rows; nothing per chunk, no copy of the kernel.
  return (lp, ent), (h, kernel, targets, logz, mean_logit)


def _chunk_grads(h, kernel, targets, logz, mean_logit, g_lp, g_ent, dw, tied, vc, limit):
  """(dh [b, c, D] float32, dw + this chunk's kernel gradient), block by vocabulary block."""
  v = kernel.shape[0] if tied else kernel.shape[1]
  n = -(-limit // vc)

  def body(carry, k):
    dh, dw = carry
    start, ids, valid = _chunk(k, v, vc, limit)
    logits, w = _chunk_logits(h, kernel, tied, start, vc)
    safe = jnp.where(valid, logits, 0.0)
    p = jnp.where(valid, jnp.exp(safe - logz[..., None]), 0.0)
    hit = valid & (ids == targets[..., None])
    dl = (jnp.where(hit, g_lp[..., None], 0.0)
          - p * (g_lp[..., None] + g_ent[..., None] * (safe - mean_logit[..., None]))
          ).astype(h.dtype)
    if tied:  # w [vc, D]
      dh = dh + jnp.einsum("btv,vd->btd", dl, w).astype(jnp.float32)
      dwk = jnp.einsum("btv,btd->vd", dl, h).astype(jnp.float32)
      old = jax.lax.dynamic_slice_in_dim(dw, start, vc, axis=0)
      dw = jax.lax.dynamic_update_slice_in_dim(dw, old + dwk, start, axis=0)
    else:  # w [D, vc]
      dh = dh + jnp.einsum("btv,dv->btd", dl, w).astype(jnp.float32)
      dwk = jnp.einsum("btd,btv->dv", h, dl).astype(jnp.float32)
      old = jax.lax.dynamic_slice_in_dim(dw, start, vc, axis=1)
      dw = jax.lax.dynamic_update_slice_in_dim(dw, old + dwk, start, axis=1)
    return (dh, dw), None

  init = (jnp.zeros(h.shape, jnp.float32), dw)
  (dh, dw), _ = jax.lax.scan(body, init, jnp.arange(n, dtype=jnp.int32))
  return dh, dw


def _stream_bwd(tied, vc, limit, c, res, cotangents):
  h, kernel, targets, logz, mean_logit = res
  g_lp, g_ent = cotangents
  g_lp = jnp.where(targets < limit, g_lp, 0.0)  # a -inf log-prob passes no gradient

  def per_chunk(dw, xs):  # the kernel gradient accumulates in one carry over the chunks
    hc, tc, zc, mc, glc, gec = xs
    dh, dw = _chunk_grads(hc, kernel, tc, zc, mc, glc, gec, dw, tied, vc, limit)
    return dw, dh

  xs = tuple(_seq_split(x, c) for x in (h, targets, logz, mean_logit, g_lp, g_ent))
  dw, dh = jax.lax.scan(per_chunk, jnp.zeros(kernel.shape, jnp.float32), xs)
  return _seq_join(dh).astype(h.dtype), dw.astype(kernel.dtype), None


_stream.defvjp(_stream_fwd, _stream_bwd)


def stream_logps(h, kernel, targets, *, tied: bool, vocab_chunk: int,
                 vocab_limit: Optional[int] = None, seq_chunk: Optional[int] = None):
  """Log-prob of `targets` and entropy under logits h @ kernel, over vocabulary chunks.

  Args:
    h: [b, n, D] hidden states (the compute dtype). kernel: the LM head, [V, D] when
      `tied` (the embedding), else [D, V]. targets: int [b, n].
    vocab_chunk: ids per chunk (min(vocab_chunk, V) is used). vocab_limit: ids >= it have
      probability 0 (a target >= it has log-prob -inf and no gradient).
    seq_chunk: positions per block (None: all n). The positions are padded to a multiple
      of it; forward and backward then hold one [b, seq_chunk, vocab_chunk] block at a
      time, and the backward accumulates the kernel's gradient in a single buffer.
  Returns:
    (logps [b, n], entropy [b, n]) float32, equal to the log-softmax / entropy of the full
    logits; memory O(b seq_chunk vocab_chunk) forward and backward, plus kernel-sized
    gradient buffers.
  """
  check_vocab_chunk(vocab_chunk)
  v = kernel.shape[0] if tied else kernel.shape[1]
  limit, vc, _ = _geometry(v, vocab_chunk, vocab_limit)
  b, n = targets.shape
  c = n if seq_chunk is None else max(1, min(int(seq_chunk), n))
  pad = -(-n // c) * c - n
  h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
  targets = jnp.pad(jnp.asarray(targets, jnp.int32), ((0, 0), (0, pad)))
  lp, ent = _stream(h, kernel, targets, bool(tied), vc, limit, c)
  return lp[:, :n], ent[:, :n]
