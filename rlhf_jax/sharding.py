"""Device meshes, logical-axis sharding rules and batch placement.

Parameters carry *logical* axis names (see `rlhf_jax.models`: "layers", "vocab",
"embed", "heads", "kv_heads", "head_dim", "mlp", "norm", None). Rules map each
logical name to a mesh axis (or a tuple of mesh axes, or None = replicated).
Rules are plain data so configs can carry them; regex overrides over parameter
paths handle special cases.

Typical use::

  mesh = make_mesh(data=-1, fsdp=2, tensor=1)
  shardings = state_shardings(init_fn, mesh, logical_axes_fn=..., rng)
  state = jax.jit(init_fn, out_shardings=shardings)(rng)
  batch = shard_batch(batch, mesh)
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

MeshAxis = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxis], ...]

DEFAULT_RULES: Rules = (
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("layers", None),
    ("head_dim", None),
    ("norm", None),
    ("batch", BATCH_AXES),
)


# ------------------------------------------------------------------ meshes


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, *,
              devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """Builds a ("data", "fsdp", "tensor") mesh with Auto axis types.

  Args:
    data: size of the data-parallel axis; -1 means "all remaining devices".
    fsdp: size of the parameter-sharding (ZeRO-3 style) axis; -1 allowed.
    tensor: size of the tensor-parallel axis; -1 allowed.
    devices: devices to use (default: all of `jax.devices()`).

  Raises:
    ValueError: naming the axis sizes and the device count when they do not
      multiply to the number of devices, or when more than one axis is -1.
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
  for name, s in sizes.items():
    if not isinstance(s, (int, np.integer)) or (s < 1 and s != -1):
      raise ValueError(f"make_mesh: {name}={s!r} must be a positive int or -1.")
  free = [k for k, s in sizes.items() if s == -1]
  if len(free) > 1:
    raise ValueError(f"make_mesh: only one axis may be -1, got {free}; "
                     "give explicit sizes for the others.")
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if free:
    if n % fixed:
      raise ValueError(
          f"make_mesh: {n} devices are not divisible by the fixed axis sizes "
          f"{ {k: v for k, v in sizes.items() if v != -1} } (product {fixed}); "
          f"choose sizes whose product divides {n}.")
    sizes[free[0]] = n // fixed
  shape = tuple(int(sizes[k]) for k in MESH_AXES)
  if math.prod(shape) != n:
    raise ValueError(
        f"make_mesh: data*fsdp*tensor = {shape[0]}*{shape[1]}*{shape[2]} = "
        f"{math.prod(shape)} but there are {n} devices; make the product equal "
        f"{n} or pass -1 for one axis.")
  return jax.make_mesh(shape, MESH_AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * 3,
                       devices=devices)


# ------------------------------------------------------------------ rules


def _rules_dict(rules: Rules | Mapping[str, MeshAxis]) -> dict[str, MeshAxis]:
  items = rules.items() if isinstance(rules, Mapping) else rules
  out: dict[str, MeshAxis] = {}
  for pair in items:
    if len(pair) != 2:
      raise ValueError(f"sharding rules: each rule must be (logical_name, "
                       f"mesh_axis), got {pair!r}.")
    name, axis = pair
    out[name] = tuple(axis) if isinstance(axis, list) else axis
  return out


def _axis_names(axis: MeshAxis) -> tuple[str, ...]:
  if axis is None:
    return ()
  return (axis,) if isinstance(axis, str) else tuple(axis)


def spec_for_shape(logical: Sequence[str | None] | None, shape: Sequence[int],
                   mesh: jax.sharding.Mesh, rules: Rules | Mapping[str, MeshAxis] = DEFAULT_RULES,
                   *, name: str = "array") -> P:
  """PartitionSpec for one array from its logical axes.

  A mesh axis is dropped for a dim it does not divide (so tiny test models
  always shard), and a mesh axis is used at most once per array (first dim
  wins). Unknown logical names raise a KeyError listing the known ones.
  """
  if logical is None:
    return P()
  logical = tuple(logical)
  if len(logical) != len(shape):
    raise ValueError(f"{name}: logical axes {logical} have {len(logical)} "
                     f"entries but the array has shape {tuple(shape)}; give one "
                     "logical name (or None) per dim.")
  rd = _rules_dict(rules)
  used: set[str] = set()
  spec = []
  for dim, lname in zip(shape, logical):
    if lname is None:
      spec.append(None)
      continue
    if lname not in rd:
      raise KeyError(f"{name}: logical axis {lname!r} has no sharding rule; "
                     f"known: {sorted(rd)}. Add ({lname!r}, mesh_axis_or_None) "
                     "to the rules.")
    kept = []
    for ax in _axis_names(rd[lname]):
      if ax not in mesh.shape:
        raise KeyError(f"{name}: rule {lname!r} -> {ax!r} names a mesh axis "
                       f"not in the mesh {tuple(mesh.shape)}.")
      size = mesh.shape[ax]
      cur = math.prod(mesh.shape[a] for a in kept)
      if ax in used or dim % (cur * size):
        continue
      kept.append(ax)
    used.update(kept)
    spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return P(*spec)


