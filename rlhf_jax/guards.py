"""Non-finite and loss-spike guards for train steps (pure, jit-safe).

Inside the jitted step::

  new_state = ...                                     # optimiser update
  bad = ~is_finite_tree((loss, grads))
  spike = is_loss_spike(guard_state, loss, k=6.0)     # optional
  state, skipped = apply_if_finite(new_state, state, loss, grads, extra_bad=spike)
  guard_state = nonfinite_update(guard_state, loss, skipped)

On the host, every few steps::

  check_consecutive(guard_state.consecutive, max_bad=10)
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


def is_finite_tree(tree) -> jax.Array:
  """Scalar bool: every inexact leaf of `tree` is finite (ints count as finite)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  if not leaves:
    return jnp.array(True)
  return jnp.all(jnp.stack(leaves))


def select_tree(pred, on_true, on_false):
  """`jnp.where(pred, a, b)` leafwise; `pred` is a scalar bool. Keys allowed."""
  def sel(a, b):
    if hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
      return jax.random.wrap_key_data(
          jnp.where(pred, jax.random.key_data(a), jax.random.key_data(b)),
          impl=jax.random.key_impl(a))
    return jnp.where(pred, a, b)
  return jax.tree.map(sel, on_true, on_false)


def apply_if_finite(new_state, old_state, loss, grads, *, extra_bad=False):
  """Keeps `old_state` when loss or grads are NaN/inf (or `extra_bad`).

  Args:
    new_state: state after the update (same structure as `old_state`).
    old_state: state before the update.
    loss: scalar (or any array) loss.
    grads: gradient pytree.
    extra_bad: optional scalar bool forcing a skip (e.g. a loss spike).

  Returns:
    (state, skipped) with `skipped` a scalar bool array.
  """
  if jax.tree.structure(new_state) != jax.tree.structure(old_state):
    raise ValueError("apply_if_finite: new_state and old_state must have the "
                     "same pytree structure; got "
                     f"{jax.tree.structure(new_state)} vs {jax.tree.structure(old_state)}.")
  skipped = jnp.logical_or(~is_finite_tree((loss, grads)),
                           jnp.asarray(extra_bad, bool))
  return select_tree(skipped, old_state, new_state), skipped


class NonFiniteState(NamedTuple):
  """Counters of skipped steps and a running window of accepted losses."""
  consecutive: jax.Array   # int32 scalar: bad steps in a row
  total: jax.Array         # int32 scalar: bad steps overall
  window: jax.Array        # f32 [W]: last accepted losses (ring buffer)
  count: jax.Array         # int32 scalar: accepted losses seen (for warm-up)


def nonfinite_init(window: int = 0) -> NonFiniteState:
  """Initial counters; `window` > 0 enables loss-spike detection."""
  if window < 0:
    raise ValueError(f"nonfinite_init: window={window} must be >= 0.")
  z = jnp.zeros((), jnp.int32)
  return NonFiniteState(z, z, jnp.zeros((window,), jnp.float32), z)


def nonfinite_update(state: NonFiniteState, loss, skipped) -> NonFiniteState:
  """Updates counters; accepted (finite, not skipped) losses enter the window."""
  skipped = jnp.asarray(skipped, bool)
  one = jnp.ones((), jnp.int32)
  consecutive = jnp.where(skipped, state.consecutive + one, 0)
  total = state.total + skipped.astype(jnp.int32)
  w = state.window.shape[0]
  if w == 0:
    return NonFiniteState(consecutive, total, state.window, state.count)
  loss = jnp.asarray(loss, jnp.float32).reshape(())
  slot = state.count % w
  window = jnp.where(skipped, state.window, state.window.at[slot].set(loss))
  count = state.count + (~skipped).astype(jnp.int32)
  return NonFiniteState(consecutive, total, window, count)


def is_loss_spike(state: NonFiniteState, loss, *, k: float = 6.0,
                  min_count: int | None = None) -> jax.Array:
  """True when loss > mean + k·std of the window (after it is full).

  The window holds the last W accepted losses; detection starts once
  `min_count` (default W) losses were accepted. Non-finite losses are not
  spikes here (`apply_if_finite` handles them). W = 0 disables detection.
  """
  w = state.window.shape[0]
  if w == 0:
    return jnp.array(False)
  min_count = w if min_count is None else min_count
  if not 2 <= min_count <= w:
    raise ValueError(f"is_loss_spike: min_count={min_count} must be in [2, window={w}].")
  n = jnp.minimum(state.count, w)
  valid = jnp.arange(w) < n
  nf = jnp.maximum(n, 1).astype(jnp.float32)
  mean = jnp.sum(jnp.where(valid, state.window, 0.0)) / nf
  var = jnp.sum(jnp.where(valid, (state.window - mean) ** 2, 0.0)) / nf
  loss = jnp.asarray(loss, jnp.float32).reshape(())
  return (state.count >= min_count) & jnp.isfinite(loss) & (
      loss > mean + k * jnp.sqrt(var))


nonfinite_counter = (nonfinite_init, nonfinite_update)


def check_consecutive(count, max_bad: int) -> None:
  """Host-side: raises RuntimeError after `max_bad` consecutive bad steps."""
  if max_bad < 1:
    raise ValueError(f"check_consecutive: max_bad={max_bad} must be >= 1.")
  c = int(np.asarray(jax.device_get(count)))
  if c >= max_bad:
    raise RuntimeError(
        f"{c} consecutive train steps were skipped (non-finite loss/gradients or "
        f"loss spikes; limit max_bad={max_bad}). Lower the learning rate, check the "
        "data for bad examples, or restore an earlier checkpoint.")
