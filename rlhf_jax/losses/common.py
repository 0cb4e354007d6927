"""Array helpers shared by every loss and estimator: masking, checks, groups."""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp


def masked_sum(x: jax.Array, mask: Optional[jax.Array], axis=None) -> jax.Array:
  """Sum of `x` where `mask` is true (all of `x` when `mask` is None)."""
  if mask is None:
    return jnp.sum(x, axis=axis)
  return jnp.sum(jnp.where(mask.astype(bool), x, 0.0), axis=axis)


def masked_mean(x: jax.Array, mask: Optional[jax.Array], axis=None) -> jax.Array:
  """Mean of `x` over entries where `mask` is true; 0 where nothing is unmasked."""
  if mask is None:
    return jnp.mean(x, axis=axis)
  count = jnp.sum(mask.astype(x.dtype), axis=axis)
  return masked_sum(x, mask, axis=axis) / jnp.maximum(count, 1.0)


def masked_var(x: jax.Array, mask: Optional[jax.Array], axis=None,
               unbiased: bool = False) -> jax.Array:
  """Variance of `x` over unmasked entries (population by default)."""
  mean = masked_mean(x, mask, axis=axis)
  mean_b = jnp.expand_dims(mean, axis) if axis is not None else mean
  sq = (x - mean_b) ** 2
  if not unbiased:
    return masked_mean(sq, mask, axis=axis)
  n = x.size if mask is None and axis is None else (
      jnp.sum(jnp.ones_like(x) if mask is None else mask.astype(x.dtype), axis=axis))
  return masked_sum(sq, mask, axis=axis) / jnp.maximum(n - 1, 1)


def next_step(x: jax.Array) -> jax.Array:
  """x_{t+1} along the last axis, with 0 after the last position."""
  return jnp.concatenate([x[..., 1:], jnp.zeros_like(x[..., :1])], axis=-1)


def check_rank(x, rank: int, name: str) -> None:
  """Raise a ValueError naming `name` unless `x` has rank `rank`."""
  if jnp.ndim(x) != rank:
    raise ValueError(f"{name} must have rank {rank}, got shape {jnp.shape(x)}")


def check_float(x, name: str) -> None:
  """Raise a ValueError naming `name` unless `x` is a floating-point array."""
  if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
    raise ValueError(f"{name} must be a floating-point array, got dtype {jnp.result_type(x)}")


def check_same_shape(arrays: Sequence, names: Sequence[str]) -> None:
  """Raise a ValueError naming the arguments whose shapes differ."""
  shapes = [jnp.shape(a) for a in arrays]
  for a, n, s in zip(arrays, names, shapes):
    if a is not None and s != shapes[0]:
      raise ValueError(
          f"{n} has shape {s} but {names[0]} has shape {shapes[0]}; they must match")


def check_inputs(*, rank: Optional[int] = None, floats: bool = True, **arrays) -> None:
  """Check that all non-None `arrays` share a shape (and rank), and are floats.

  Example: `check_inputs(rank=1, chosen_logps=c, rejected_logps=r)`.
  """
  items = [(n, a) for n, a in arrays.items() if a is not None]
  if not items:
    return
  first_name, first = items[0]
  for n, a in items:
    if rank is not None:
      check_rank(a, rank, n)
    if floats:
      check_float(a, n)
    if jnp.shape(a) != jnp.shape(first):
      raise ValueError(
          f"{n} has shape {jnp.shape(a)} but {first_name} has shape "
          f"{jnp.shape(first)}; they must match")


def check_range(method: str, name: str, value, ok, want: str) -> None:
  """Range-checks a scalar hyper-parameter when it is concrete: ValueError naming the method,
  the parameter and the allowed range. Traced values (e.g. a schedule inside a jitted step),
  arrays and None pass."""
  if value is None or isinstance(value, jax.core.Tracer) or jnp.ndim(value) != 0:
    return
  if not ok(float(value)):
    raise ValueError(f"{method}: {name} must be {want}, got {value}")


def check_positive(method: str, **values) -> None:
  """`check_range` with value > 0 for every keyword (scales, temperatures, step sizes)."""
  for name, value in values.items():
    check_range(method, name, value, lambda v: v > 0, "> 0")


def check_nonnegative(method: str, **values) -> None:
  """`check_range` with value >= 0 for every keyword (weights, coefficients, clip widths)."""
  for name, value in values.items():
    check_range(method, name, value, lambda v: v >= 0, ">= 0")


def check_unit_interval(method: str, **values) -> None:
  """`check_range` with value in [0, 1] for every keyword (discounts, mixture weights)."""
  for name, value in values.items():
    check_range(method, name, value, lambda v: 0 <= v <= 1, "in [0, 1]")


def check_group_size(n: int, group_size: int, name: str = "rewards") -> None:
  """Raise a clear ValueError unless `group_size` divides `n`."""
  if not isinstance(group_size, int) or group_size < 1:
    raise ValueError(f"group_size must be a positive int, got {group_size!r}")
  if n % group_size:
    raise ValueError(
        f"group_size={group_size} does not divide the {n} entries of {name}; "
        f"pass prompts x group_size entries with each group contiguous")


def grouped(x: jax.Array, group_size: int, name: str = "rewards") -> jax.Array:
  """Reshape `[N, ...]` (groups contiguous) to `[N // G, G, ...]` with a checked G."""
  check_group_size(x.shape[0], group_size, name)
  return x.reshape((x.shape[0] // group_size, group_size) + x.shape[1:])


def log_sigmoid(x: jax.Array) -> jax.Array:
  """Numerically stable log σ(x) (finite for |x| up to float max)."""
  return jax.nn.log_sigmoid(x)
