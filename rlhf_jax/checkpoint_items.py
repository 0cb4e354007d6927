"""Encoding of the checkpoint items and the restore target (see `rlhf_jax.checkpoint`).

JSON items (data-iterator state, config, meta) with bytes and numpy scalars; the
config compatibility check run before restoring; typed PRNG keys stored as key data;
the abstract restore target with its shardings; state fields added since a
checkpoint was written.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

DEFAULT_MUST_MATCH = ("model",)


# ------------------------------------------------------------------ JSON


def _json_default(x):
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, (np.floating,)):
    return float(x)
  if isinstance(x, (np.bool_,)):
    return bool(x)
  if isinstance(x, (np.ndarray, jax.Array)):
    return np.asarray(x).tolist()
  if isinstance(x, bytes):
    return {"__bytes__": base64.b64encode(x).decode("ascii")}
  if isinstance(x, (tuple, set, frozenset)):
    return list(x)
  if hasattr(x, "to_dict"):
    return x.to_dict()
  raise TypeError(f"cannot store {type(x).__name__} in a JSON checkpoint item: "
                  f"{x!r}; convert it to int/float/str/list/dict.")


def _json_hook(d):
  if set(d) == {"__bytes__"}:
    return base64.b64decode(d["__bytes__"])
  return d


def to_json_dict(obj: Any, name: str = "config") -> dict:
  """Round-trips `obj` (dict / ConfigDict / None) through JSON."""
  if obj is None:
    return {}
  if hasattr(obj, "to_dict"):
    obj = obj.to_dict()
  if not isinstance(obj, Mapping):
    raise TypeError(f"{name} must be a dict or ConfigDict, got {type(obj).__name__}.")
  return json.loads(json.dumps(dict(obj), default=_json_default), object_hook=_json_hook)


def encode_json_item(d: dict) -> dict:
  # Orbax's JsonSave needs plain JSON; bytes etc. are encoded by _json_default.
  return json.loads(json.dumps(d, default=_json_default))


def decode_json_item(d: dict | None) -> dict:
  return json.loads(json.dumps(d or {}), object_hook=_json_hook)


# ------------------------------------------------------------------ config checks


def _flatten(d: Mapping, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, Mapping):
      out.update(_flatten(v, key + "."))
    else:
      out[key] = v
  return out


def check_config_compatible(saved: Mapping | Any, current: Mapping | Any, *,
                            must_match: Sequence[str] = DEFAULT_MUST_MATCH) -> None:
  """Raises ValueError naming every key under `must_match` that differs.

  `must_match` holds dotted prefixes ("model" covers "model.hidden_size" ...).
  Keys present in only one config count as differing.
  """
  a = _flatten(to_json_dict(saved, "saved config"))
  b = _flatten(to_json_dict(current, "current config"))

  def relevant(k):
    return any(k == p or k.startswith(p + ".") for p in must_match)

  missing = object()
  diffs = []
  for k in sorted({k for k in (*a, *b) if relevant(k)}):
    va, vb = a.get(k, missing), b.get(k, missing)
    if va != vb:
      fa = "<absent>" if va is missing else repr(va)
      fb = "<absent>" if vb is missing else repr(vb)
      diffs.append(f"{k}: checkpoint={fa} current={fb}")
  if diffs:
    raise ValueError(
        "restored checkpoint config is incompatible with the current config in "
        "keys that must match (" + ", ".join(must_match) + "):\n  " +
        "\n  ".join(diffs) +
        "\nUse the checkpoint's config for these keys or start a new workdir.")


# ------------------------------------------------------------------ keys


def _is_key(x) -> bool:
  return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _keystr(path) -> str:
  return jax.tree_util.keystr(path)


def unwrap_keys(tree):
  """Replaces typed PRNG keys by their key data; returns (tree, {path: impl})."""
  impls = {}

  def f(path, x):
    if _is_key(x):
      impls[_keystr(path)] = str(jax.random.key_impl(x))
      return jax.random.key_data(x)
    return x

  return jax.tree_util.tree_map_with_path(f, tree), impls


def rewrap_keys(tree, impls: Mapping[str, str]):
  if not impls:
    return tree

  def f(path, x):
    impl = impls.get(_keystr(path))
    return x if impl is None else jax.random.wrap_key_data(x, impl=impl)

  return jax.tree_util.tree_map_with_path(f, tree)


def abstract_target(target, shardings):
  """ShapeDtypeStructs (key leaves as key data) with target shardings."""
  leaves, treedef = jax.tree_util.tree_flatten(target)
  sh_leaves = (treedef.flatten_up_to(shardings) if shardings is not None
               else [None] * len(leaves))
  default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  out = []
  for x, sh in zip(leaves, sh_leaves):
    if sh is None:
      sh = getattr(x, "sharding", None)
      if not isinstance(sh, jax.sharding.Sharding):
        sh = default
    if _is_key(x):
      shape = jax.eval_shape(jax.random.key_data, x)
      out.append(jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=sh))
    else:
      out.append(jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sh))
  return treedef.unflatten(out)


def saved_fields(state_dir: str) -> set[str] | None:
  """Top-level names of the state tree on disk (None when Orbax cannot say)."""
  absl_log = logging.getLogger("absl")  # Orbax warns that a step-level metadata file is absent
  level = absl_log.level
  absl_log.setLevel(logging.ERROR)
  try:
    md = ocp.StandardCheckpointer().metadata(state_dir)
    tree = getattr(md, "item_metadata", md)
    tree = getattr(tree, "tree", tree)
    return set(tree.keys())
  except Exception:  # pylint: disable=broad-except
    return None
  finally:
    absl_log.setLevel(level)


def added_fields(target, saved: set[str] | None) -> tuple[list[str], list[str]]:
  """Fields of a dataclass state that the saved tree lacks: (empty in `target`, not empty).

  A checkpoint written before a field was added to the train state (e.g. `RLState.
  reward_state`) restores when this run leaves the field empty (None)."""
  if saved is None:
    return [], []
  added = [f.name for f in dataclasses.fields(target) if f.name not in saved]
  empty = [n for n in added if not jax.tree_util.tree_leaves(getattr(target, n))]
  return empty, [n for n in added if n not in empty]
