"""Runs a benchmark from tests: `python -m benchmarks.<name>` in a CPU subprocess in the repository
root."""

from __future__ import annotations

import os
import pathlib
import subprocess

ROOT = pathlib.Path(__file__).resolve().parent.parent


def run_script(argv, *, timeout: float = 600, **env) -> subprocess.CompletedProcess:
  """`argv` run from the repository root on one CPU device (no fake-device XLA_FLAGS)."""
  full_env = dict(os.environ, JAX_PLATFORMS="cpu", **env)
  full_env.pop("XLA_FLAGS", None)
  return subprocess.run(argv, cwd=ROOT, env=full_env, capture_output=True, text=True,
                        timeout=timeout)
