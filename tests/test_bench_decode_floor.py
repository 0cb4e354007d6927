"""benchmarks/decode_floor.py: the decode step's weight matmuls, and the script end to end."""

from __future__ import annotations

import json
import sys

from bench_testlib import run_script  # tests/bench_testlib.py
import jax
import numpy as np

from benchmarks import decode_floor, grpo_vs_peers
from rlhf_jax import models


def test_matmul_kernels_are_every_weight_but_embedding_and_norms():
  hf = grpo_vs_peers.hf_config("tiny")
  model = models.from_config(hf)
  params = models.unstack_layers(model.init(jax.random.PRNGKey(0)))
  kernels = decode_floor.matmul_kernels(params)
  d, f, v, layers = (hf["hidden_size"], hf["intermediate_size"], hf["vocab_size"],
                     hf["num_hidden_layers"])
  assert len(kernels) == 7 * layers + 1  # q, k, v, o, gate, up, down per layer + LM head
  shapes = sorted(k.shape for k in kernels)
  want = sorted([(d, d)] * 4 * layers + [(d, f)] * 2 * layers + [(f, d)] * layers + [(d, v)])
  assert shapes == want
  n_params = sum(x.size for x in jax.tree.leaves(params))
  norms = (2 * layers + 1) * d
  assert sum(k.size for k in kernels) == n_params - v * d - norms


def test_chain_computes_every_kernel_once_per_token():
  rng = np.random.RandomState(0)
  kernels = [rng.randn(3, 5).astype(np.float32), rng.randn(2, 4).astype(np.float32)]
  out = decode_floor.weight_matmul_chain(kernels, rows=2, tokens=1)(kernels, 0)
  x = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (2, 3), np.float32), np.float64)
  acc = sum(np.sum(x[:, :k.shape[0]] @ k.astype(np.float64)) for k in kernels)
  np.testing.assert_allclose(np.asarray(out), x + 1e-9 * acc, rtol=1e-6)


def test_ceiling_is_the_flop_weighted_floor():
  row = dict(tokens=33, matmul_ms_per_token=2.0, step_flops=10e9, decode_flops=2e9)
  out = decode_floor.add_ceiling(dict(row), peak=100e9)
  floor = 32 * 2e-3 + 8e9 / 100e9
  assert abs(out["step_floor_s"] - floor) < 1e-12
  assert abs(out["mfu_ceiling"] - 10e9 / floor / 100e9) < 1e-12


def test_script_writes_table_and_json(tmp_path):
  out = tmp_path / "floor.json"
  proc = run_script([sys.executable, "-m", "benchmarks.decode_floor", "--sizes=tiny",
                     "--repeats=1", f"--out={out}"])
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "MFU ceiling" in proc.stdout
  (row,) = json.loads(out.read_text())["rows"]
  assert row["size"] == "tiny" and row["rows"] == 4 and row["tokens"] == 32
  assert row["stream_gb_s"] > 0 and row["matmul_gb_s"] > 0 and row["sampler_ms_per_token"] > 0
  assert 0 < row["mfu_ceiling"] < 10
  bad = run_script([sys.executable, "-m", "benchmarks.decode_floor", "--sizes=huge"])
  assert bad.returncode != 0 and "--sizes" in bad.stderr
