"""How the reference policy of an RL run moves: fixed, synced every k updates, or an EMA.

Each is an `(init, update)` pair, like an optax transformation:
`init(params) -> ref_params` (a copy of the policy) and
`update(ref_params, params, step) -> ref_params`, where `params` are the policy after
update number `step` (1-based). DNO / online-iterative methods use a lagged
reference (`periodic_reference`); an EMA reference (`ema_reference`) follows the
policy smoothly: ref ← δ·ref + (1 − δ)·θ.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from rlhf_jax.losses.common import check_unit_interval


class ReferenceUpdate(NamedTuple):
  """An `(init, update)` pair: init(params) -> ref; update(ref, params, step) -> ref."""
  init: Callable[[Any], Any]
  update: Callable[[Any, Any, jax.Array], Any]


def _copy(params):
  return jax.tree.map(jnp.copy, params)


def fixed_reference() -> ReferenceUpdate:
  """The reference stays the initial policy."""
  return ReferenceUpdate(_copy, lambda ref, params, step: ref)


def periodic_reference(*, every: int) -> ReferenceUpdate:
  """ref ← θ after every `every`-th update (step % every == 0), else unchanged."""
  if not isinstance(every, int) or every < 1:
    raise ValueError(f"periodic_reference: every must be an int >= 1, got {every!r}")

  def update(ref, params, step):
    sync = jnp.asarray(step) % every == 0
    return jax.lax.cond(sync, lambda: jax.tree.map(lambda p, r: p.astype(r.dtype), params, ref),
                        lambda: ref)
  return ReferenceUpdate(_copy, update)


def ema_reference(*, decay: float) -> ReferenceUpdate:
  """ref ← δ·ref + (1 − δ)·θ after every update (δ = `decay`; 1 keeps it fixed, 0 copies θ)."""
  check_unit_interval("ema_reference", decay=decay)

  def update(ref, params, step):
    del step
    return jax.tree.map(lambda r, p: (decay * r + (1.0 - decay) * p).astype(r.dtype), ref,
                        params)
  return ReferenceUpdate(_copy, update)