def _fit_spec(spec, shape, mesh, name: str) -> P:
  """Drops mesh axes of an explicit spec that do not divide their dim."""
  entries = tuple(spec)
  if shape is None:
    return P(*entries)
  if len(entries) > len(shape):
    raise ValueError(f"{name}: override spec {P(*entries)} has more entries than "
                     f"the array has dims (shape {tuple(shape)}).")
  out = []
  for dim, entry in zip(shape, entries):
    kept = []
    for ax in _axis_names(entry):
      if dim % (math.prod(mesh.shape[a] for a in kept) * mesh.shape[ax]) == 0:
        kept.append(ax)
    out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return P(*out)


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                  for k in path)


def _is_axes_leaf(x) -> bool:
  return x is None or (type(x) is tuple and all(  # pylint: disable=unidiomatic-typecheck
      a is None or isinstance(a, str) for a in x))


def logical_to_sharding(logical_axes_tree, mesh: jax.sharding.Mesh,
                        rules: Rules | Mapping[str, MeshAxis] = DEFAULT_RULES, *,
                        shapes=None,
                        overrides: Sequence[tuple[str, P | tuple]] = ()):
  """Maps a tree of logical-axis tuples to a tree of `NamedSharding`.

  Args:
    logical_axes_tree: pytree whose leaves are tuples of logical names (one per
      dim) or None (replicated).
    mesh: mesh from `make_mesh`.
    rules: (logical_name, mesh_axis | tuple | None) pairs.
    shapes: optional pytree of arrays / ShapeDtypeStructs with the same
      structure; when given, mesh axes not dividing a dim are dropped.
    overrides: (regex, PartitionSpec) pairs matched (re.search) against the
      "/"-joined parameter path; the first match wins over the rules.
  """
  leaves, treedef = jax.tree_util.tree_flatten_with_path(
      logical_axes_tree, is_leaf=_is_axes_leaf)
  if shapes is not None:
    shape_leaves = treedef.flatten_up_to(shapes)
  else:
    shape_leaves = [None] * len(leaves)
  out = []
  for (path, axes), arr in zip(leaves, shape_leaves):
    pname = _path_str(path)
    spec = None
    if arr is None:
      # Unknown shapes: a size every mesh-axis product divides.
      shape = tuple(math.prod(mesh.shape.values()) for _ in (axes or ()))
    else:
      shape = tuple(np.shape(arr))
    for pattern, ospec in overrides:
      if re.search(pattern, pname):
        spec = _fit_spec(ospec, shape if arr is not None else None, mesh, pname)
        break
    if spec is None:
      spec = spec_for_shape(axes, shape, mesh, rules, name=pname)
    out.append(NamedSharding(mesh, spec))
  return treedef.unflatten(out)


def state_shardings(init_fn: Callable, mesh: jax.sharding.Mesh, *args,
                    logical_axes_fn: Callable[[Any], Any] | None = None,
                    rules: Rules | Mapping[str, MeshAxis] = DEFAULT_RULES,
                    overrides: Sequence[tuple[str, P | tuple]] = ()):
  """Shardings for `init_fn(*args)`'s output, computed with `jax.eval_shape`.

  Nothing is allocated. `logical_axes_fn(abstract_state)` must return a tree
  with the same structure as the state whose leaves are logical-axis tuples
  or None; leaves absent from it (e.g. scalar step counters) can be None.
  Without `logical_axes_fn` every leaf is replicated except where an
  `overrides` regex matches.

  Returns:
    (shardings, abstract_state) — use `jax.jit(init_fn, out_shardings=...)`.
  """
  abstract = jax.eval_shape(init_fn, *args)
  if logical_axes_fn is None:
    axes = jax.tree.map(lambda _: None, abstract)
  else:
    axes = logical_axes_fn(abstract)
  sh = logical_to_sharding(axes, mesh, rules, shapes=abstract, overrides=overrides)
  return sh, abstract


def tree_shardings(abstract_tree, mesh: jax.sharding.Mesh,
                   axes_for_path: Callable[[Any, tuple], Sequence[str | None] | None],
                   rules: Rules | Mapping[str, MeshAxis] = DEFAULT_RULES,
                   overrides: Sequence[tuple[str, P | tuple]] = ()):
  """Shardings of any pytree (e.g. `jax.eval_shape` of a train state) by logical-axis rules.

  `axes_for_path(path, shape)` gives each leaf's logical axes, or None (replicated); a
  model's `rlhf_jax.models.axes.axes_for_path` names parameters wherever they sit in the
  state (policy, reference, value params, optimiser moments). Nothing is allocated.
  """
  def one(path, x):
    shape, pname = tuple(np.shape(x)), _path_str(path)
    for pattern, ospec in overrides:
      if re.search(pattern, pname):
        return NamedSharding(mesh, _fit_spec(ospec, shape, mesh, pname))
    return NamedSharding(mesh, spec_for_shape(axes_for_path(path, shape), shape, mesh, rules,
                                              name=pname))
  # The result has the state's structure (None fields stay None).
  return jax.tree_util.tree_map_with_path(one, abstract_tree)


