"""Sampler throughput: rlhf_jax `sample` vs transformers `generate` on the same weights.

Two random-init Llama models (~1M params, overhead-bound; ~20M params, hidden 512, 6
layers), batch 8 and 32, 16-token prompts, 128 new tokens, greedy decoding with no EOS
(both generate all 128 tokens), CPU, float32. Reports tokens/s, the speed-up, rlhf_jax
compile time, and achieved FLOP/s against a float32 matmul peak measured in the same run.

  python -m benchmarks.sampler [--repeats 3] [--out benchmarks/results/sampler.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import models as M
from rlhf_jax.sampling import SamplingConfig, sample

PROMPT_LEN, NEW_TOKENS = 16, 128
MODELS = {
    "tiny-1M": dict(vocab_size=1024, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=4, intermediate_size=256),
    "small-20M": dict(vocab_size=1024, hidden_size=512, num_hidden_layers=6, num_attention_heads=8,
                      num_key_value_heads=8, intermediate_size=1376),
}
BATCHES = (8, 32)


def _cpu_name() -> str:
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
      if line.startswith("Model name"):
        return line.split(":", 1)[1].strip()
  except (OSError, subprocess.CalledProcessError):
    pass
  return platform.processor()


def write_results(path: str, meta: dict, rows: list) -> None:
  """Writes `{"meta": meta, "rows": rows}` as JSON to `path` (folders made) and says so."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(dict(meta=meta, rows=rows), f, indent=1)
  print(f"wrote {path}")


def matmul_peak(n: int = 1024, repeats: int = 10) -> float:
  """Best float32 FLOP/s of an n x n x n matmul in JAX on this machine."""
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = min(_timed(lambda: f(a).block_until_ready()) for _ in range(repeats))
  return 2 * n ** 3 / best


def _timed(fn) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def decode_flops(spec: dict, batch: int) -> float:
  """Matmul FLOPs of prefill + 128 decode steps (2 * MACs; attention over the live context)."""
  d, f, l, v = spec["hidden_size"], spec["intermediate_size"], spec["num_hidden_layers"], spec["vocab_size"]
  kv = d * spec["num_key_value_heads"] // spec["num_attention_heads"]
  per_token = 2 * l * (2 * d * d + 2 * d * kv + 3 * d * f) + 2 * d * v
  total_tokens = PROMPT_LEN + NEW_TOKENS
  # attention: q.k and p.v, 2 * 2 * d per (query, key) pair, keys = tokens so far.
  attn = sum(4 * l * d * (t + 1) for t in range(total_tokens))
  return batch * (per_token * total_tokens + attn)


def build(spec: dict, tmp: str):
  import torch
  import transformers
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(**spec, max_position_embeddings=512, rms_norm_eps=1e-6,
                                 tie_word_embeddings=False, bos_token_id=None,
                                 eos_token_id=None, pad_token_id=0)
  hf = transformers.LlamaForCausalLM(cfg).eval().to(torch.float32)
  hf.save_pretrained(tmp)
  model, params = M.load_hf(tmp, dtype=jnp.float32)
  n_params = sum(p.numel() for p in hf.parameters())
  return hf, model, params, n_params


def bench_jax(model, params, ids, repeats):
  config = SamplingConfig(max_new_tokens=NEW_TOKENS, temperature=0.0, pad_id=0)
  fn = jax.jit(sample, static_argnums=(0, 5))
  mask = jnp.ones(ids.shape, bool)
  ids = jnp.asarray(ids, jnp.int32)
  t0 = time.perf_counter()
  compiled = fn.lower(model, params, ids, mask, jax.random.key(0), config).compile()
  compile_s = time.perf_counter() - t0
  out = jax.block_until_ready(compiled(params, ids, mask, jax.random.key(0)))  # warm-up
  run = lambda: jax.block_until_ready(compiled(params, ids, mask, jax.random.key(0)))
  times = [_timed(run) for _ in range(repeats)]
  return min(times), compile_s, np.asarray(out.completion_ids)


def bench_hf(hf, ids, repeats):
  import torch
  x = torch.tensor(ids)
  kw = dict(attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
            do_sample=False, pad_token_id=0, eos_token_id=None)
  with torch.no_grad():
    out = hf.generate(x, **kw)  # warm-up
    times = [_timed(lambda: hf.generate(x, **kw)) for _ in range(repeats)]
  return min(times), out[:, ids.shape[1]:].numpy()


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--hf-repeats", type=int, default=2)
  ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "sampler.json"))
  args = ap.parse_args()
  import torch
  torch.set_num_threads(os.cpu_count() or 1)

  peak = matmul_peak()
  rows = []
  for name, spec in MODELS.items():
    with tempfile.TemporaryDirectory() as tmp:
      hf, model, params, n_params = build(spec, tmp)
    for batch in BATCHES:
      ids = np.random.RandomState(batch).randint(1, spec["vocab_size"], (batch, PROMPT_LEN))
      jt, compile_s, jtok = bench_jax(model, params, ids, args.repeats)
      ht, htok = bench_hf(hf, ids, args.hf_repeats)
      toks = batch * NEW_TOKENS
      flops = decode_flops(spec, batch)
      rows.append(dict(model=name, params=n_params, batch=batch, new_tokens=NEW_TOKENS,
                       rlhf_jax_tok_s=toks / jt, transformers_tok_s=toks / ht, speedup=ht / jt,
                       compile_s=compile_s, rlhf_jax_flop_s=flops / jt,
                       transformers_flop_s=flops / ht, peak_frac=flops / jt / peak,
                       same_tokens=bool((jtok == htok).all()),
                       token_agreement=float((jtok == htok).mean())))
      print(f"{name} B={batch}: rlhf_jax {toks / jt:.0f} tok/s, transformers {toks / ht:.0f} tok/s, "
            f"ratio {ht / jt:.1f}x, compile {compile_s:.1f} s", flush=True)

  hdr = (f"{'model':10} {'params':>8} {'B':>3} {'rlhf_jax tok/s':>15} {'transformers tok/s':>19} "
         f"{'ratio':>7} {'compile s':>9} {'GFLOP/s':>8} {'% peak':>7} {'same':>5}")
  print(f"\nfloat32 matmul peak (1024^3, JAX): {peak / 1e9:.1f} GFLOP/s")
  print(hdr)
  for r in rows:
    print(f"{r['model']:10} {r['params'] / 1e6:7.2f}M {r['batch']:3d} {r['rlhf_jax_tok_s']:15.0f} "
          f"{r['transformers_tok_s']:19.0f} {r['speedup']:6.1f}x {r['compile_s']:9.2f} "
          f"{r['rlhf_jax_flop_s'] / 1e9:8.2f} {100 * r['peak_frac']:6.1f}% {str(r['same_tokens']):>5}")
  meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              cpu=_cpu_name(), cores=os.cpu_count(), jax=jax.__version__,
              torch=torch.__version__, matmul_peak_flop_s=peak, prompt_len=PROMPT_LEN,
              decoding="greedy, no EOS, float32", repeats=args.repeats, hf_repeats=args.hf_repeats)
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as fh:
    json.dump(dict(meta=meta, rows=rows), fh, indent=2)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
