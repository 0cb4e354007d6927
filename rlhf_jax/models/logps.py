"""Chunked per-token log-probabilities and entropies from hidden states.

`vocab_limit` (every function, default None): the number of real tokens when the model's
vocabulary is padded beyond the tokenizer's (checkpoints round it up, e.g. to a multiple
of 64). Ids >= vocab_limit get probability 0: the log-softmax and the entropy are taken
over the real vocabulary only, as the sampler does with `SamplingConfig.vocab_limit`.

`vocab_chunk` (default None: the model's `Model.vocab_chunk`, itself None unless set with
`Model.with_options(vocab_chunk=...)` or `config.model.vocab_chunk`): also split the LM
head over chunks of that many vocabulary ids, with an online logsumexp and a custom VJP
(`rlhf_jax.models.vocab_chunked`), so no [b, chunk_size, V] float32 block exists, forward
or backward; only [b, chunk_size, vocab_chunk] ones.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from rlhf_jax.models.model import prefill_groups
from rlhf_jax.models.vocab_chunked import check_vocab_chunk, lm_kernel, stream_logps


def _vocab_chunk(model, vocab_chunk):
  """The effective vocabulary chunk: the argument, else the model's setting."""
  if vocab_chunk is None:
    vocab_chunk = getattr(model, "vocab_chunk", None)
  check_vocab_chunk(vocab_chunk)
  return vocab_chunk


def _check_lm(model, chunk_size, vocab_limit=None, vocab_chunk=None):
  if chunk_size <= 0:
    raise ValueError(f"token_logps: chunk_size must be positive, got {chunk_size}.")
  if model.head != "lm":
    raise ValueError(f"token_logps needs an LM-head model, got head={model.head!r}.")
  check_vocab_limit(vocab_limit)
  _vocab_chunk(model, vocab_chunk)


def check_vocab_limit(vocab_limit: Optional[int]) -> None:
  """Raises ValueError unless `vocab_limit` is None or a positive (static) int."""
  if vocab_limit is not None and (isinstance(vocab_limit, bool)
                                  or not isinstance(vocab_limit, int) or vocab_limit < 1):
    raise ValueError(f"vocab_limit must be None or a positive int (the tokenizer's "
                     f"vocab_size), got {vocab_limit!r}")


def limit_vocab(logits: jax.Array, vocab_limit: Optional[int]) -> jax.Array:
  """`logits` [..., V] with ids >= `vocab_limit` set to -inf (unchanged when None or >= V).

  Equivalent to a softmax over the first `vocab_limit` ids; the shape (and any sharding
  of the vocabulary axis) is kept.
  """
  if vocab_limit is None or vocab_limit >= logits.shape[-1]:
    return logits
  ids = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
  return jnp.where(ids < vocab_limit, logits, -jnp.inf)


