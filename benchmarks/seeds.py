"""Seed sweeps in one program: wall time of the demo's fused step with N vmapped seeds.

For N in --seeds (default 1, 4, 8) this builds the default demo (`rlhf_jax.demo`: SFT
warm-up skipped, GRPO on 2-digit addition, 32 prompts x G = 8 per seed) with
`config.seeds = N` through `rlhf_jax.train.online_loop.setup` (the path `train` takes),
runs --steps steps after one warm-up (compiling) step, and reports the median step time,
the time per seed-step and the ratio to N = 1. One process, the sizes one after another
(the host is shared: compare only numbers from one run).

  python -m benchmarks.seeds [--seeds=1,4,8] [--steps=10] [--out=benchmarks/results/seeds.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time

import jax

from benchmarks.sampler import _cpu_name
from rlhf_jax import demo
from rlhf_jax.train import online_loop
from rlhf_jax.train.loop import default_put_batch
from rlhf_jax.train.placement import host_arrays


def time_seeds(n: int, steps: int):
  """(compile + first step seconds, [steady step seconds]) of the demo with `n` seeds."""
  c = demo.get_config()
  c.seeds, c.sft.steps, c.progress = n, 0, False
  built = online_loop.setup(c)
  _, _, state = built.init_states(c, [r.params for r in built.runs])
  update = built.make_update(c, None, None)
  rng = jax.random.PRNGKey(0) if n == 1 else jax.numpy.stack(built.rngs)
  times = []
  for i in range(steps + 1):
    batch = default_put_batch(host_arrays(next(built.batches)))
    t0 = time.perf_counter()
    state, metrics = update(state, batch, rng)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t0)
  return times[0], times[1:]


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--seeds", default="1,4,8")
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--out", default="benchmarks/results/seeds.json")
  args = ap.parse_args(argv)
  rows = []
  for n in [int(s) for s in args.seeds.split(",")]:
    first, steady = time_seeds(n, args.steps)
    med = statistics.median(steady)
    rows.append({"seeds": n, "first_step_s": first, "step_s": med, "per_seed_step_s": med / n,
                 "steps": steady})
  base = rows[0]["step_s"]
  print(f"{'seeds':>5} {'first step s':>12} {'step s':>8} {'per seed-step s':>16} {'x N=1':>6}")
  for r in rows:
    r["ratio_to_first"] = r["step_s"] / base
    print(f"{r['seeds']:>5} {r['first_step_s']:>12.1f} {r['step_s']:>8.3f} "
          f"{r['per_seed_step_s']:>16.4f} {r['ratio_to_first']:>6.2f}")
  out = {"date": datetime.date.today().isoformat(), "cpu": _cpu_name(),
         "devices": str(jax.devices()), "jax": jax.__version__, "cores": os.cpu_count(),
         "rows": rows}
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(out, f, indent=1)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
