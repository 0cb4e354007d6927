"""Chunked per-token log-probabilities and entropies from hidden states."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_logps(model, params, input_ids, attention_mask=None, *, chunk_size: int = 128):
  """Per-token log-probs and entropies of `input_ids` under an LM-head model.

  logps[:, t] = log p(input_ids[:, t] | input_ids[:, :t]) for t >= 1, logps[:, 0] = 0;
  entropy[:, t] = -sum_v p_v log p_v of the same next-token distribution
  (entropy[:, 0] = 0). The LM head and log-softmax run over chunks of
  `chunk_size` positions (each chunk rematerialised under autodiff), so the full
  [B, T, V] float32 log-softmax is never materialised.

  Args:
    input_ids: int [B, T]. attention_mask: [B, T] (1 = real token).
  Returns:
    (logps [B, T] float32, entropy [B, T] float32). Callers apply their own mask.
  """
  if chunk_size <= 0:
    raise ValueError(f"token_logps: chunk_size must be positive, got {chunk_size}.")
  if model.head != "lm":
    raise ValueError(f"token_logps needs an LM-head model, got head={model.head!r}.")
  input_ids = jnp.asarray(input_ids)
  if attention_mask is None:
    attention_mask = jnp.ones_like(input_ids)
  h = model.hidden(params, input_ids, attention_mask)  # [B, T, D]
  b, t, d = h.shape
  if t < 2:
    z = jnp.zeros((b, t), jnp.float32)
    return z, z
  h_prev = h[:, :-1]
  targets = input_ids[:, 1:]
  n = t - 1
  c = min(chunk_size, n)
  n_chunks = -(-n // c)
  pad = n_chunks * c - n
  h_prev = jnp.pad(h_prev, ((0, 0), (0, pad), (0, 0)))
  targets = jnp.pad(targets, ((0, 0), (0, pad)))
  h_chunks = h_prev.reshape(b, n_chunks, c, d).swapaxes(0, 1)
  t_chunks = targets.reshape(b, n_chunks, c).swapaxes(0, 1)

  def one(args):
    hc, tc = args
    logits = model.logits_from_hidden(params, hc).astype(jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, tc[..., None], axis=-1)[..., 0]
    probs = jnp.exp(logits - logz[..., None])
    ent = logz - jnp.sum(probs * logits, axis=-1)
    return picked - logz, ent

  if n_chunks == 1:  # one chunk holds no more than the loop would: no loop, no recompute
    lp, ent = jax.tree.map(lambda x: x[None], one((h_chunks[0], t_chunks[0])))
  else:
    lp, ent = jax.lax.map(jax.checkpoint(one), (h_chunks, t_chunks))
  lp = lp.swapaxes(0, 1).reshape(b, -1)[:, :n]
  ent = ent.swapaxes(0, 1).reshape(b, -1)[:, :n]
  zero = jnp.zeros((b, 1), jnp.float32)
  return jnp.concatenate([zero, lp], 1), jnp.concatenate([zero, ent], 1)
