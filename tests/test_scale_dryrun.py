"""The multi-host dry run (`experiments/deep_dryrun.py`) as 2 processes x 4 CPU devices.

Both processes run `python -m rlhf_jax.train` with the command-line overrides of
docs/scale.md ("TPU pods and multi-host") on a data=2, fsdp=2, tensor=2 mesh over the 8
global devices, with a checkpoint in the shared workdir. Each records the metric rows it
computed (process 1 writes no files): both must finish the 2 steps with the same finite
metrics, and the checkpoint of step 2 must be complete.
"""

from __future__ import annotations

import json
import math
import os
import textwrap

import pytest

from multihost_testlib import launch

# `:runlocal` is 2 layers instead of SmolLM2's 30: the sampler unrolls the layers, so the
# compile time of the step grows with depth (30 layers: ~105 s CPU per process, 2 layers
# ~59 s; docs/scale.md).
ARG = "runlocal"

_WORKER = textwrap.dedent("""
    import json, os, runpy, sys
    port, pid, nproc, workdir, config = sys.argv[1:6]
    from rlhf_jax.train import metrics_io, online_loop

    class Recording(metrics_io.MetricsWriter):
      def close(self):
        super().close()
        with open(os.path.join(workdir + "_rows", f"{pid}.json"), "w") as f:
          json.dump(self.history, f)

    online_loop.MetricsWriter = Recording
    os.makedirs(workdir + "_rows", exist_ok=True)
    sys.argv = ["rlhf_jax.train", f"--config={config}", f"--config.workdir={workdir}",
                "--config.mesh={'data': 2, 'fsdp': 2, 'tensor': 2}",
                "--config.distributed={'coordinator_address': '127.0.0.1:%s', "
                "'num_processes': %s, 'process_id': %s}" % (port, nproc, pid)]
    runpy.run_module("rlhf_jax.train", run_name="__main__", alter_sys=True)
""")


# Out of CI (`-m slow` runs it): tests/test_multihost_loops.py runs the online and offline
# loops in 2 processes against 1, and tests/test_online.py the data x fsdp x tensor mesh.
@pytest.mark.slow
def test_two_processes_four_devices_each(tmp_path):
  script = tmp_path / "worker.py"
  script.write_text(_WORKER)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  config = os.path.join(root, "experiments", "deep_dryrun.py") + f":{ARG}"
  workdir = tmp_path / "run"
  launch(script, 2, 4, args=(workdir, config))
  rows = {}
  for pid in (0, 1):
    with open(f"{workdir}_rows/{pid}.json") as f:
      rows[pid] = [r for r in json.load(f) if "reward_mean" in r]
  assert [r["step"] for r in rows[0]] == [1, 2]
  for a, b in zip(rows[0], rows[1]):
    for k in ("reward_mean", "kl", "pg_loss", "grad_norm", "entropy"):
      assert math.isfinite(a[k]), (k, a)
      assert a[k] == b[k], (k, a[k], b[k])
  assert max(r["grad_norm"] for r in rows[0]) > 0   # the step learned from something
  with open(workdir / "metrics.jsonl") as f:   # written by process 0 only
    assert sum('"reward_mean"' in line for line in f) == 2
  step_dir = workdir / "checkpoints" / "2"
  assert (step_dir / "rlhf_integrity.json").is_file() and (step_dir / "state").is_dir()
