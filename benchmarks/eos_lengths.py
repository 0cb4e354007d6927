"""Long generations with EOS: decode time when half the rows stop early, with and without
compacting the decode batch (`SamplingConfig.compact_stages`), and the sampler's memory as
the generation grows.

One random-init Llama of `grpo_vs_peers.py` (default: the 20M size), 2 prompts x G = 8 rows,
`--new-tokens` T new tokens, temperature 1. Half the rows (the prompts of length P / 2) emit
EOS at new token T / 4; the other half never does. The EOS is forced by a wrapper around
the model's logits (`StopEarly`: the EOS logit is +1e9 at that position of those rows and
-1e9 everywhere else), so the sampler's own EOS path (done flags, early exit, compaction)
runs unchanged. Workloads, same rows and T:

  * no EOS: every row generates T tokens (the cost of the budget);
  * EOS (half at T/4), compact 0: the loop runs until the last row stops (T steps);
  * EOS (half at T/4), compact 1: after T/4 steps the 8 live rows continue as a batch of 8;
  * all stop at T/4: every row stops at T/4 (early exit; the floor).

Also the compiled sampler's memory (arguments + outputs + temporaries, from XLA's memory
analysis) at T, 2T and 4T: it grows linearly in T (the KV cache and the [N, T] outputs).

  python -m benchmarks.eos_lengths [--size=20m] [--new-tokens=1024] [--repeats=3] \
      [--out=benchmarks/results/eos_lengths.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import statistics
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import grpo_vs_peers as peers
from benchmarks.sampler import _cpu_name, _timed, write_results
from rlhf_jax import models
from rlhf_jax.sampling import SamplingConfig, sample

PROMPTS, GROUP, PROMPT_LEN, EOS = 2, 8, 64, 1


@dataclasses.dataclass(frozen=True, eq=False)
class StopEarly:
  """A decoder whose rows with a padded prompt emit `eos` as new token `stop_at`.

  The rows are recognised by their first cache slot being padding (`kv_mask[:, 0]`), so the
  rule follows a row through the sampler's compaction; `eos` is never chosen elsewhere.
  """
  model: Any
  eos: int
  stop_at: int  # absolute position of the forced EOS: short prompt length + T / 4
  enabled: bool = True

  def __getattr__(self, name):
    return getattr(self.model, name)

  def logits_from_hidden(self, params, h):
    return self.model.logits_from_hidden(params, h).at[..., self.eos].set(-1e9)

  def decode(self, params, ids, positions, cache, **kw):
    logits, cache = self.model.decode(params, ids, positions, cache, **kw)
    short = ~kw["kv_mask"][:, :1]  # [N, 1]: the prompt was left-padded
    force = short & (positions + 1 == self.stop_at) & self.enabled
    return logits.at[..., self.eos].set(jnp.where(force, 1e9, -1e9)), cache


def prompts(vocab: int, prompt_len: int):
  """Prompt 0 has all `prompt_len` tokens; prompt 1 half of them (left-padded)."""
  ids = np.random.RandomState(0).randint(2, vocab, (PROMPTS, prompt_len)).astype(np.int32)
  mask = np.ones_like(ids, bool)
  mask[1, :prompt_len // 2] = False
  return jnp.asarray(np.where(mask, ids, 0)), jnp.asarray(mask)


def workloads(new_tokens: int) -> dict:
  base = SamplingConfig(max_new_tokens=new_tokens, temperature=1.0, pad_id=0,
                        num_samples=GROUP, eos_ids=(EOS,))
  return {"no EOS": (dataclasses.replace(base, eos_ids=()), False),
          "EOS half at T/4, compact 0": (base, True),
          "EOS half at T/4, compact 1": (dataclasses.replace(base, compact_stages=1), True),
          "all stop at T/4": (base, "all")}


def measure(model, params, ids, mask, config, stop, repeats: int) -> dict:
  stop_at = PROMPT_LEN // 2 + config.max_new_tokens // 4
  if stop == "all":  # every row: pad both prompts alike, so every row is "short"
    mask = mask.at[0].set(mask[1])
    ids = jnp.where(mask, ids, 0)
  wrapped = StopEarly(model, EOS, stop_at, enabled=bool(stop))
  fn = jax.jit(lambda p, seed: sample(wrapped, p, ids, mask, jax.random.PRNGKey(seed), config))
  compile_s = _timed(lambda: fn.lower(params, 0).compile())
  out = jax.block_until_ready(fn(params, 0))  # warm-up
  times = [_timed(lambda i=i: jax.block_until_ready(fn(params, i + 1))) for i in range(repeats)]
  lengths = np.asarray(out.lengths)
  return dict(s=statistics.median(times), s_min=min(times), compile_s=compile_s,
              tokens=int(lengths.sum()), rows_stopped=int(np.sum(np.asarray(out.finished))),
              lengths=sorted(set(lengths.tolist())))


def memory_bytes(model, params, ids, mask, new_tokens: int) -> dict:
  """XLA's memory analysis of the compiled sampler (no run)."""
  config = SamplingConfig(max_new_tokens=new_tokens, temperature=1.0, num_samples=GROUP)
  fn = jax.jit(lambda p, seed: sample(model, p, ids, mask, jax.random.PRNGKey(seed), config))
  mem = fn.lower(params, 0).compile().memory_analysis()
  if mem is None:
    return dict(new_tokens=new_tokens, status="no memory analysis on this backend")
  fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes")
  out = {f: int(getattr(mem, f)) for f in fields}
  out["total_bytes"] = sum(out.values())
  return dict(new_tokens=new_tokens, **out)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--size", default="20m", choices=tuple(peers.SIZES))
  ap.add_argument("--new-tokens", type=int, default=1024)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                "eos_lengths.json"))
  args = ap.parse_args()
  if args.new_tokens < 8 or args.new_tokens % 4 or args.repeats < 1:
    raise SystemExit("--new-tokens must be a multiple of 4 and >= 8; --repeats >= 1")
  hf = dict(peers.hf_config(args.size), max_position_embeddings=PROMPT_LEN + 4 * args.new_tokens)
  model = models.from_config(hf)
  params = model.init(jax.random.PRNGKey(0))
  ids, mask = prompts(hf["vocab_size"], PROMPT_LEN)
  rows = []
  for name, (config, stop) in workloads(args.new_tokens).items():
    r = dict(workload=name, **measure(model, params, ids, mask, config, stop, args.repeats))
    rows.append(r)
    print(f"{name:28} {r['s']:8.3f} s (min {r['s_min']:.3f}), compile {r['compile_s']:.1f} s, "
          f"{r['tokens']} tokens, lengths {r['lengths']}", flush=True)
  full = rows[0]["s"]
  for r in rows:
    r["vs_no_eos"] = r["s"] / full
  mem = [memory_bytes(model, params, ids, mask, k * args.new_tokens) for k in (1, 2, 4)]
  print(f"\n{args.size}, {PROMPTS} prompts x G={GROUP}, prompt {PROMPT_LEN} (half: "
        f"{PROMPT_LEN // 2}), T={args.new_tokens}; median of {args.repeats}")
  print(f"{'workload':28} {'s':>8} {'vs no EOS':>9} {'tokens':>7} {'compile s':>9}")
  for r in rows:
    print(f"{r['workload']:28} {r['s']:8.3f} {r['vs_no_eos']:9.2f} {r['tokens']:7d} "
          f"{r['compile_s']:9.1f}")
  print(f"{'new tokens':>10} {'memory MB':>10}")
  for m in mem:
    if "total_bytes" in m:
      print(f"{m['new_tokens']:10d} {m['total_bytes'] / 1e6:10.1f}")
  meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              cpu=_cpu_name(), cores=os.cpu_count(), jax=jax.__version__, size=args.size,
              prompts=PROMPTS, group=GROUP, prompt_len=PROMPT_LEN, new_tokens=args.new_tokens,
              repeats=args.repeats, memory=mem)
  write_results(args.out, meta, rows)


if __name__ == "__main__":
  main()
