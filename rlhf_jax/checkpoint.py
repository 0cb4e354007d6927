"""Checkpointing of train state, data-iterator state and config (Orbax).

One checkpoint step directory holds four items:
  state       the train-state pytree (params, optimiser, reference, controllers,
              step, random keys stored as `jax.random.key_data`), sharded.
  data_state  JSON dict of the input pipeline position (e.g. grain `get_state()`).
  config      JSON of the run config (dict or ml_collections.ConfigDict).
  meta        JSON: format version, step, random-key paths and their impls.
and the integrity manifest `rlhf_integrity.json` with the size and sha256 of every
file, checked on restore (`rlhf_jax.checkpoint_integrity`).

Guarantees (see docs/reliability.md):
- Orbax writes into a temporary directory and renames it on commit; the manifest is
  written into that directory after every item is finalised and before the rename,
  so it is part of the atomic commit. A step counts (`all_steps`, `latest_step`,
  restore) only with Orbax's commit metadata and the manifest; an interrupted save
  never appears as a step, and a `<step>` directory without its manifest is
  incomplete: never restored, skipped by `restore_latest_valid` with a warning, and
  set aside (renamed) when this run saves that step again.
- Corrupted or truncated files are detected on restore with an error naming the
  step; `restore_latest_valid` falls back to the newest loadable step.
- Old steps are deleted (`max_to_keep`) only after a newer step is complete, so a
  failed or interrupted save never leaves fewer loadable steps than before.
- A save that cannot be written (full disk, read-only or unwritable directory)
  raises CheckpointWriteError naming the directory, the cause and the fix, at
  `save` (synchronous) or at the next `save`/`wait`/`close` (async); the earlier
  steps stay loadable.
- Restore onto another mesh reshards to the given target shardings.

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

import dataclasses
import glob
import logging
import os
import shutil
import signal
import threading
import time
import warnings
from typing import Any, Mapping, Sequence

import jax
import orbax.checkpoint as ocp

from rlhf_jax import checkpoint_integrity as integrity
from rlhf_jax import checkpoint_items as items
from rlhf_jax.checkpoint_integrity import (  # pylint: disable=unused-import
    FORMAT_VERSION, INTEGRITY_FILE, ITEMS, CheckpointError, CheckpointWriteError,
    verify_step_dir, write_integrity)
from rlhf_jax.checkpoint_items import (  # pylint: disable=unused-import
    DEFAULT_MUST_MATCH, check_config_compatible, to_json_dict)

log = logging.getLogger(__name__)

# Orbax writes step N into "N" + this suffix, then renames it to "N".
_TMP_SUFFIX = getattr(getattr(ocp.path, "atomicity", None), "TMP_DIR_SUFFIX",
                      ".orbax-checkpoint-tmp")


# ------------------------------------------------------------------ manager


class Checkpointer:
  """Saves/restores (state, data_state, config) with Orbax's CheckpointManager.

  Args:
    workdir: checkpoint root directory (created if missing).
    max_to_keep: number of most recent complete steps kept (None = all).
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
    self.max_to_keep = max_to_keep
    self.save_interval_steps = save_interval_steps
    self.save_interval_minutes = save_interval_minutes
    self.checksum = checksum
    self._async = bool(async_save)
    self._last_save_time = time.monotonic()
    self._pending: int | None = None  # the step whose save is in flight
    self._commit_error: BaseException | None = None
    self._unloadable: set[int] = set()  # complete steps a fallback restore skipped
    try:
      # Always Orbax's async checkpointer: its post-finalisation callback writes the
      # manifest before the commit (a synchronous save waits for it). Retention is
      # done here (`_retain`), not by Orbax, which deletes old steps even when the
      # new one failed to commit. Directories are created in `save`, so a read-only
      # directory fails there instead of in a background thread.
      self._mngr = ocp.CheckpointManager(
          self.workdir,
          options=ocp.CheckpointManagerOptions(
              max_to_keep=None, create=True, enable_async_checkpointing=True,
              async_options=ocp.options.AsyncOptions(
                  post_finalization_callback=self._write_manifest,
                  create_directories_asynchronously=False)))
    except OSError as e:
      raise integrity.write_error(self.workdir, None, e, previous=None) from e

  # -- queries

  def _scan(self) -> dict[int, str | None]:
    # Listed from the directory, not Orbax's bookkeeping, which also counts a step
    # while its save is in flight or before its manifest exists.
    return integrity.scan_steps(self.workdir)

  def all_steps(self) -> list[int]:
    """Complete steps: committed by Orbax with their integrity manifest."""
    return sorted(s for s, why in self._scan().items() if why is None)

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
    """Saves when due (or `force`); returns whether a save was started.

    Raises CheckpointWriteError when this save (synchronous) or the previous one
    (async) could not be written."""
    step = int(step)
    if not (force or self.should_save(step)):
      return False
    self._wait()  # Orbax would wait for the previous save too; its failure is raised here
    status = self._scan()
    if (step in status and status[step] is None and step not in self._unloadable and
        self._intact(step)):
      log.info("checkpoint step %d already exists; not saving again.", step)
      return False
    if step in status:  # a run resumed from an earlier step, past a damaged one
      why = status[step]
      self._set_aside(step, *(("corrupted", "failed verification") if why is None
                              else ("incomplete", why)))
    arrays, impls = items.unwrap_keys(state)
    meta = {"format": FORMAT_VERSION, "step": step, "key_impls": impls}
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(arrays),
        data_state=ocp.args.JsonSave(items.encode_json_item(dict(data_state or {}))),
        config=ocp.args.JsonSave(items.to_json_dict(config)),
        meta=ocp.args.JsonSave(meta))
    self._pending, self._commit_error = step, None
    try:
      self._mngr.save(step, args=args, force=True)
    except Exception as e:  # pylint: disable=broad-except
      self._pending = None
      err = integrity.write_error(self.workdir, step, e, previous=self.latest_step(),
                                  probe=False)
      if err is None:
        raise
      self._discard_tmp(step)
      raise err from e
    self._last_save_time = time.monotonic()
    if not self._async:
      self._wait()
    return True

  def _write_manifest(self) -> None:
    """Orbax's post-finalisation callback (background thread, primary host): runs once
    every item of the step is finalised, before the temporary directory is renamed to
    `<step>`, so the manifest commits with the data. Raising stops the commit."""
    try:
      step = self._pending
      if step is None:
        raise CheckpointError("Orbax finalised a save that this Checkpointer did not start.")
      integrity.write_integrity(self._tmp_dir(step), checksum=self.checksum)
    except BaseException as e:
      self._commit_error = e
      raise

  def _tmp_dir(self, step: int) -> str:
    final = self.step_dir(step)
    tmp = final + _TMP_SUFFIX
    for d in (tmp, *sorted(glob.glob(glob.escape(tmp) + "*"))):
      if os.path.isdir(d):
        return d
    if os.path.isdir(final):  # Orbax's commit-file mode writes in place
      return final
    raise CheckpointError(f"checkpoint step {step}: Orbax's temporary directory {tmp} "
                          "was not found.")

  def _wait(self) -> None:
    """Waits for the save in flight; raises CheckpointWriteError unless it is complete."""
    step = self._pending
    try:
      self._mngr.wait_until_finished()
      failure = None
    except Exception as e:  # pylint: disable=broad-except
      failure = e
    finally:
      self._pending = None  # only now: the manifest callback reads it until the commit
    if step is None:
      if failure is not None:
        raise failure
      return
    if failure is None and integrity.step_status(self.step_dir(step)) is None:
      self._retain()
      return
    failure = failure or self._commit_error
    self._discard_tmp(step)
    try:
      self._mngr.reload()  # forget the failed step, so that it can be saved again
    except Exception:  # pylint: disable=broad-except
      pass
    raise integrity.write_error(self.workdir, step, failure,
                                previous=self.latest_step()) from failure

  def _discard_tmp(self, step: int) -> None:
    """Removes a failed save's temporary directory (frees a full disk)."""
    if jax.process_index() == 0:
      shutil.rmtree(self.step_dir(step) + _TMP_SUFFIX, ignore_errors=True)

  def _retain(self) -> None:
    """Deletes complete steps beyond the newest `max_to_keep`, and committed steps
    without a manifest older than those kept."""
    if self.max_to_keep is None or jax.process_index() != 0:
      return
    status = self._scan()
    keep = sorted(s for s, why in status.items() if why is None)[-self.max_to_keep:]
    for s in sorted(status):
      if not keep or s >= keep[0] or status[s] == integrity.METADATA_MISSING:
        continue
      d = self.step_dir(s)
      try:
        # Without its manifest the step is incomplete at once: a crash while
        # deleting leaves no directory that passes for a complete step.
        if os.path.exists(os.path.join(d, INTEGRITY_FILE)):
          os.remove(os.path.join(d, INTEGRITY_FILE))
        shutil.rmtree(d)
      except OSError as e:
        log.warning("could not delete old checkpoint step %d at %s: %s", s, d, e)

  def _intact(self, step: int) -> bool:
    try:
      self.verify(step)
      return True
    except CheckpointError:
      return False

  def _set_aside(self, step: int, kind: str, why: str) -> None:
    """Renames an incomplete or corrupted `<step>` dir so the step can be saved again."""
    src = self.step_dir(step)
    dst = f"{src}.{kind}-{int(time.time())}"
    n = 0
    while os.path.exists(dst):
      n += 1
      dst = f"{src}.{kind}-{int(time.time())}-{n}"
    if jax.process_index() == 0:
      try:
        os.replace(src, dst)
      except OSError as e:
        raise integrity.write_error(self.workdir, step, e,
                                    previous=self.latest_step()) from e
    msg = (f"checkpoint step {step} at {src} was {kind} ({why}); moved to {dst} before "
           "saving again.")
    warnings.warn(msg, RuntimeWarning, stacklevel=3)
    log.warning(msg)
    self._mngr.reload()

  def wait(self) -> None:
    """Blocks until the save in flight is committed with its manifest.

    Raises CheckpointWriteError when it could not be written."""
    self._wait()

  def close(self) -> None:
    try:
      self._wait()
    finally:
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
      step: a step number, or "latest"/None for the newest complete step.
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
    saved_config = items.decode_json_item(self._read(step, lambda: self._mngr.restore(
        step, args=ocp.args.Composite(config=ocp.args.JsonRestore())))["config"])
    if config is not None:  # before the state: a changed model config explains a tree mismatch
      check_config_compatible(saved_config, config, must_match=must_match)
    args = {"data_state": ocp.args.JsonRestore(), "meta": ocp.args.JsonRestore()}
    abstract, empty, needed = None, [], []
    if target is not None:
      abstract = items.abstract_target(target, shardings)
      if dataclasses.is_dataclass(abstract):  # only a dataclass state gains fields
        empty, needed = items.added_fields(
            abstract, items.saved_fields(os.path.join(self.step_dir(step), "state")))
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
    state = items.rewrap_keys(state, meta.get("key_impls", {}))
    return state, items.decode_json_item(out["data_state"]), saved_config, step

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
    status = self._scan()
    steps = sorted(s for s, why in status.items() if why is None)
    problems = []

    def skip(msg):
      msg += " Falling back to an earlier checkpoint."
      warnings.warn(msg, RuntimeWarning, stacklevel=3)
      log.warning(msg)
      problems.append(msg)

    newest = steps[-1] if steps else -1
    for s, why in sorted(status.items()):
      if why is not None and s > newest:
        skip(f"checkpoint step {s} at {self.step_dir(s)} is incomplete ({why}) and is "
             "ignored.")
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
