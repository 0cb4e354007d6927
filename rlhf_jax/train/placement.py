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


def batch_key(config) -> str:
  """The config key of one step's batch rows: `train.prompts_per_step` (online loop) or
  `train.batch_size` (offline loops)."""
  train = config.get("train") or {}
  return "train.prompts_per_step" if "prompts_per_step" in train else "train.batch_size"


def mesh_of(config):
  """The mesh of `config.mesh` (None without one); a bad shape names `config.mesh`."""
  mesh_cfg = config.get("mesh")
  if not mesh_cfg:
    return None
  mesh_cfg = dict(mesh_cfg.to_dict() if hasattr(mesh_cfg, "to_dict") else mesh_cfg)
  try:
    return sharding_lib.make_mesh(**mesh_cfg)
  except ValueError as e:
    raise ValueError(f"config.mesh={mesh_cfg}: {e}") from None


def check_batch_size(config, key: str | None = None) -> None:
  """Raises ValueError (before anything is built on the mesh) when one step's batch rows,
  `config[key]` (default `batch_key(config)`), do not divide over the mesh's data x fsdp
  devices, or when `config.mesh` does not fit the devices."""
  mesh = mesh_of(config)
  if mesh is None:
    return
  key = key or batch_key(config)
  section, name = key.split(".")
  rows = int(config[section][name])
  n = sharding_lib.batch_shard_count(mesh)
  if rows % n:
    raise ValueError(f"{key}={rows} is not divisible by the mesh's data x fsdp = {n} devices "
                     f"(config.mesh={dict(mesh.shape)}); set {key} to a multiple of {n}")


def global_batch(batch, sharding_of):
  """Each host array of `batch` as a global array with sharding `sharding_of(array)`; every
  process materialises only its own shards."""
  return {k: jax.make_array_from_callback(v.shape, sharding_of(v), lambda idx, v=v: v[idx])
          for k, v in batch.items()}


def placement(config, model, state, *, batch_key_name: str | None = None):
  """(put_state, put_batch, out_shardings) for `config.mesh`; identity without a mesh.

  With `config.mesh = {"data": -1, "fsdp": 1, "tensor": 1}` the state is placed by
  the logical-axis rules (`state_shardings`) and each batch is a global
  array over data x fsdp; every process materialises only its own shards, so the
  same code runs on one device, a multi-device host, or several processes.
  `batch_key_name` is the config key that sets the batch rows, named when they do not
  divide (default `batch_key(config)`).
  """
  mesh = mesh_of(config)
  if mesh is None:
    return (lambda s: s), (lambda b: {k: jnp.asarray(v) for k, v in b.items()}), None
  del model  # parameters are found by their paths in the state
  shardings = state_shardings(state, mesh)
  key = batch_key_name or batch_key(config)

  def put_batch(batch):
    n = sharding_lib.batch_shard_count(mesh)
    for k, v in batch.items():
      if v.shape[0] % n:
        raise ValueError(f"batch field {k!r} has {v.shape[0]} rows, not divisible by "
                         f"mesh data x fsdp = {n}; set {key} to a multiple of {n}")
    return global_batch(batch, lambda v: sharding_lib.batch_sharding(mesh, v.ndim))
  return (lambda s: jax.device_put(s, shardings)), put_batch, (shardings, None)
