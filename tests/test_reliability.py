"""Loop-level reliability through the command line (subprocesses, CPU, bitwise).

One scenario per loop (online GRPO, offline DPO), sharing its processes:
  reference: an uninterrupted run of N steps;
  run 1: SIGKILL once checkpoint k (random) is committed;
  run 2: the same command resumes; SIGTERM once two more steps are committed:
         it saves and exits 0 within a bounded time;
  the newest checkpoint is then truncated on disk;
  run 3: the same command warns, falls back to the previous checkpoint, finishes.
The metrics of every step (last row per step) and the final train state equal
the reference bit for bit.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from rlhf_jax import checkpoint as ckpt_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 8
TIMING_KEYS = ("tokens_per_second",)
SIGTERM_EXIT_SECONDS = 60


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  cache = str(tmp_path_factory.mktemp("xla_cache"))
  return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", JAX_COMPILATION_CACHE_DIR=cache,
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


class Proc:
  """A CLI run in a subprocess with its output in files (no pipe can fill up)."""

  def __init__(self, arg: str, workdir, env, tag: str):
    self.workdir = str(workdir)
    self.out = open(os.path.join(os.path.dirname(self.workdir), f"{tag}.out"), "w+")
    self.err = open(os.path.join(os.path.dirname(self.workdir), f"{tag}.err"), "w+")
    cmd = [sys.executable, "-m", "rlhf_jax.train",
           f"--config=tests/reliability_configs.py:{arg}", f"--config.workdir={self.workdir}",
           f"--config.train.steps={STEPS}"]
    self.p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self.out, stderr=self.err)

  def wait(self, timeout=420):
    rc = self.p.wait(timeout=timeout)
    self.out.seek(0)
    self.err.seek(0)
    return rc, self.out.read(), self.err.read()

  def wait_for_checkpoint(self, step: int, timeout=300):
    path = os.path.join(self.workdir, "checkpoints", str(step), ckpt_lib.INTEGRITY_FILE)
    t0 = time.time()
    while not os.path.exists(path):
      if self.p.poll() is not None:
        rc, out, err = self.wait()
        raise AssertionError(f"run exited (rc={rc}) before checkpoint {step}:\n{err[-3000:]}")
      assert time.time() - t0 < timeout, f"no checkpoint {step} after {timeout} s"
      time.sleep(0.02)


def committed(workdir):
  return ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False).all_steps()


def metrics_by_step(workdir):
  """{step: {key: value}}; later rows (after a resume) override earlier ones."""
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      step = row.pop("step")
      out.setdefault(step, {}).update({k: v for k, v in row.items() if k not in TIMING_KEYS})
  return out


def final_state(workdir):
  ck = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  assert ck.latest_step() == STEPS
  state, _, _, _ = ck.restore(None, STEPS)
  return jax.tree.map(np.asarray, state)


def truncate_one_file(step_dir):
  """Halves the largest file of a checkpoint step (a partial copy / full disk)."""
  files = [os.path.join(r, n) for r, _, ns in os.walk(step_dir) for n in ns]
  biggest = max(files, key=os.path.getsize)
  with open(biggest, "r+b") as f:
    f.truncate(os.path.getsize(biggest) // 2)
  return biggest


@pytest.mark.parametrize("arg", ["online", "dpo"])
def test_kill_sigterm_truncation_resume_bitwise(arg, env, tmp_path):
  for d in ("ref", "run"):
    os.makedirs(tmp_path / d)
  ref = Proc(arg, tmp_path / "ref" / "w", env, "ref")
  ref.wait_for_checkpoint(1)  # compiled and cached: the other runs reuse the executables
  wd = tmp_path / "run" / "w"

  # Run 1: SIGKILL right after a randomly chosen checkpoint is committed.
  k = random.Random().randint(1, 3)
  run = Proc(arg, wd, env, "run1")
  run.wait_for_checkpoint(k)
  run.p.send_signal(signal.SIGKILL)
  assert run.wait()[0] == -signal.SIGKILL
  killed_at = committed(wd)[-1]
  assert k <= killed_at < STEPS, (k, killed_at)

  # Run 2: resumes; SIGTERM after two more steps -> saves, exits 0 in bounded time.
  run = Proc(arg, wd, env, "run2")
  run.wait_for_checkpoint(killed_at + 2)
  t0 = time.time()
  run.p.send_signal(signal.SIGTERM)
  rc, out, err = run.wait(timeout=SIGTERM_EXIT_SECONDS)
  assert rc == 0, err[-3000:]
  assert time.time() - t0 < SIGTERM_EXIT_SECONDS
  stopped_at = int(out.split("stopped_at:")[1].split()[0])
  assert stopped_at >= killed_at + 2
  assert "stopped by signal after saving step" in err
  assert committed(wd)[-1] == stopped_at  # the stop step was saved
  resumed = "resumed_from" if arg == "online" else "start_step"
  assert f"{resumed}: {killed_at}\n" in out, out
  if stopped_at == STEPS:
    pytest.fail("the run finished before SIGTERM arrived; raise STEPS")

  # Truncate the newest checkpoint; run 3 falls back to the previous one with a warning.
  truncate_one_file(os.path.join(wd, "checkpoints", str(stopped_at)))
  rc, out, err = Proc(arg, wd, env, "run3").wait()
  assert rc == 0, err[-3000:]
  assert f"checkpoint step {stopped_at}" in err and "Falling back" in err, err[-3000:]
  assert f"{resumed}: {stopped_at - 1}\n" in out, out

  rc, _, err = ref.wait()
  assert rc == 0, err[-3000:]
  a, b = metrics_by_step(str(ref.workdir)), metrics_by_step(str(wd))
  assert sorted(a) == sorted(b) and set(range(1, STEPS + 1)) <= set(a)
  for step in sorted(a):
    assert a[step] == b[step], f"step {step}: {a[step]} != {b[step]}"
  sa, sb = final_state(ref.workdir), final_state(str(wd))
  assert jax.tree.structure(sa) == jax.tree.structure(sb)
  for x, y in zip(jax.tree.leaves(sa), jax.tree.leaves(sb)):
    np.testing.assert_array_equal(x, y)
  # The test can fail: training moved the parameters away from the first checkpoint.
  first = ckpt_lib.Checkpointer(os.path.join(ref.workdir, "checkpoints"),
                                async_save=False).restore(None, 1)[0]
  moved = [not np.array_equal(np.asarray(x), y) for x, y in
           zip(jax.tree.leaves(first["params"]), jax.tree.leaves(sa["params"]))]
  assert any(moved)
