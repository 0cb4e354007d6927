"""Classification targets for value/reward heads: HL-Gauss and two-hot.

A head outputs logits over `num_bins` bins covering [v_min, v_max]; the loss is
the cross-entropy to a target distribution built from the scalar target; the
scalar prediction is the expectation over bin centres (`bins_to_scalar`).
Optionally squash targets with the MuZero transform h(x) (`symmetric_sqrt`) and
map predictions back with its exact inverse (`inverse_symmetric_sqrt`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.special import ndtr

from rlhf_jax.losses.common import check_float, check_positive, check_rank
from rlhf_jax.losses.registry import register


class DistributionalExtras(NamedTuple):
  """targets: [B, num_bins] target distribution; predictions: [B] expected value."""
  targets: jax.Array
  predictions: jax.Array


def _check_support(v_min: float, v_max: float, num_bins: int) -> None:
  if not v_max > v_min:
    raise ValueError(f"v_max must be > v_min, got v_min={v_min}, v_max={v_max}")
  if not isinstance(num_bins, int) or num_bins < 2:
    raise ValueError(f"num_bins must be an int >= 2, got {num_bins!r}")


def hl_gauss_edges(*, v_min: float, v_max: float, num_bins: int) -> jax.Array:
  """Bin edges [num_bins + 1] of the HL-Gauss histogram on [v_min, v_max]."""
  _check_support(v_min, v_max, num_bins)
  return jnp.linspace(v_min, v_max, num_bins + 1)


def hl_gauss_centers(*, v_min: float, v_max: float, num_bins: int) -> jax.Array:
  """Bin centres [num_bins] of the HL-Gauss histogram."""
  e = hl_gauss_edges(v_min=v_min, v_max=v_max, num_bins=num_bins)
  return 0.5 * (e[1:] + e[:-1])


def hl_gauss_targets(values: jax.Array, *, v_min: float, v_max: float, num_bins: int,
                     sigma_ratio: float = 0.75) -> jax.Array:
  """Histogram of a Gaussian N(y, σ²) over the bins, renormalised to the support.

  p_i = [Φ((e_{i+1} − y)/σ) − Φ((e_i − y)/σ)] / [Φ((v_max − y)/σ) − Φ((v_min − y)/σ)],
  σ = sigma_ratio · bin width. "Stop Regressing: Training Value Functions via
  Classification for Scalable Deep RL" (Farebrother et al. 2024), σ/ς = 0.75.

  Args:
    values: [B] scalar targets y (clipped to [v_min, v_max]).

  Returns:
    [B, num_bins] probabilities.
  """
  check_rank(values, 1, "values")
  check_float(values, "values")
  check_positive("hl_gauss_targets", sigma_ratio=sigma_ratio)
  edges = hl_gauss_edges(v_min=v_min, v_max=v_max, num_bins=num_bins).astype(values.dtype)
  sigma = sigma_ratio * (v_max - v_min) / num_bins
  y = jnp.clip(values, v_min, v_max)[:, None]
  cdf = ndtr((edges[None, :] - y) / sigma)
  probs = cdf[:, 1:] - cdf[:, :-1]
  return probs / (cdf[:, -1:] - cdf[:, :1])


def two_hot_support(*, v_min: float, v_max: float, num_bins: int) -> jax.Array:
  """Atoms [num_bins] of the two-hot support (evenly spaced, ends included)."""
  _check_support(v_min, v_max, num_bins)
  return jnp.linspace(v_min, v_max, num_bins)


def two_hot_targets(values: jax.Array, *, v_min: float, v_max: float,
                    num_bins: int) -> jax.Array:
  """Two-hot encoding: mass on the two atoms bracketing y, linear in distance.

  With atoms z_i, z_i ≤ y ≤ z_{i+1}: p_i = (z_{i+1} − y)/Δ, p_{i+1} = (y − z_i)/Δ,
  so Σ p_i z_i = y exactly. "Mastering Atari, Go, Chess and Shogi by Planning
  with a Learned Model" (Schrittwieser et al. 2020); DreamerV3.

  Args:
    values: [B] targets (clipped to [v_min, v_max]).

  Returns:
    [B, num_bins] probabilities.
  """
  check_rank(values, 1, "values")
  check_float(values, "values")
  _check_support(v_min, v_max, num_bins)
  delta = (v_max - v_min) / (num_bins - 1)
  pos = (jnp.clip(values, v_min, v_max) - v_min) / delta
  lower = jnp.clip(jnp.floor(pos), 0, num_bins - 2)
  frac = pos - lower
  idx = jnp.arange(num_bins, dtype=values.dtype)[None, :]
  lower = lower[:, None]
  frac = frac[:, None]
  return jnp.where(idx == lower, 1.0 - frac, 0.0) + jnp.where(idx == lower + 1, frac, 0.0)


def bins_to_scalar(logits: jax.Array, support: jax.Array) -> jax.Array:
  """Inverse transform: expected value Σ_i softmax(logits)_i · support_i. [B, n] -> [B]."""
  check_rank(logits, 2, "logits")
  if support.shape != logits.shape[-1:]:
    raise ValueError(f"support has shape {support.shape}, expected ({logits.shape[-1]},)")
  return jnp.sum(jax.nn.softmax(logits, axis=-1) * support[None, :], axis=-1)


def symmetric_sqrt(x: jax.Array, *, eps: float = 1e-3) -> jax.Array:
  """MuZero value transform h(x) = sign(x)(√(|x|+1) − 1) + εx."""
  return jnp.sign(x) * (jnp.sqrt(jnp.abs(x) + 1.0) - 1.0) + eps * x


def inverse_symmetric_sqrt(y: jax.Array, *, eps: float = 1e-3) -> jax.Array:
  """Exact inverse of `symmetric_sqrt`:

  h⁻¹(y) = sign(y)·(((√(1 + 4ε(|y| + 1 + ε)) − 1)/(2ε))² − 1).
  """
  return jnp.sign(y) * (((jnp.sqrt(1.0 + 4.0 * eps * (jnp.abs(y) + 1.0 + eps)) - 1.0)
                         / (2.0 * eps)) ** 2 - 1.0)


def _cross_entropy(logits: jax.Array, targets: jax.Array, values: jax.Array) -> jax.Array:
  check_rank(logits, 2, "logits")
  check_float(logits, "logits")
  if logits.shape[0] != values.shape[0]:
    raise ValueError(f"logits has batch {logits.shape[0]} but values has {values.shape[0]}")
  return -jnp.sum(jax.lax.stop_gradient(targets) * jax.nn.log_softmax(logits, axis=-1), axis=-1)


@register("hl_gauss", family="reward_model")
def hl_gauss(logits: jax.Array, values: jax.Array, *, v_min: float, v_max: float,
             sigma_ratio: float = 0.75) -> tuple[jax.Array, DistributionalExtras]:
  """HL-Gauss classification loss for a value or reward head.

  ℓ = −Σ_i p_i(y) log softmax(logits)_i,  p = `hl_gauss_targets(y)`;
  prediction ŷ = Σ_i softmax(logits)_i · centre_i. "Stop Regressing"
  (Farebrother et al. 2024).

  Args:
    logits: [B, num_bins] head outputs.
    values: [B] scalar targets.
    v_min, v_max: support; sigma_ratio: σ / bin width.

  Returns:
    (losses [B], DistributionalExtras(targets [B, num_bins], predictions [B])).
  """
  num_bins = logits.shape[-1]
  targets = hl_gauss_targets(values, v_min=v_min, v_max=v_max, num_bins=num_bins,
                             sigma_ratio=sigma_ratio)
  losses = _cross_entropy(logits, targets, values)
  preds = bins_to_scalar(logits, hl_gauss_centers(v_min=v_min, v_max=v_max,
                                                  num_bins=num_bins).astype(logits.dtype))
  return losses, DistributionalExtras(targets, preds)


@register("two_hot", family="reward_model")
def two_hot(logits: jax.Array, values: jax.Array, *, v_min: float,
            v_max: float) -> tuple[jax.Array, DistributionalExtras]:
  """Two-hot classification loss: ℓ = −Σ_i p_i(y) log softmax(logits)_i.

  p = `two_hot_targets(y)`; prediction Σ_i softmax_i · z_i (atoms include the
  ends). Compose with `symmetric_sqrt` on targets and `inverse_symmetric_sqrt`
  on predictions for MuZero's scaled version. "Mastering Atari, Go, Chess and
  Shogi by Planning with a Learned Model" (Schrittwieser et al. 2020).

  Args:
    logits: [B, num_bins]; values: [B].

  Returns:
    (losses [B], DistributionalExtras).
  """
  num_bins = logits.shape[-1]
  targets = two_hot_targets(values, v_min=v_min, v_max=v_max, num_bins=num_bins)
  losses = _cross_entropy(logits, targets, values)
  preds = bins_to_scalar(logits, two_hot_support(v_min=v_min, v_max=v_max,
                                                 num_bins=num_bins).astype(logits.dtype))
  return losses, DistributionalExtras(targets, preds)
