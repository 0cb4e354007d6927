"""Run management shared by the loops: checkpoint/resume, preemption, bad-step stop.

    run = Runner(config, state, data_iter)
    state = run.state                          # restored when config.resume allows
    for step in range(run.start_step, total):
      state, metrics = update(state, batch)
      if run.after_step(step + 1, state, metrics):   # saved on preemption: stop
        break
    run.finish(state)

config keys: `workdir`, `resume` ("auto": newest complete checkpoint; "never"),
`checkpoint.every_steps`, `checkpoint.every_minutes`, `checkpoint.max_to_keep`,
`checkpoint.async_save`, `max_bad_steps` (consecutive non-finite steps before
stopping with an error).

`checkpoint.every_steps=0` (or None) means no step-based checkpoints: with
`checkpoint.every_minutes` unset too the run writes no checkpoint at all (a warning says
so) and a restarted run begins again at step 0.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping, Optional

from rlhf_jax import checkpoint as ckpt_lib
from rlhf_jax import guards

log = logging.getLogger(__name__)

RESUME_MODES = ("auto", "never")


def check_workdir(config) -> None:
  """Raises ValueError when `config.workdir` is empty, a URL (`gs://...`), or it (or a folder
  above it) is an existing file, so it cannot be the run's directory. Writes nothing.

  The run writes through the local file system (checkpoints with their integrity manifests,
  metrics.jsonl, TensorBoard events, plots), so a bucket is used through a mount: Cloud
  Storage FUSE on every host (docs/scale.md, "TPU pods and multi-host")."""
  workdir = config.get("workdir")
  if workdir is None:
    return
  if not str(workdir).strip():
    raise ValueError("config.workdir is empty; set it to the run's directory (created if "
                     "absent)")
  scheme, sep, rest = str(workdir).partition("://")
  if sep and scheme.isalnum():
    example = f"/gcs/{rest}" if scheme == "gs" else f"/mnt/{rest}"
    raise ValueError(f"config.workdir={workdir!r} is a URL; the run writes its checkpoints, "
                     "metrics and TensorBoard events through the file system: mount the "
                     "bucket on every host (for gs://, Cloud Storage FUSE: gcsfuse "
                     "--implicit-dirs --rename-dir-limit=200000 BUCKET /gcs/BUCKET) and set "
                     f"config.workdir to the mounted path, e.g. {example!r}")
  path = os.path.abspath(os.fspath(workdir))
  while not os.path.exists(path):
    parent = os.path.dirname(path)
    if parent == path:
      return
    path = parent
  if not os.path.isdir(path):
    where = ("is an existing file" if path == os.path.abspath(os.fspath(workdir))
             else f"is under {path!r}, an existing file")
    raise ValueError(f"config.workdir={workdir!r} {where}, not a directory; set workdir to "
                     "a new or existing directory")


class Runner:
  """Owns the checkpointer, the data-iterator state and the stop conditions."""

  def __init__(self, config, state, data_iter=None, *, must_match=None):
    self.config = config
    resume = config.get("resume", "auto")
    if resume not in RESUME_MODES:
      raise ValueError(f"config.resume={resume!r} is unknown; use one of {RESUME_MODES}")
    ck = dict(config.get("checkpoint") or {})
    self.every_steps = int(ck.get("every_steps", 0) or 0)
    self.max_bad_steps = int(config.get("max_bad_steps", 10))
    self.data_iter = data_iter
    self.ckpt = None
    self.start_step = 0
    self.state = state
    self.stopped_by_signal = False
    if not (self.every_steps or ck.get("every_minutes")):
      log.warning("no checkpoints: checkpoint.every_steps=%r and checkpoint.every_minutes is "
                  "unset, so a stopped run starts again from step 0; set "
                  "checkpoint.every_steps=N to save every N steps", ck.get("every_steps", 0))
    else:
      self.ckpt = ckpt_lib.Checkpointer(
          os.path.join(config.workdir, "checkpoints"),
          max_to_keep=ck.get("max_to_keep", 3),
          save_interval_steps=self.every_steps or 10**12,
          save_interval_minutes=ck.get("every_minutes"),
          async_save=bool(ck.get("async_save", True)))
      ckpt_lib.install_preemption_handler()
      if resume == "auto" and self.ckpt.latest_step() is not None:
        kwargs = {} if must_match is None else {"must_match": must_match}
        restored, data_state, _, step = self.ckpt.restore_latest_valid(
            state, config=self._config_dict(), **kwargs)
        self.state = restored
        if data_iter is not None and data_state:
          data_iter.set_state(data_state)
        self.start_step = int(step)
        log.info("resumed from checkpoint step %d", step)

  def _data_state(self) -> Mapping[str, Any]:
    return self.data_iter.get_state() if self.data_iter is not None else {}

  def _config_dict(self):
    c = self.config
    return c.to_dict() if hasattr(c, "to_dict") else dict(c)

  def after_step(self, step: int, state, metrics: Optional[Mapping[str, Any]] = None) -> bool:
    """Saves when due; returns True when the loop should stop (preemption)."""
    if metrics is not None and "bad_steps_in_a_row" in metrics:
      guards.check_consecutive(metrics["bad_steps_in_a_row"], self.max_bad_steps)
    if self.ckpt is None:
      return False
    if ckpt_lib.should_stop():
      self.ckpt.save(step, state, data_state=self._data_state(), config=self._config_dict(),
                     force=True)
      self.ckpt.wait()
      self.stopped_by_signal = True
      log.warning("stopped by signal after saving step %d", step)
      return True
    self.ckpt.save(step, state, data_state=self._data_state(), config=self._config_dict())
    return False

  def finish(self, step: int, state) -> None:
    """Saves the final state (when checkpointing) and waits for pending writes."""
    if self.ckpt is None:
      return
    if not self.stopped_by_signal:
      self.ckpt.save(step, state, data_state=self._data_state(), config=self._config_dict(),
                     force=True)
    self.ckpt.close()