def logps_from_hidden(model, params, h, targets, *, chunk_size: int = 128,
                      vocab_limit: Optional[int] = None, vocab_chunk: Optional[int] = None,
                      vocab_mean: bool = False):
  """Log-prob and entropy of `targets` [B, n] under the LM head applied to `h` [B, n, D].

  The LM head and log-softmax run over chunks of `chunk_size` positions (each chunk
  rematerialised under autodiff when there are several), so the full [B, n, V] float32
  log-softmax is never materialised. With `vocab_limit`, over ids < vocab_limit only (a
  target >= vocab_limit has log-prob -inf). With `vocab_chunk` (module doc), each chunk of
  positions also streams over the vocabulary. Returns (logps [B, n], entropy [B, n]) float32;
  with `vocab_mean` also the vocabulary mean of the log-softmax at each position,
  mean_v log p_v = mean_v z_v − logsumexp(z) [B, n] (over the real vocabulary; ROVER's
  uniform-policy value), computed from the same logits (not with `vocab_chunk`).
  """
  check_vocab_limit(vocab_limit)
  vocab_chunk = _vocab_chunk(model, vocab_chunk)
  if vocab_mean and vocab_chunk is not None:
    raise ValueError("the vocabulary-mean log-prob (ROVER) is computed from whole logit rows; "
                     "it does not stream over vocabulary chunks: unset model.vocab_chunk")
  if vocab_chunk is not None:  # one custom VJP over position and vocabulary chunks
    kernel, tied = lm_kernel(model, params)
    return stream_logps(h, kernel, targets, tied=tied, vocab_chunk=vocab_chunk,
                        vocab_limit=vocab_limit, seq_chunk=chunk_size)
  b, n, d = h.shape
  c = min(chunk_size, n)
  n_chunks = -(-n // c)
  pad = n_chunks * c - n
  h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
  targets = jnp.pad(targets, ((0, 0), (0, pad)))
  h_chunks = h.reshape(b, n_chunks, c, d).swapaxes(0, 1)
  t_chunks = targets.reshape(b, n_chunks, c).swapaxes(0, 1)

  def one(args):
    hc, tc = args
    logits = model.logits_from_hidden(params, hc).astype(jnp.float32)
    extra = ()
    if vocab_limit is not None and vocab_limit < logits.shape[-1]:
      masked = limit_vocab(logits, vocab_limit)  # -inf beyond the real vocabulary
      logz = jax.nn.logsumexp(masked, axis=-1)
      picked = jnp.take_along_axis(masked, tc[..., None], axis=-1)[..., 0]
      probs = jnp.exp(masked - logz[..., None])  # 0 beyond it (no 0 * -inf below)
      ent = logz - jnp.sum(probs * jnp.where(jnp.isfinite(masked), logits, 0.0), axis=-1)
      if vocab_mean:
        extra = (jnp.mean(logits[..., :vocab_limit], axis=-1) - logz,)
      return (picked - logz, ent) + extra
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, tc[..., None], axis=-1)[..., 0]
    probs = jnp.exp(logits - logz[..., None])
    ent = logz - jnp.sum(probs * logits, axis=-1)
    if vocab_mean:
      extra = (jnp.mean(logits, axis=-1) - logz,)
    return (picked - logz, ent) + extra

  if n_chunks == 1:  # one chunk holds no more than the loop would: no loop, no recompute
    outs = jax.tree.map(lambda x: x[None], one((h_chunks[0], t_chunks[0])))
  else:
    outs = jax.lax.map(jax.checkpoint(one), (h_chunks, t_chunks))
  return tuple(x.swapaxes(0, 1).reshape(b, -1)[:, :n] for x in outs)


def token_logps(model, params, input_ids, attention_mask=None, *, chunk_size: int = 128,
                vocab_limit: Optional[int] = None, vocab_chunk: Optional[int] = None,
                vocab_mean: bool = False):
  """Per-token log-probs and entropies of `input_ids` under an LM-head model.

  logps[:, t] = log p(input_ids[:, t] | input_ids[:, :t]) for t >= 1, logps[:, 0] = 0;
  entropy[:, t] = -sum_v p_v log p_v of the same next-token distribution
  (entropy[:, 0] = 0). The LM head and log-softmax run over chunks of
  `chunk_size` positions (see `logps_from_hidden`); with `vocab_limit`, over the real
  vocabulary only; with `vocab_chunk`, also over vocabulary chunks (module doc).

  Args:
    input_ids: int [B, T]. attention_mask: [B, T] (1 = real token).
  Returns:
    (logps [B, T] float32, entropy [B, T] float32), and with `vocab_mean` the vocabulary
    mean of the log-softmax [B, T] (0 at position 0; see `logps_from_hidden`). Callers apply
    their own mask.
  """
  _check_lm(model, chunk_size, vocab_limit, vocab_chunk)
  input_ids = jnp.asarray(input_ids)
  if attention_mask is None:
    attention_mask = jnp.ones_like(input_ids)
  h = model.hidden(params, input_ids, attention_mask)  # [B, T, D]
  b, t, _ = h.shape
  if t < 2:
    z = jnp.zeros((b, t), jnp.float32)
    return (z, z, z) if vocab_mean else (z, z)
  outs = logps_from_hidden(model, params, h[:, :-1], input_ids[:, 1:], chunk_size=chunk_size,
                           vocab_limit=vocab_limit, vocab_chunk=vocab_chunk,
                           vocab_mean=vocab_mean)
  zero = jnp.zeros((b, 1), jnp.float32)
  return tuple(jnp.concatenate([zero, x], 1) for x in outs)


