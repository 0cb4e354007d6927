"""benchmarks/grpo_vs_peers.py end to end on the tiny model (rlhf_jax only; a peer that
is not installed is reported as such), two rounds: the table and the JSON are written."""

from __future__ import annotations

import json
import sys

from bench_testlib import run_script  # tests/bench_testlib.py

from benchmarks import grpo_vs_peers


def test_tiny_two_rounds_write_table_and_json(tmp_path):
  out = tmp_path / "peers.json"
  proc = run_script(
      [sys.executable, "-m", "benchmarks.grpo_vs_peers", "--peers=rlhf_jax,tunix",
       "--sizes=tiny", "--steps=2", "--warmup=1", "--rounds=2", f"--out={out}"])
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "rlhf_jax" in proc.stdout and "GFLOP/s" in proc.stdout
  data = json.loads(out.read_text())
  assert data["meta"]["rounds"] == 2
  ours = [r for r in data["rows"] if r["peer"] == "rlhf_jax"]
  assert len(ours) == 1 and ours[0]["status"] == "ok"
  assert len(ours[0]["round_medians"]) == 2 and len(ours[0]["step_times"]) == 4
  assert 0 < ours[0]["step_s"] < 5 and 0 < ours[0]["mfu"] < 1
  assert ours[0]["compile_s"] > 0
  assert sum(r["peer"] == "rlhf_jax" for r in data["runs"]) == 2
  tunix = [r for r in data["rows"] if r["peer"] == "tunix"][0]
  assert tunix["status"] in ("ok", "not installed")


def test_trl_failure_from_a_kernels_mismatch_names_the_fix(monkeypatch):
  def broken(*args):
    raise RuntimeError("Failed to import trl.trainer.grpo_trainer: Either a revision or a "
                       "version must be specified.")
  monkeypatch.setitem(grpo_vs_peers.RUNNERS, "trl", broken)
  out = grpo_vs_peers._safe_run("trl", "tiny", "unused", 1, 0, 1)
  assert out["status"] == "failed"
  assert "`pip install -U transformers`, or `pip uninstall kernels`" in out["error"]
  monkeypatch.setitem(grpo_vs_peers.RUNNERS, "tunix", broken)  # only TRL's import has it
  assert "pip uninstall" not in grpo_vs_peers._safe_run("tunix", "tiny", "unused", 1, 0, 1)["error"]