# ------------------------------------------------------------------ batches


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int = 1) -> NamedSharding:
  """Sharding of a batch array: leading dim over ("data", "fsdp")."""
  if ndim < 1:
    raise ValueError(f"batch_sharding: ndim={ndim}; batch arrays need a leading "
                     "batch dim (ndim >= 1).")
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def batch_shard_count(mesh: jax.sharding.Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def shard_batch(batch, mesh: jax.sharding.Mesh):
  """Places every array of `batch` with its leading dim over data×fsdp.

  Raises:
    ValueError naming the leaf path, its batch size and the data×fsdp size when
    the batch size is not divisible.
  """
  n = batch_shard_count(mesh)

  def put(path, x):
    x = np.asarray(x) if not isinstance(x, jax.Array) else x
    if x.ndim == 0:
      raise ValueError(f"shard_batch: leaf {_path_str(path)!r} is a scalar; "
                       "every batch leaf needs a leading batch dim.")
    if x.shape[0] % n:
      raise ValueError(
          f"shard_batch: leaf {_path_str(path)!r} has batch size {x.shape[0]} "
          f"which is not divisible by data*fsdp = {n} (mesh {dict(mesh.shape)}); "
          f"use a batch size that is a multiple of {n}.")
    return jax.device_put(x, batch_sharding(mesh, x.ndim))

  return jax.tree_util.tree_map_with_path(put, batch)


# ------------------------------------------------------------------ multi-host


def init_distributed(config: Mapping[str, Any] | None = None) -> bool:
  """Calls `jax.distributed.initialize` when a coordinator is configured.

  Reads `coordinator_address`, `num_processes`, `process_id` from `config`
  (a mapping, or a ConfigDict with a `distributed` sub-dict) or from the env
  vars RLHF_COORDINATOR_ADDRESS / RLHF_NUM_PROCESSES / RLHF_PROCESS_ID.
  `auto=True` (or RLHF_DISTRIBUTED=auto) calls `jax.distributed.initialize()` with no
  arguments instead, which discovers the processes itself on Cloud TPU VMs, Slurm and
  Open MPI; it excludes the three explicit keys. When the JAX distributed system is
  already initialised (by the caller), nothing is done.
  Returns True when it initialised, False for single-process runs.
  """
  cfg = dict(config or {})
  if "distributed" in cfg and cfg["distributed"] is not None:
    cfg = dict(cfg["distributed"])
  auto = cfg.get("auto")
  if auto is None:
    auto = os.environ.get("RLHF_DISTRIBUTED", "").strip().lower() == "auto"
  if auto:
    given = [k for k in ("coordinator_address", "num_processes", "process_id")
             if cfg.get(k) is not None]
    if given:
      raise ValueError(f"init_distributed: auto=True discovers the processes itself; drop "
                       f"{given} (or set auto=False and give all three).")
    if jax.distributed.is_initialized():
      return False
    jax.distributed.initialize()
    return True
  addr = cfg.get("coordinator_address") or os.environ.get("RLHF_COORDINATOR_ADDRESS")
  nproc = cfg.get("num_processes") or os.environ.get("RLHF_NUM_PROCESSES")
  pid = cfg.get("process_id")
  if pid is None:
    pid = os.environ.get("RLHF_PROCESS_ID")
  if not addr:
    if nproc not in (None, 1, "1") or pid not in (None, 0, "0"):
      raise ValueError("init_distributed: num_processes/process_id are set but "
                       "coordinator_address is missing; set coordinator_address "
                       "(host:port of process 0).")
    return False
  if nproc is None or pid is None:
    raise ValueError("init_distributed: coordinator_address is set; also set "
                     "num_processes and process_id.")
  nproc, pid = int(nproc), int(pid)
  if not 0 <= pid < nproc:
    raise ValueError(f"init_distributed: process_id={pid} must be in "
                     f"[0, num_processes={nproc}).")
  if jax.distributed.is_initialized():
    return False
  jax.distributed.initialize(coordinator_address=addr, num_processes=nproc,
                             process_id=pid)
  return True


def process_batch_slice(global_batch_size: int, *,
                        process_index: int | None = None,
                        process_count: int | None = None) -> slice:
  """Slice of the global batch this process loads (contiguous, equal parts)."""
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  if global_batch_size % pc:
    raise ValueError(f"process_batch_slice: global_batch_size={global_batch_size} "
                     f"is not divisible by process_count={pc}; use a multiple.")
  per = global_batch_size // pc
  return slice(pi * per, (pi + 1) * per)


def global_batch_from_process_local(local_batch, mesh: jax.sharding.Mesh):
  """Assembles per-process batch slices into global arrays over data×fsdp."""
  def make(x):
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x)
  return jax.tree.map(make, local_batch)
