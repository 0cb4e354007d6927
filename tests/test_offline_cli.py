"""The command line entry point runs an offline config end to end in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from env_testlib import subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cli_runs_sft_fast_config(tmp_path):
  env = subprocess_env()
  cmd = [sys.executable, "-m", "rlhf_jax.train",
         "--config=experiments/sft_synthetic.py:fast", "--config.train.steps=3",
         f"--config.workdir={tmp_path}", "--config.data.train_size=128",
         "--config.data.eval_size=64"]
  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
                       check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "eval_after" in out.stdout
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert [r["step"] for r in rows if "nll" in r and "eval/nll" not in r] == [1, 2, 3]


def test_cli_rejects_unknown_paradigm(tmp_path):
  env = subprocess_env()
  cmd = [sys.executable, "-m", "rlhf_jax.train", "--config=experiments/sft_synthetic.py:fast",
         "--config.paradigm=dpo", f"--config.workdir={tmp_path}"]
  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
                       check=False)
  assert out.returncode != 0
  assert "config.paradigm='dpo' is unknown" in out.stderr


def test_cli_sets_the_optional_blocks_whole(tmp_path):
  """`mesh` / `distributed` / `value` / `rm_head` are unset in the shipped configs and can be
  set from the command line (here a mesh larger than the one CPU device, so the run stops
  at once with make_mesh's error: the override reached the loop)."""
  env = subprocess_env()
  for config in ("experiments/grpo_arithmetic.py:runlocal", "experiments/dpo_synthetic.py:fast"):
    cmd = [sys.executable, "-m", "rlhf_jax.train", f"--config={config}",
           "--config.mesh={'data': 2, 'fsdp': 1}", f"--config.workdir={tmp_path}"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
                         check=False)
    assert out.returncode != 0
    assert "make_mesh: data*fsdp*tensor = 2*1*1 = 2 but there are 1 devices" in out.stderr, (
        out.stderr[-3000:])


def test_cli_override_of_an_undefined_key_is_one_line():
  env = subprocess_env()
  for module, extra in (("rlhf_jax.train", ["--config=experiments/dpo_synthetic.py:fast"]),
                        ("rlhf_jax.demo", [])):
    for override, want in (
        ("--config.optim.b2=0.99", "--config.optim.b2: the config does not define 'b2'; "),
        ("--config.trian.steps=3", "--config.trian.steps: the config does not define 'trian' "
                                   "(did you mean 'train'?)")):
      out = subprocess.run([sys.executable, "-m", module, *extra, override], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300, check=False)
      assert out.returncode == 1, out.stderr[-2000:]
      assert want in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]
