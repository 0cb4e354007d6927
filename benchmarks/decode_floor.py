"""How close decoding is to this machine's floor, and what that leaves for the GRPO step's MFU.

Decoding a few rows is memory-bound: every new token reads every weight once. For the model
and shapes of `grpo_vs_peers.py` (1 prompt x G = 4 rows x 32 new tokens) this measures, in one
process:

* stream: GB/s of one float32 sum over as many bytes as the model's weights (the read rate
  the memory system gives a plain pass);
* weight matmuls: the decode step's weight matmuls alone (every kernel and the LM head, for
  the same number of rows), chained over the same number of tokens in a `fori_loop`: the
  floor a decoder built from library matmuls can reach here;
* sampler: `rlhf_jax.sampling.sample` for the same prompt, rows and tokens (prefill, attention,
  norms and token selection included);
* the float32 matmul peak, and from it an MFU ceiling for the GRPO step: the decode steps at
  the weight-matmul rate plus every other FLOP of `grpo_vs_peers.step_flops` (prefill,
  reference and policy passes) at the matmul peak, with the optimiser and all non-matmul work
  counted as free. It is an upper bound under the step's FLOP count; rlhf_jax computes each
  prompt once where the count has it G times, which is the one way a step can exceed it.

  python -m benchmarks.decode_floor [--sizes=tiny,20m] [--repeats=10] [--out=...json]
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import grpo_vs_peers as peers
from benchmarks.sampler import _cpu_name, _timed, matmul_peak, write_results
from rlhf_jax import models
from rlhf_jax.sampling import sample


def _median_s(fn, repeats: int) -> tuple[float, float]:
  """Median and fastest seconds of fn(1..repeats) after a warm-up call fn(0)."""
  jax.block_until_ready(fn(0))
  times = [_timed(lambda i=i: jax.block_until_ready(fn(i + 1))) for i in range(repeats)]
  return statistics.median(times), min(times)


def matmul_kernels(params) -> list:
  """Every weight the decode step multiplies by, as a 2-D [in, out] matrix (embedding excluded:
  it is gathered, not multiplied)."""
  out = []
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    name = jax.tree_util.keystr(path)
    if leaf.ndim < 2 or "embed" in name:
      continue
    # [d, heads, head_dim] projections read [d, -1]; the output projection [heads, head_dim, d].
    rows = leaf.shape[0] if "o_kernel" not in name else int(np.prod(leaf.shape[:-1]))
    out.append(jnp.reshape(leaf, (rows, -1)))
  if not any("lm_head" in jax.tree_util.keystr(p) for p, _ in
             jax.tree_util.tree_leaves_with_path(params)):  # tied: the LM head is embedding.T
    embed = [x for p, x in jax.tree_util.tree_leaves_with_path(params)
             if jax.tree_util.keystr(p).endswith("['embed']") and x.ndim == 2]
    out += [e.T for e in embed]
  return out


def _token(kernels, x):
  acc = jnp.zeros((), jnp.float32)
  for k in kernels:
    acc = acc + jnp.sum(x[:, :k.shape[0]] @ k)
  return x + 1e-9 * acc  # the next token depends on this one, as in decoding


def weight_matmul_chain(kernels, rows: int, tokens: int):
  """jitted fn(kernels, seed): all `kernels` applied to `rows` rows, token after token."""
  width = max(k.shape[0] for k in kernels)

  @jax.jit
  def run(ks, seed):
    x = jax.random.normal(jax.random.PRNGKey(seed), (rows, width), jnp.float32)
    return jax.lax.fori_loop(0, tokens, lambda _, y: _token(ks, y), x)

  return run


def measure(size: str, repeats: int) -> dict:
  hf = peers.hf_config(size)
  model = models.from_config(hf)
  params = models.unstack_layers(model.init(jax.random.PRNGKey(peers.SEED)))
  kernels = matmul_kernels(params)
  weight_bytes = sum(k.size * k.dtype.itemsize for k in kernels)
  w = peers.SIZES[size]
  rows, tokens = w.rows, w.new_tokens

  flat = jnp.ones((weight_bytes // 4,), jnp.float32)
  total = jax.jit(jnp.sum)
  stream_s, _ = _median_s(lambda i: total(flat), repeats)

  # The first new token comes from the prefill's logits: tokens - 1 decode steps follow.
  chain = weight_matmul_chain(kernels, rows, tokens - 1)
  chain_s, chain_min = _median_s(lambda i: chain(kernels, i), repeats)

  ids = jnp.asarray(peers.prompt_ids(size))
  mask = jnp.ones_like(ids, bool)
  sc = peers.sampling_config(size)
  run = jax.jit(lambda p, seed: sample(model, p, ids, mask, jax.random.PRNGKey(seed),
                                       sc).completion_ids)
  sampler_s, sampler_min = _median_s(lambda i: run(params, i), repeats)

  step_flops = peers.step_flops(size)
  # FLOPs of the decode steps alone (the prefill is counted with the rest, at the peak).
  decode_flops = rows * (peers.forward_flops(hf, w.prompt_len + tokens - 1)
                         - peers.forward_flops(hf, w.prompt_len))
  return dict(size=size, weight_bytes=weight_bytes, rows=rows, tokens=tokens,
              stream_gb_s=weight_bytes / stream_s / 1e9,
              matmul_ms_per_token=chain_s / (tokens - 1) * 1e3,
              matmul_gb_s=weight_bytes * (tokens - 1) / chain_s / 1e9,
              matmul_min_ms_per_token=chain_min / (tokens - 1) * 1e3,
              sampler_ms_per_token=sampler_s / tokens * 1e3,
              sampler_min_ms_per_token=sampler_min / tokens * 1e3,
              step_flops=step_flops, decode_flops=decode_flops)


def add_ceiling(row: dict, peak: float) -> dict:
  """Step MFU if sampling ran at the weight-matmul rate and everything else at the peak."""
  sampling_s = row["matmul_ms_per_token"] * (row["tokens"] - 1) / 1e3
  rest_s = (row["step_flops"] - row["decode_flops"]) / peak
  row["step_floor_s"] = sampling_s + rest_s
  row["mfu_ceiling"] = row["step_flops"] / row["step_floor_s"] / peak
  return row


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--sizes", default="tiny,20m", help="comma list of " + ", ".join(peers.SIZES))
  ap.add_argument("--repeats", type=int, default=10)
  ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                "decode_floor.json"))
  args = ap.parse_args(argv)
  sizes = peers._parse_list(args.sizes, tuple(peers.SIZES), "--sizes")  # pylint: disable=protected-access
  if args.repeats < 1:
    raise SystemExit("--repeats must be >= 1")
  peak = max(matmul_peak(1024), matmul_peak(2048, repeats=3))
  rows = [add_ceiling(measure(size, args.repeats), peak) for size in sizes]
  print(f"float32 matmul peak {peak / 1e9:.1f} GFLOP/s; {rows[0]['rows']} rows x "
        f"{rows[0]['tokens']} tokens; medians of {args.repeats} calls")
  print("size  weights MB  stream GB/s  matmuls ms/tok (GB/s)  sampler ms/tok  "
        "sampler/matmuls  step floor s  MFU ceiling")
  for r in rows:
    print(f"{r['size']:5s} {r['weight_bytes'] / 1e6:10.1f} {r['stream_gb_s']:12.1f} "
          f"{r['matmul_ms_per_token']:9.2f} ({r['matmul_gb_s']:5.1f}) {r['sampler_ms_per_token']:15.2f} "
          f"{r['sampler_ms_per_token'] / r['matmul_ms_per_token']:16.2f} {r['step_floor_s']:13.3f} "
          f"{r['mfu_ceiling']:11.1%}")
  meta = dict(date=datetime.date.today().isoformat(), cpu=_cpu_name(), cores=os.cpu_count(),
              jax=jax.__version__, matmul_peak_flop_s=peak, repeats=args.repeats)
  write_results(args.out, meta, rows)


if __name__ == "__main__":
  main()
