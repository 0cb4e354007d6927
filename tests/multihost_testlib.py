"""Launching a test worker script as N CPU processes under `jax.distributed` on localhost."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from env_testlib import subprocess_env


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(script, nproc: int, devices: int, args=(), timeout: float = 400) -> None:
  """Runs `python script PORT PID NPROC *args` as `nproc` processes of `devices` CPU devices
  each (cwd: the tests directory; PYTHONPATH: the tests directory, then the repository root,
  so the checkout's `rlhf_jax` and `experiments` are imported); asserts every one exits
  with 0."""
  here = os.path.dirname(os.path.abspath(__file__))
  root = os.path.dirname(here)
  env = subprocess_env(devices, PYTHONPATH=os.pathsep.join(
      [here, root, os.environ.get("PYTHONPATH", "")]))
  port = str(free_port())
  procs = [subprocess.Popen([sys.executable, str(script), port, str(i), str(nproc),
                             *map(str, args)], env=env, cwd=here, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT) for i in range(nproc)]
  for p in procs:
    out, _ = p.communicate(timeout=timeout)
    assert p.returncode == 0, out.decode()[-3000:]
