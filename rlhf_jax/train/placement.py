"""Placing a train state and its batches on a mesh (`config.mesh`), for both loops."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import sharding as sharding_lib
from rlhf_jax.train import online


def host_arrays(batch):
  """The numeric numpy fields of a host batch (strings and object columns dropped)."""
  return {k: v for k, v in batch.items() if isinstance(v, np.ndarray) and v.dtype != object}


def fetch(tree):
  """Host copy of a (possibly multi-process) array tree."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return multihost_utils.process_allgather(tree, tiled=True)
  return jax.device_get(tree)


def placement(config, model, state):
  """(put_state, put_batch, out_shardings) for `config.mesh`; identity without a mesh.

  With `config.mesh = {"data": -1, "fsdp": 1, "tensor": 1}` the state is placed by
  the model's logical axes (`online.state_shardings`) and each batch is a global
  array over data x fsdp; every process materialises only its own shards, so the
  same code runs on one device, a multi-device host, or several processes.
  """
  mesh_cfg = config.get("mesh")
  if not mesh_cfg:
    return (lambda s: s), (lambda b: {k: jnp.asarray(v) for k, v in b.items()}), None
  mesh = sharding_lib.make_mesh(**dict(mesh_cfg))
  shardings = online.state_shardings(state, model, mesh)

  def put_batch(batch):
    n = sharding_lib.batch_shard_count(mesh)
    out = {}
    for k, v in batch.items():
      if v.shape[0] % n:
        raise ValueError(f"batch field {k!r} has {v.shape[0]} rows, not divisible by "
                         f"mesh data x fsdp = {n}; set train.prompts_per_step to a multiple")
      out[k] = jax.make_array_from_callback(
          v.shape, sharding_lib.batch_sharding(mesh, v.ndim), lambda idx, v=v: v[idx])
    return out
  return (lambda s: jax.device_put(s, shardings)), put_batch, (shardings, None)
