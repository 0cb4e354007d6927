"""Shared utilities for advantage estimators: checked group views and statistics."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from rlhf_jax.losses.common import check_float, check_rank, grouped, masked_mean


def group_view(rewards: jax.Array, group_size: int, name: str = "rewards") -> jax.Array:
  """Checks `rewards [N]` (float, groups contiguous) and returns `[N // G, G]`."""
  check_rank(rewards, 1, name)
  check_float(rewards, name)
  return grouped(rewards, group_size, name)


def group_mean(r: jax.Array) -> jax.Array:
  """Mean over the last axis, kept for broadcasting: `[P, G] -> [P, 1]`."""
  return jnp.mean(r, axis=-1, keepdims=True)


def group_std(r: jax.Array, *, unbiased: bool = False) -> jax.Array:
  """Std over the last axis, kept for broadcasting (`ddof=1` when `unbiased`)."""
  g = r.shape[-1]
  if unbiased and g < 2:
    raise ValueError("group_size must be >= 2 for an unbiased std; use unbiased=False")
  centred = r - group_mean(r)
  return safe_sqrt(jnp.sum(centred ** 2, axis=-1, keepdims=True) / (g - 1 if unbiased else g))


def safe_sqrt(x: jax.Array) -> jax.Array:
  """√x for x ≥ 0 with a finite (zero) gradient at x = 0 (constant groups, single members)."""
  pos = x > 0
  return jnp.where(pos, jnp.sqrt(jnp.where(pos, x, 1.0)), 0.0)


def centred(r: jax.Array) -> jax.Array:
  """`r - mean_G r` computed so that an all-equal group gives exactly 0."""
  # Subtracting the first member before averaging makes constant groups exact zeros
  # (mean of zeros is zero) while leaving the value unchanged in exact arithmetic.
  shifted = r - r[..., :1]
  return shifted - jnp.mean(shifted, axis=-1, keepdims=True)


def masked_normalise(x: jax.Array, mask: jax.Array, axis, *, eps: float) -> jax.Array:
  """(x − mean) / (std + eps) over the masked elements of `axis` (population std), 0 where
  the mask is off; the statistics are kept for broadcasting. An all-off slice gives zeros."""
  keep = (lambda s: s) if axis is None else (lambda s: jnp.expand_dims(s, axis))
  m = mask.astype(bool)
  c = jnp.where(m, x - keep(masked_mean(x, m, axis=axis)), 0.0)
  return c / (keep(safe_sqrt(masked_mean(c ** 2, m, axis=axis))) + eps)


def safe_div(num: jax.Array, den: jax.Array, eps: float) -> jax.Array:
  """`num / (den + eps)`; the caller guarantees `num == 0` wherever `den == 0`."""
  return num / (den + eps)


def check_token_inputs(rewards, values: Optional[jax.Array], mask) -> None:
  """Check `[B, T]` token rewards with optional `values` and a `mask` of the same shape."""
  check_rank(rewards, 2, "rewards")
  check_float(rewards, "rewards")
  if values is not None:
    check_rank(values, 2, "values")
    if values.shape != rewards.shape:
      raise ValueError(f"values has shape {values.shape} but rewards has shape "
                       f"{rewards.shape}; they must match")
  check_rank(mask, 2, "mask")
  if mask.shape != rewards.shape:
    raise ValueError(f"mask has shape {mask.shape} but rewards has shape {rewards.shape}; "
                     "they must match")


def expand_to_tokens(adv: jax.Array, mask: Optional[jax.Array]) -> jax.Array:
  """Broadcast sequence advantages `[B]` over tokens `[B, T]` (zero where masked)."""
  if mask is None:
    return adv
  return jnp.where(mask.astype(bool), adv[:, None], 0.0)