def _after(ids: jax.Array, dep: jax.Array) -> jax.Array:
  """`ids` [B, P] unchanged, but computed from `dep` [B * G, T] (bool; row r = i * G + g
  belongs to prompt i): row i of `ids` depends on its own G rows only, so no data moves
  between devices that hold different groups.

  The prompt pass of `completion_logps` needs only the prompts, so a scheduler may run it
  (and hold its full-length KV cache) before the completions exist: within a fused step,
  through the whole decode loop of the sampler. A data dependence keeps it after; XLA's CPU
  pipeline drops `lax.optimization_barrier`'s ordering, and a count (< 2**31) shifted right
  by 31 bits is 0 without XLA knowing it.
  """
  count = jnp.sum(dep.reshape(ids.shape[0], -1), axis=1, dtype=jnp.int32)
  return ids + jnp.right_shift(count, 31).astype(ids.dtype)[:, None]


def completion_logps(model, params, prompt_ids, prompt_mask, completion_ids, completion_mask,
                     *, group_size: int, chunk_size: int = 128,
                     vocab_limit: Optional[int] = None, vocab_chunk: Optional[int] = None,
                     vocab_mean: bool = False):
  """Log-probs and entropies of completions that share their prompt within groups of G.

  Row r = i * G + g of `completion_ids` continues prompt i. Each prompt runs through the
  model once; its keys/values are repeated for the G completions, which then run with the
  prompt as their KV cache. Equal to `token_logps` of the concatenated
  [prompt, completion] rows restricted to the completion positions (gradients included:
  the prompt's share flows back through the repeated cache), with (G - 1) / G fewer prompt
  tokens processed.

  Args:
    prompt_ids, prompt_mask: [B, P], left-padded (real tokens at the right end, as the
      sampler returns them), every row with >= 1 real token.
    completion_ids, completion_mask: [B * G, T].
    vocab_limit: log-softmax over ids < vocab_limit only (module doc).
    vocab_chunk: stream the LM head over chunks of this many ids (module doc).
  Returns:
    (logps [B * G, T], entropy [B * G, T]) float32, and with `vocab_mean` the vocabulary
    mean of the log-softmax [B * G, T]; callers apply `completion_mask`.
  """
  _check_lm(model, chunk_size, vocab_limit, vocab_chunk)
  b, p = prompt_ids.shape
  n, t = completion_ids.shape
  if n != b * group_size:
    raise ValueError(f"completion_logps: {n} completion rows != {b} prompts x group_size "
                     f"{group_size}.")
  pmask = prompt_mask.astype(bool)
  cmask = completion_mask.astype(bool)
  prompt_ids = _after(prompt_ids, cmask)
  # h_last predicts completion token 0; the cache holds each prompt for its G rows.
  h_last, cache = prefill_groups(model, params, prompt_ids, pmask, extra_slots=t,
                                 group_size=group_size)
  if t > 1:
    start = jnp.repeat(jnp.sum(pmask, axis=1, dtype=jnp.int32), group_size)
    positions = start[:, None] + jnp.arange(t - 1, dtype=jnp.int32)[None, :]
    kv = jnp.concatenate([jnp.repeat(pmask, group_size, axis=0), cmask], axis=1)
    h_comp, _ = model.decode_hidden(params, completion_ids[:, :-1], positions, cache,
                                    write_index=p, kv_mask=kv)
    h_last = jnp.concatenate([h_last, h_comp], axis=1)
  return logps_from_hidden(model, params, h_last, completion_ids, chunk_size=chunk_size,
                           vocab_limit=vocab_limit, vocab_chunk=vocab_chunk,
                           vocab_mean=vocab_mean)
