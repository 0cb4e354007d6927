"""Checkpointing of train state, data-iterator state and config (Orbax).

One checkpoint step directory holds four items:
  state       the train-state pytree (params, optimiser, reference, controllers,
              step, random keys stored as `jax.random.key_data`), sharded.
  data_state  JSON dict of the input pipeline position (e.g. grain `get_state()`).
  config      JSON of the run config (dict or ml_collections.ConfigDict).
  meta        JSON: format version, step, random-key paths and their impls.
and, once Orbax has committed the step, `rlhf_integrity.json` with the size and
sha256 of every file, checked on restore.

Guarantees (see docs/reliability.md): Orbax writes into a temporary directory
and renames it on commit, so an interrupted save never appears as a step;
corrupted or truncated files are detected on restore with an error naming the
step; `restore_latest_valid` falls back to the newest loadable step with a
warning; restore onto another mesh reshards to the given target shardings.

Typical loop::

  ckpt = Checkpointer(workdir, max_to_keep=3, save_interval_steps=100)
  stop = install_preemption_handler()
  if ckpt.latest_step() is not None:
    state, data_state, _, step = ckpt.restore_latest_valid(
        abstract_state, shardings=shardings, config=config)
  ...
  ckpt.save(step, state, data_state=it.get_state(), config=config,
            force=stop.should_stop())
  if stop.should_stop(): ckpt.wait(); return
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import logging
import os
import signal
import threading
import time
import warnings
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
INTEGRITY_FILE = "rlhf_integrity.json"
ITEMS = ("state", "data_state", "config", "meta")
DEFAULT_MUST_MATCH = ("model",)


class CheckpointError(RuntimeError):
  """A checkpoint step is missing, incomplete or corrupted."""


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


def _encode_json_item(d: dict) -> dict:
  # Orbax's JsonSave needs plain JSON; bytes etc. are encoded by _json_default.
  return json.loads(json.dumps(d, default=_json_default))


def _decode_json_item(d: dict | None) -> dict:
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


def _unwrap_keys(tree):
  """Replaces typed PRNG keys by their key data; returns (tree, {path: impl})."""
  impls = {}

  def f(path, x):
    if _is_key(x):
      impls[_keystr(path)] = str(jax.random.key_impl(x))
      return jax.random.key_data(x)
    return x

  return jax.tree_util.tree_map_with_path(f, tree), impls


def _rewrap_keys(tree, impls: Mapping[str, str]):
  if not impls:
    return tree

  def f(path, x):
    impl = impls.get(_keystr(path))
    return x if impl is None else jax.random.wrap_key_data(x, impl=impl)

  return jax.tree_util.tree_map_with_path(f, tree)


def _abstract_target(target, shardings):
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


def _saved_fields(state_dir: str) -> set[str] | None:
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


def _added_fields(target, saved: set[str] | None) -> tuple[list[str], list[str]]:
  """Fields of a dataclass state that the saved tree lacks: (empty in `target`, not empty).

  A checkpoint written before a field was added to the train state (e.g. `RLState.
  reward_state`) restores when this run leaves the field empty (None)."""
  if saved is None:
    return [], []
  added = [f.name for f in dataclasses.fields(target) if f.name not in saved]
  empty = [n for n in added if not jax.tree_util.tree_leaves(getattr(target, n))]
  return empty, [n for n in added if n not in empty]


# ------------------------------------------------------------------ integrity


def _hash_file(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def _list_files(step_dir: str) -> list[str]:
  out = []
  for root, _, files in os.walk(step_dir):
    for name in files:
      rel = os.path.relpath(os.path.join(root, name), step_dir)
      if rel != INTEGRITY_FILE and not rel.endswith(".tmp"):
        out.append(rel)
  return sorted(out)


def write_integrity(step_dir: str, *, checksum: bool = True) -> None:
  """Writes size (+ sha256) of every file of a committed step, atomically."""
  files = {}
  for rel in _list_files(step_dir):
    p = os.path.join(step_dir, rel)
    files[rel] = {"size": os.path.getsize(p),
                  "sha256": _hash_file(p) if checksum else None}
  tmp = os.path.join(step_dir, INTEGRITY_FILE + ".tmp")
  with open(tmp, "w") as f:
    json.dump({"format": FORMAT_VERSION, "files": files}, f)
  os.replace(tmp, os.path.join(step_dir, INTEGRITY_FILE))


def verify_step_dir(step_dir: str, step: int, *, checksum: bool = True) -> None:
  """Raises CheckpointError naming the step and the problem, if any."""
  if not os.path.isdir(step_dir):
    raise CheckpointError(f"checkpoint step {step}: directory {step_dir} does not exist.")
  if not os.path.exists(os.path.join(step_dir, "_CHECKPOINT_METADATA")):
    raise CheckpointError(f"checkpoint step {step} at {step_dir} is incomplete: "
                          "_CHECKPOINT_METADATA is missing (save did not finish).")
  for item in ITEMS:
    if not os.path.isdir(os.path.join(step_dir, item)):
      raise CheckpointError(f"checkpoint step {step} at {step_dir} is incomplete: "
                            f"item directory {item!r} is missing.")
  manifest = os.path.join(step_dir, INTEGRITY_FILE)
  if not os.path.exists(manifest):
    return  # committed by Orbax but manifest not yet written; Orbax checks apply.
  try:
    with open(manifest) as f:
      files = json.load(f)["files"]
  except (OSError, ValueError, KeyError) as e:
    raise CheckpointError(f"checkpoint step {step}: integrity manifest {manifest} "
                          f"is unreadable ({e}).") from e
  for rel, info in files.items():
    p = os.path.join(step_dir, rel)
    if not os.path.exists(p):
      raise CheckpointError(f"checkpoint step {step}: file {rel} is missing.")
    size = os.path.getsize(p)
    if size != info["size"]:
      raise CheckpointError(f"checkpoint step {step}: file {rel} has {size} bytes, "
                            f"expected {info['size']} (truncated or overwritten).")
    if checksum and info.get("sha256") and _hash_file(p) != info["sha256"]:
      raise CheckpointError(f"checkpoint step {step}: file {rel} fails its sha256 "
                            "check (corrupted).")


# ------------------------------------------------------------------ manager


class Checkpointer:
  """Saves/restores (state, data_state, config) with Orbax's CheckpointManager.

  Args:
    workdir: checkpoint root directory (created if missing).
    max_to_keep: number of most recent steps kept (None = all).
    save_interval_steps: `save` writes when `step % save_interval_steps == 0`.
    save_interval_minutes: also write when this many minutes passed since the
      last write (None = off).
    async_save: write in a background thread (Orbax async); call `wait()`
      before exiting.
    checksum: store and verify sha256 of every file (sizes always checked).
  """

  def __init__(self, workdir: str, *, max_to_keep: int | None = 3,
               save_interval_steps: int = 1,
               save_interval_minutes: float | None = None,
               async_save: bool = True, checksum: bool = True):
    if save_interval_steps is not None and save_interval_steps < 1:
      raise ValueError(f"save_interval_steps={save_interval_steps} must be >= 1.")
    if max_to_keep is not None and max_to_keep < 1:
      raise ValueError(f"max_to_keep={max_to_keep} must be >= 1 or None.")
    self.workdir = os.path.abspath(os.fspath(workdir))
    self.save_interval_steps = save_interval_steps
    self.save_interval_minutes = save_interval_minutes
    self.checksum = checksum
    self._async = bool(async_save)
    self._last_save_time = time.monotonic()
    self._pending: set[int] = set()
    self._unloadable: set[int] = set()  # committed steps a fallback restore skipped
    self._mngr = ocp.CheckpointManager(
        self.workdir,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True,
            enable_async_checkpointing=async_save))

  # -- queries

  def _step_dirs(self) -> tuple[list[int], list[int]]:
    # Listed from the directory: Orbax's `reload()` during an in-flight async
    # save confuses its retention bookkeeping. Temporary dirs are not digits.
    committed, partial = [], []
    names = os.listdir(self.workdir) if os.path.isdir(self.workdir) else []
    for s in (n for n in names if n.isdigit()):
      d = self.step_dir(int(s))
      ok = os.path.exists(os.path.join(d, "_CHECKPOINT_METADATA"))
      (committed if ok else partial).append(int(s))
    return sorted(committed), sorted(partial)

  def all_steps(self) -> list[int]:
    """Steps whose directory is committed (no temporary or partial dirs)."""
    return self._step_dirs()[0]

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def step_dir(self, step: int) -> str:
    return os.path.join(self.workdir, str(int(step)))

  def should_save(self, step: int) -> bool:
    if self.save_interval_steps and step % self.save_interval_steps == 0:
      return True
    if self.save_interval_minutes is not None:
      return (time.monotonic() - self._last_save_time) >= 60 * self.save_interval_minutes
    return False

  # -- save

  def save(self, step: int, state, *, data_state: Mapping | None = None,
           config: Mapping | Any = None, force: bool = False) -> bool:
    """Saves when due (or `force`); returns whether a save was started."""
    step = int(step)
    if not (force or self.should_save(step)):
      return False
    committed, partial = self._step_dirs()
    intact = step in committed and step not in self._unloadable and self._intact(step)
    if step in self._pending or intact:
      log.info("checkpoint step %d already exists; not saving again.", step)
      return False
    if step in committed:  # corrupted (e.g. a run resumed from an earlier step past it)
      self._set_aside(step, "corrupted", "failed verification")
    elif step in partial:
      self._set_aside(step, "incomplete", "_CHECKPOINT_METADATA missing")
    arrays, impls = _unwrap_keys(state)
    meta = {"format": FORMAT_VERSION, "step": step, "key_impls": impls}
    self._mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(arrays),
        data_state=ocp.args.JsonSave(_encode_json_item(dict(data_state or {}))),
        config=ocp.args.JsonSave(to_json_dict(config)),
        meta=ocp.args.JsonSave(meta)), force=True)
    self._last_save_time = time.monotonic()
    self._pending.add(step)
    # Orbax finishes the previous async save before starting a new one, so all
    # earlier steps are committed now.
    self._finalize(exclude=step if self._async else None)
    return True

  def _intact(self, step: int) -> bool:
    try:
      self.verify(step)
      return True
    except CheckpointError:
      return False

  def _set_aside(self, step: int, kind: str, why: str) -> None:
    """Renames an incomplete or corrupted `<step>` dir so the step can be saved again."""
    self._mngr.wait_until_finished()
    src = self.step_dir(step)
    dst = f"{src}.{kind}-{int(time.time())}"
    if jax.process_index() == 0:
      os.replace(src, dst)
    msg = (f"checkpoint step {step} at {src} was {kind} ({why}); moved to {dst} before "
           "saving again.")
    warnings.warn(msg, RuntimeWarning, stacklevel=3)
    log.warning(msg)
    self._mngr.reload()

  def _finalize(self, exclude: int | None = None) -> None:
    if jax.process_index() != 0:
      self._pending.clear()
      return
    for s in sorted(self._pending):
      if s == exclude:
        continue
      d = self.step_dir(s)
      try:
        if os.path.exists(os.path.join(d, "_CHECKPOINT_METADATA")):
          write_integrity(d, checksum=self.checksum)
      except FileNotFoundError:
        pass  # deleted by max_to_keep meanwhile
      self._pending.discard(s)

  def wait(self) -> None:
    """Blocks until pending async saves are committed (and manifests written)."""
    self._mngr.wait_until_finished()
    self._finalize()

  def close(self) -> None:
    self.wait()
    self._mngr.close()

  # -- restore

  def verify(self, step: int) -> None:
    verify_step_dir(self.step_dir(step), step, checksum=self.checksum)

  def restore(self, target=None, step: int | str | None = "latest", *,
              shardings=None, config: Mapping | Any = None,
              must_match: Sequence[str] = DEFAULT_MUST_MATCH):
    """Restores `(state, data_state, config_dict, step)`.

    Args:
      target: abstract (ShapeDtypeStruct) or concrete state with the saved
        structure; random keys may be typed keys. None restores the raw tree.
      step: a step number, or "latest"/None for the newest committed step.
      shardings: tree of target shardings (reshard onto any mesh); defaults to
        each target leaf's sharding, else the first local device.
      config: current config; keys under `must_match` must equal the saved.

    Raises:
      FileNotFoundError if there is no checkpoint; CheckpointError naming the
      step for incomplete/corrupted ones; ValueError for incompatible configs.
    """
    self.wait()
    if step in (None, "latest"):
      step = self.latest_step()
      if step is None:
        raise FileNotFoundError(f"no committed checkpoint in {self.workdir}.")
    step = int(step)
    self.verify(step)
    saved_config = _decode_json_item(self._read(step, lambda: self._mngr.restore(
        step, args=ocp.args.Composite(config=ocp.args.JsonRestore())))["config"])
    if config is not None:  # before the state: a changed model config explains a tree mismatch
      check_config_compatible(saved_config, config, must_match=must_match)
    args = {"data_state": ocp.args.JsonRestore(), "meta": ocp.args.JsonRestore()}
    abstract, empty, needed = None, [], []
    if target is not None:
      abstract = _abstract_target(target, shardings)
      if dataclasses.is_dataclass(abstract):  # only a dataclass state gains fields
        empty, needed = _added_fields(
            abstract, _saved_fields(os.path.join(self.step_dir(step), "state")))
    if needed:
      raise CheckpointError(
          f"checkpoint step {step} at {self.step_dir(step)} was written without the state "
          f"field(s) {needed}, which this run uses: resume with the settings it was written "
          "with, or start in a new workdir.")
    if empty:  # restore the saved fields only; the added ones keep this run's empty value
      item = {f.name: getattr(abstract, f.name) for f in dataclasses.fields(abstract)
              if f.name not in empty}
      args["state"] = ocp.args.StandardRestore(item)
    else:
      args["state"] = ocp.args.StandardRestore(abstract)

    def read_state():
      out = self._mngr.restore(step, args=ocp.args.Composite(**args))
      state = dataclasses.replace(abstract, **out["state"]) if empty else out["state"]
      return out, jax.block_until_ready(state)
    out, state = self._read(step, read_state)
    meta = out["meta"] or {}
    state = _rewrap_keys(state, meta.get("key_impls", {}))
    return state, _decode_json_item(out["data_state"]), saved_config, step

  def _read(self, step: int, read):
    """`read()`, any failure raised as a CheckpointError naming the step."""
    try:
      return read()
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f"checkpoint step {step} at {self.step_dir(step)} could not be "
                            f"restored: {type(e).__name__}: {str(e)[:500]}") from e

  def restore_latest_valid(self, target=None, *, shardings=None,
                           config: Mapping | Any = None,
                           must_match: Sequence[str] = DEFAULT_MUST_MATCH):
    """Like `restore` on the newest step that loads; warns for each skipped.

    Config incompatibility is not a fallback reason: it raises at once. Restoring writes
    nothing; a skipped step is set aside (renamed) only when this run saves that step again.
    """
    self.wait()
    steps, partial = self._step_dirs()
    problems = []

    def skip(msg):
      msg += " Falling back to an earlier checkpoint."
      warnings.warn(msg, RuntimeWarning, stacklevel=3)
      log.warning(msg)
      problems.append(msg)

    newest = steps[-1] if steps else -1
    for s in partial:
      if s > newest:
        skip(f"checkpoint step {s} at {self.step_dir(s)} is incomplete "
             "(_CHECKPOINT_METADATA missing) and is ignored.")
    if not steps:
      raise FileNotFoundError(f"no committed checkpoint in {self.workdir}.")
    failed = []
    for s in reversed(steps):
      try:
        out = self.restore(target, s, shardings=shardings, config=config,
                           must_match=must_match)
      except CheckpointError as e:
        skip(str(e))
        failed.append(s)
        continue
      self._unloadable.update(failed)
      return out
    raise CheckpointError("no loadable checkpoint in " + self.workdir + ":\n  " +
                          "\n  ".join(problems))


# ------------------------------------------------------------------ preemption


class PreemptionFlag:
  """Records SIGTERM/SIGINT; the loop polls `should_stop()` then saves."""

  def __init__(self):
    self._event = threading.Event()
    self.signum: int | None = None

  def should_stop(self) -> bool:
    return self._event.is_set()

  def set(self, signum: int | None = None) -> None:
    self.signum = signum
    self._event.set()

  def clear(self) -> None:
    self.signum = None
    self._event.clear()


_FLAG = PreemptionFlag()


def should_stop() -> bool:
  """Whether a preemption signal arrived since `install_preemption_handler`."""
  return _FLAG.should_stop()


def install_preemption_handler(
    signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT)) -> PreemptionFlag:
  """Installs handlers that set a flag instead of killing the process.

  A second SIGINT while the flag is already set raises KeyboardInterrupt, so an
  interactive user can still abort. Must be called from the main thread.
  Multi-host loops should agree on stopping (e.g. all-reduce the flag).
  """
  def handler(signum, frame):  # pylint: disable=unused-argument
    if _FLAG.should_stop() and signum == signal.SIGINT:
      raise KeyboardInterrupt
    log.warning("received signal %d; will checkpoint and stop.", signum)
    _FLAG.set(signum)

  for s in signals:
    signal.signal(s, handler)
  return _FLAG
