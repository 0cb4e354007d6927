"""Both training loops under `jax.distributed`: 2 CPU processes x 1 device equal 1 process x 2
devices (same mesh data=2), and only process 0 writes metrics."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest

from multihost_testlib import launch

_WORKER = textwrap.dedent("""
    import sys
    port, pid, nproc, loop, workdir = sys.argv[1:6]
    pid, nproc = int(pid), int(nproc)
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if loop == "offline":
      from offline_testlib import config
      c = config("preference", workdir, "dpo")
      c.train.steps, c.train.eval_every = 3, 0
      c.data.eval_batch_size = 32
    else:
      from rlhf_jax import demo
      c = demo.get_config("runlocal")
      c.workdir = workdir
      # 3 steps: the metrics of steps 2 and 3 check the parameters the earlier steps made.
      c.sft.steps, c.train.steps, c.train.prompts_per_step = 5, 3, 8
    c.mesh = dict(data=2, fsdp=1, tensor=1)
    if nproc > 1:
      c.distributed = dict(coordinator_address=f"127.0.0.1:{port}", num_processes=nproc,
                           process_id=pid)
    from rlhf_jax.train import run
    run.run(c)
""")


@pytest.mark.parametrize("loop,keys", [("offline", ("loss", "grad_norm", "logp_accuracy")),
                                       ("online", ("reward_mean", "kl", "pg_loss", "grad_norm"))])
def test_two_processes_equal_one(tmp_path, loop, keys):
  script = tmp_path / "worker.py"
  script.write_text(_WORKER)
  rows = {}
  for nproc, devices in ((1, 2), (2, 1)):
    workdir = tmp_path / f"run{nproc}"
    launch(script, nproc, devices, args=(loop, workdir))
    with open(workdir / "metrics.jsonl") as f:
      rows[nproc] = [json.loads(l) for l in f if f'"{keys[0]}"' in l and '"step"' in l]
  assert len(rows[1]) == len(rows[2]) > 0  # process 1 wrote nothing: no duplicate rows
  for a, b in zip(rows[1], rows[2]):
    for k in keys:
      np.testing.assert_allclose(a[k], b[k], atol=1e-5, rtol=1e-5, err_msg=k)
