"""Placing a train state and its batches on a mesh (`config.mesh`), for both loops."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import models as models_lib
from rlhf_jax import sharding as sharding_lib


def host_arrays(batch):
  """The numeric numpy fields of a host batch (strings and object columns dropped)."""
  return {k: v for k, v in batch.items() if isinstance(v, np.ndarray) and v.dtype != object}


def fetch(tree):
  """Host copy of a (possibly multi-process) array tree."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return multihost_utils.process_allgather(tree, tiled=True)
  return jax.device_get(tree)


def state_shardings(state, mesh, rules=None):
  """NamedShardings for a train state (`RLState`, `OfflineState`, ...) on `mesh`.

  The logical-axis rules (`rlhf_jax.sharding.DEFAULT_RULES` by default) are applied to
  `jax.eval_shape` of the state: parameters, wherever they sit (policy, reference, value,
  optimiser moments), follow their logical axes; everything else is replicated.
  """
  abstract = jax.eval_shape(lambda s: s, state)
  return sharding_lib.tree_shardings(abstract, mesh, models_lib.axes_for_path,
                                     sharding_lib.DEFAULT_RULES if rules is None else rules)


def placement(config, model, state):
  """(put_state, put_batch, out_shardings) for `config.mesh`; identity without a mesh.

  With `config.mesh = {"data": -1, "fsdp": 1, "tensor": 1}` the state is placed by
  the logical-axis rules (`state_shardings`) and each batch is a global
  array over data x fsdp; every process materialises only its own shards, so the
  same code runs on one device, a multi-device host, or several processes.
  """
  mesh_cfg = config.get("mesh")
  if not mesh_cfg:
    return (lambda s: s), (lambda b: {k: jnp.asarray(v) for k, v in b.items()}), None
  mesh = sharding_lib.make_mesh(**dict(mesh_cfg))
  del model  # parameters are found by their paths in the state
  shardings = state_shardings(state, mesh)

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
