"""Logical axis names for every parameter (consumed by sharding rules)."""

from __future__ import annotations

import jax

_LEAF_AXES = {
    "embed": ("vocab", "embed"),
    "pos_embed": (None, "embed"),
    "lm_head": ("embed", "vocab"),
    "score": ("embed", None),
    "scale": ("norm",),
    "bias": ("norm",),
    "q_kernel": ("embed", "heads", "head_dim"),
    "k_kernel": ("embed", "kv_heads", "head_dim"),
    "v_kernel": ("embed", "kv_heads", "head_dim"),
    "q_bias": ("heads", "head_dim"),
    "k_bias": ("kv_heads", "head_dim"),
    "v_bias": ("kv_heads", "head_dim"),
    "o_kernel": ("heads", "head_dim", "embed"),
    "o_bias": ("embed",),
    "gate_kernel": ("embed", "mlp"),
    "up_kernel": ("embed", "mlp"),
    "down_kernel": ("mlp", "embed"),
    "gate_bias": ("mlp",),
    "up_bias": ("mlp",),
    "down_bias": ("embed",),
}


def logical_axes(model, params=None):
  """Pytree like `params` whose leaves are tuples of logical axis names.

  Names: "layers", "vocab", "embed", "heads", "kv_heads", "head_dim", "mlp",
  "norm", None. Stacked per-layer parameters lead with "layers" (the per-layer layout of
  `unstack_layers` has no such axis).
  """
  if params is None:
    params = jax.eval_shape(model.init, jax.random.key(0))

  def leaf(path, x):
    keys = [getattr(p, "key", None) for p in path]
    axes = _LEAF_AXES[keys[-1]]
    # Stacked layers lead with "layers"; per-layer params (`unstack_layers`) have no layer axis.
    if keys[0] == "layers" and not isinstance(path[1], jax.tree_util.SequenceKey):
      axes = ("layers",) + axes
    if len(axes) != len(x.shape):
      raise ValueError(f"logical_axes: {'/'.join(map(str, keys))} has shape {x.shape}, "
                       f"axes {axes}.")
    return axes

  return jax.tree_util.tree_map_with_path(leaf, params)


def axes_for_path(path, shape):
  """Logical axes of any state leaf by its path (params, their copies in optimiser
  states, value / reference params), or None for leaves that are not parameters.

  The leaf's last key names the parameter (`_LEAF_AXES`); a leaf with one more dim under a
  "layers" key is a stacked per-layer parameter. Used with `jax.eval_shape` of a train
  state by `rlhf_jax.sharding.tree_shardings`.
  """
  keys = [getattr(p, "key", getattr(p, "name", None)) for p in path]
  if not keys or keys[-1] not in _LEAF_AXES:
    return None
  axes = _LEAF_AXES[keys[-1]]
  if len(shape) == len(axes) + 1 and "layers" in keys:
    return ("layers",) + axes
  return axes if len(shape) == len(axes) else None
