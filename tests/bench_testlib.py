"""Runs a benchmark from tests: `python -m benchmarks.<name>` in a CPU subprocess in the repository
root."""

from __future__ import annotations

import pathlib
import subprocess

from env_testlib import subprocess_env

ROOT = pathlib.Path(__file__).resolve().parent.parent


def run_script(argv, *, timeout: float = 600, **env) -> subprocess.CompletedProcess:
  """`argv` run from the repository root on one CPU device."""
  full_env = subprocess_env(**env)
  return subprocess.run(argv, cwd=ROOT, env=full_env, capture_output=True, text=True,
                        timeout=timeout)
