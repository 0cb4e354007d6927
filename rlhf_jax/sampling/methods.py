"""Token-selection methods: greedy and truncated (temperature / top-k / top-p) sampling.

Each method is a small frozen object with `get_next_tokens(logits, rng)` returning the
chosen tokens and their log-probability under the distribution actually sampled from
(the temperature-scaled, truncated and renormalised one). These are pure functions of
their inputs and run unchanged under `jit`, `vmap` and sharded batches.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Tuple

import jax
import jax.numpy as jnp


def _check_logits(logits: jax.Array) -> None:
  if logits.ndim != 2:
    raise ValueError(f"`logits` must have shape [B, V], got shape {logits.shape}")


def cumsum_last(x: jax.Array, *, max_blocked: int = 4096) -> jax.Array:
  """Cumulative sum over the last axis of a float32 [..., V] array.

  For V <= `max_blocked` it runs as two small triangular matmuls over sqrt(V)-sized blocks
  (within-block sums, then block offsets): a handful of ops, where XLA's cumsum becomes
  ~2 log2(V) ops per call, which dominates a sampler step at small model sizes. Longer
  axes use `jnp.cumsum`.
  """
  v = x.shape[-1]
  if v > max_blocked:
    return jnp.cumsum(x, axis=-1)
  k = max(1, math.isqrt(v - 1) + 1)
  nb = -(-v // k)
  xb = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, nb * k - v)]).reshape(x.shape[:-1] + (nb, k))
  hi = jax.lax.Precision.HIGHEST
  incl = jnp.triu(jnp.ones((k, k), x.dtype))            # incl[j, i] = 1 if j <= i
  excl = jnp.triu(jnp.ones((nb, nb), x.dtype), k=1)     # excl[c, b] = 1 if c < b
  within = jnp.matmul(xb, incl, precision=hi)
  offsets = jnp.matmul(within[..., -1], excl, precision=hi)
  cdf = within + offsets[..., None]
  return cdf.reshape(x.shape[:-1] + (nb * k,))[..., :v]


@dataclasses.dataclass(frozen=True)
class Greedy:
  """Arg-max decoding. The sampled distribution is a point mass, so its log-prob is 0."""

  def log_probs(self, logits: jax.Array) -> jax.Array:
    """Log of the point mass at the arg-max: 0 there, -inf elsewhere. Shape [B, V]."""
    _check_logits(logits)
    best = jnp.argmax(logits, axis=-1)
    onehot = jax.nn.one_hot(best, logits.shape[-1], dtype=bool)
    return jnp.where(onehot, 0.0, -jnp.inf).astype(jnp.float32)

  def get_next_tokens(self, logits: jax.Array, rng: Optional[jax.Array] = None
                      ) -> Tuple[jax.Array, jax.Array]:
    """`(tokens [B] int32, sampling_logps [B] = 0)`; `rng` is ignored."""
    del rng
    return self.select(logits, None)

  def select(self, logits: jax.Array, uniforms: Optional[jax.Array] = None
             ) -> Tuple[jax.Array, jax.Array]:
    """Same as `get_next_tokens`; `uniforms` is ignored."""
    del uniforms
    _check_logits(logits)
    tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return tokens, jnp.zeros(tokens.shape, jnp.float32)


@dataclasses.dataclass(frozen=True)
class Truncated:
  """Sample from softmax(logits / temperature) restricted to top-k, then top-p, renormalised.

  Order (as in transformers' logits warpers): scale by 1/temperature; keep the `top_k`
  highest-scoring tokens (ties broken by token id, lowest first); of those, keep the
  smallest prefix (by decreasing probability under the renormalised top-k distribution)
  whose probability mass reaches `top_p` -- i.e. token j of the sorted list is kept iff
  the mass of the tokens ranked before it is < top_p (the first is always kept).
  The sampled distribution is

    q(v) = exp(l_v / tau) 1[v in S] / sum_{u in S} exp(l_u / tau),

  and `sampling_logps` are log q(chosen token). `top_k=None` and `top_p=None` (or 1.0)
  disable the respective truncation.

  `rng` is either one key (used for the whole batch) or a batch of keys [B] (one per row,
  so that each row's draw does not depend on the other rows).
  """

  temperature: float = 1.0
  top_k: Optional[int] = None
  top_p: Optional[float] = None

  def __post_init__(self):
    if not self.temperature > 0:
      raise ValueError(f"`temperature` must be > 0 for sampling (use Greedy / temperature=0 "
                       f"for arg-max), got {self.temperature}")
    if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
      raise ValueError(f"`top_k` must be a positive int or None (no truncation), got {self.top_k!r}")
    if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"`top_p` must be in (0, 1] or None (no truncation), got {self.top_p!r}")

  def _sorted_log_probs(self, logits: jax.Array) -> Tuple[jax.Array, Optional[jax.Array]]:
    """Log q over the candidate tokens: `(logq [B, K], token_ids [B, K] or None for all V)`."""
    _check_logits(logits)
    vocab = logits.shape[-1]
    scaled = logits.astype(jnp.float32) / jnp.float32(self.temperature)
    use_top_p = self.top_p is not None and self.top_p < 1.0
    k = vocab if self.top_k is None else min(self.top_k, vocab)
    if k == vocab and not use_top_p:
      return jax.nn.log_softmax(scaled, axis=-1), None
    # lax.top_k returns values sorted in decreasing order; equal values keep index order.
    vals, ids = jax.lax.top_k(scaled, k)
    logq = jax.nn.log_softmax(vals, axis=-1)
    if use_top_p:
      probs = jnp.exp(logq)
      mass_before = jnp.cumsum(probs, axis=-1) - probs
      keep = mass_before < jnp.float32(self.top_p)
      keep = keep.at[:, 0].set(True)
      logq = jax.nn.log_softmax(jnp.where(keep, vals, -jnp.inf), axis=-1)
    return logq, ids.astype(jnp.int32)

  def log_probs(self, logits: jax.Array) -> jax.Array:
    """Log of the sampled distribution q over the full vocabulary (-inf outside S). [B, V]."""
    logq, ids = self._sorted_log_probs(logits)
    if ids is None:
      return logq
    out = jnp.full(logits.shape, -jnp.inf, jnp.float32)
    rows = jnp.arange(logits.shape[0])[:, None]
    return out.at[rows, ids].set(logq)

  def get_next_tokens(self, logits: jax.Array, rng: jax.Array) -> Tuple[jax.Array, jax.Array]:
    """Draw one token per row: `(tokens [B] int32, sampling_logps [B] float32)`.

    Draws one uniform per row from `rng` and calls `select`.
    """
    _check_logits(logits)
    batch = logits.shape[0]
    typed = jnp.issubdtype(rng.dtype, jax.dtypes.prng_key)
    if rng.ndim == (0 if typed else 1):
      u = jax.random.uniform(rng, (batch,), jnp.float32)
    else:
      if rng.shape[0] != batch:
        raise ValueError(f"`rng` must be one key or one key per row ({batch}), got shape {rng.shape}")
      u = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(rng)
    return self.select(logits, u)

  def select(self, logits: jax.Array, uniforms: jax.Array) -> Tuple[jax.Array, jax.Array]:
    """Inverse-CDF draw: row b takes the first candidate whose cumulative q exceeds u_b.

    With u ~ U[0, 1) this draws exactly from q (one uniform per row, so a sampler can
    draw all its randomness before the decode loop). Candidates with q = 0 are never
    chosen. Args: logits [B, V]; uniforms [B] in [0, 1). Returns `(tokens, sampling_logps)`.
    """
    logq, ids = self._sorted_log_probs(logits)
    if uniforms.shape != logits.shape[:1]:
      raise ValueError(f"`uniforms` must have shape [B] = {logits.shape[:1]}, got {uniforms.shape}")
    probs = jnp.exp(logq)
    cdf = cumsum_last(probs)
    target = uniforms.astype(jnp.float32)[:, None] * cdf[:, -1:]
    choice = jnp.sum(cdf <= target, axis=-1, dtype=jnp.int32)
    # Rounding can push the target onto the last cumulative value: fall back to the last
    # candidate with non-zero probability.
    k = logq.shape[-1]
    last = k - 1 - jnp.argmax((probs > 0)[:, ::-1], axis=-1).astype(jnp.int32)
    choice = jnp.minimum(choice, last)
    slogp = jnp.take_along_axis(logq, choice[:, None], axis=-1)[:, 0]
    tokens = choice if ids is None else jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0]
    return tokens, slogp

  @property
  def is_plain(self) -> bool:
    """True when q is the model's own softmax (temperature 1, no truncation)."""
    return self.temperature == 1.0 and self.top_k is None and self.top_p in (None, 1.0)


def make_method(*, temperature: float, top_k: Optional[int] = None,
                top_p: Optional[float] = None):
  """`Greedy()` when `temperature == 0`, else `Truncated(temperature, top_k, top_p)`."""
  if temperature == 0:
    return Greedy()
  return Truncated(temperature=temperature, top_k=top_k, top_p=top_p)
