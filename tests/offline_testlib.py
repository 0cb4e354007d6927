"""Shared set-up for the offline end-to-end tests: a fast synthetic config and a runner.

Every run uses the same tiny model and batch shapes per paradigm, so the jitted step is
compiled once per paradigm and shared (see `offline_loop._compiled`).
"""

from __future__ import annotations

from rlhf_jax.data import PreferenceTask
from rlhf_jax.train import offline_config, run


def config(paradigm, workdir, loss=None, **kw):
  """The "fast" synthetic config of `paradigm`, writing to `workdir`, without a progress bar."""
  c = offline_config.synthetic_config(paradigm, loss=loss, arg="fast", **kw)
  c.workdir = str(workdir)
  c.progress = False
  return c


def pairs(n, seed=0):
  """`n` synthetic preference pairs."""
  return PreferenceTask().generate(n, seed=seed)


def run_config(c):
  """Runs training for config `c`; returns the run summary."""
  return run.run(c)
