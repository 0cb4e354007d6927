"""The one step loop every online run uses (CLI, demo, experiments, benchmarks).

    state, done = run_steps(update, state, batches, rng, start=0, stop=steps,
                            on_step=lambda step, state, metrics, seconds: False)

`update(state, batch, rng) -> (state, metrics)` is the jitted step (e.g.
`online.make_update`); `batches` an iterator of host batches (numpy); `put_batch`
places each on the devices (default: `jnp.asarray` of the numeric fields); `on_step`
receives the step just completed (1-based), the new state, the metrics as host floats
(numpy arrays for a `vmap`ped step: one value per seed) and
the step's wall time, and returns True to stop early (e.g. after a preemption save).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.train.placement import fetch, host_arrays

OnStep = Callable[[int, Any, Dict[str, float], float], bool]


def default_put_batch(batch) -> Dict[str, jax.Array]:
  return {k: jnp.asarray(v) for k, v in host_arrays(batch).items()}


def _host(v):
  """A float for a scalar metric; a numpy array for stacked (per-seed) metrics."""
  v = np.asarray(v)
  return float(v) if v.ndim == 0 else v


def run_steps(update: Callable, state, batches: Iterator, rng: jax.Array, *, start: int,
              stop: int, put_batch: Optional[Callable] = None,
              on_step: Optional[OnStep] = None) -> Tuple[Any, int]:
  """Runs `update` for steps `start .. stop - 1`; returns (state, steps completed).

  Metrics come back to the host once per step (one transfer, after the step); the
  state stays on the devices.
  """
  put = default_put_batch if put_batch is None else put_batch
  step = start
  while step < stop:
    batch = put(host_arrays(next(batches)))
    t0 = time.time()
    state, metrics = update(state, batch, rng)
    metrics = {k: _host(v) for k, v in fetch(metrics).items()}
    seconds = time.time() - t0
    step += 1
    if on_step is not None and on_step(step, state, metrics, seconds):
      break
  return state, step
