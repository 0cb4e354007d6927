"""Token-loss aggregation, with a global normaliser for micro-batch-invariant losses.

Modes (B sequences, mask m, per-token loss ℓ):
  token_mean              Σ_{b,t} m ℓ / Σ_{b,t} m                       (DAPO)
  seq_mean_token_mean     (1/B) Σ_b [Σ_t m ℓ / Σ_t m]                   (GRPO)
  seq_mean_token_sum      (1/B) Σ_b Σ_t m ℓ
  seq_mean_token_sum_norm Σ_{b,t} m ℓ / (B·L_max)  (Dr. GRPO: Σ/(G·L_max) per group)
The numerator is additive over sequences; pass `normalizer=global_normalizer(
full_mask, mode=...)` computed once over the full batch to every micro-batch so
that Σ_micro aggregate(micro) == aggregate(full batch), whatever the split.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from rlhf_jax.losses.common import check_rank

MODES = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm")


def _check(per_token, mask, mode):
  check_rank(per_token, 2, "per_token")
  if mask.shape != per_token.shape:
    raise ValueError(f"mask has shape {mask.shape} but per_token has {per_token.shape}")
  if mode not in MODES:
    raise ValueError(f"mode={mode!r} is not one of {', '.join(MODES)}")


def _numerator(per_token, mask, mode):
  m = mask.astype(per_token.dtype)
  masked = jnp.where(m > 0, per_token, 0.0)
  if mode == "seq_mean_token_mean":
    return jnp.sum(jnp.sum(masked, axis=-1) / jnp.maximum(jnp.sum(m, axis=-1), 1.0))
  return jnp.sum(masked)


def global_normalizer(mask, *, mode: str, max_len: Optional[int] = None,
                      num_groups: Optional[int] = None) -> jax.Array:
  """The denominator of `aggregate` for the FULL batch (compute once, share across micro-batches).

  token_mean: Σ m;  seq_mean_*: B;  seq_mean_token_sum_norm: B·L_max, with
  L_max = `max_len` (default T) and, when `num_groups` is given, B = num_groups·G.
  """
  check_rank(mask, 2, "mask")
  if mode not in MODES:
    raise ValueError(f"mode={mode!r} is not one of {', '.join(MODES)}")
  b, t = mask.shape
  if mode == "token_mean":
    return jnp.maximum(jnp.sum(mask.astype(jnp.result_type(float))), 1.0)
  if num_groups is not None and (num_groups < 1 or b % num_groups):
    raise ValueError(f"num_groups={num_groups} must divide the batch of {b} sequences")
  if mode == "seq_mean_token_sum_norm":
    length = t if max_len is None else max_len
    if length < 1:
      raise ValueError(f"max_len must be >= 1, got {max_len}")
    return jnp.asarray(float(b * length))
  return jnp.asarray(float(b))


def aggregate(per_token, mask, *, mode: str, max_len: Optional[int] = None,
              num_groups: Optional[int] = None, normalizer=None) -> jax.Array:
  """Reduce a per-token loss `[B, T]` to a scalar (see the module docstring for modes).

  `normalizer`: the denominator computed by `global_normalizer` over the full
  batch; when given, the result is this micro-batch's exact share of the full
  batch's loss (summing the shares gives the full-batch loss and gradient).
  Shapes: per_token, mask [B, T] -> [].
  """
  _check(per_token, mask, mode)
  if normalizer is None:
    normalizer = global_normalizer(mask, mode=mode, max_len=max_len, num_groups=num_groups)
  return _numerator(per_token, mask, mode) / jax.lax.stop_gradient(normalizer)
