"""Peak memory of a LoRA GRPO step against inference (sampling) on the same batch.

At a `grpo_vs_peers` workload (default "deep": SmolLM2-135M's shape, 2 prompts x G = 8,
64 + 128 tokens) this compiles, without running anything:

  inference   `sampling.sample` of G completions per prompt from the base weights;
  lora        the fused GRPO step (sampling, reference pass, policy pass and gradient,
              AdamW) training rank-r adapters on q/k/v/o (`config.lora`);
  full        the same step training every weight (for comparison).

Each program's footprint is XLA's `memory_analysis()`: arguments + outputs + temporaries −
bytes aliased by donation, i.e. what the program holds at its peak on one device. Rows
cross the training pass's rematerialisation (`model.remat`) with the LM-head vocabulary
chunk (`model.vocab_chunk`); the ratio column is the row's footprint over inference's.

  python -m benchmarks.lora_memory [--size=deep] [--layout=unrolled|scanned] [--rank=8]
      [--remat=none,full] [--vocab-chunks=0,4096] [--out=benchmarks/results/lora_memory.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os

import jax
import jax.numpy as jnp

from benchmarks import grpo_vs_peers as gvp
from benchmarks.sampler import write_results
from rlhf_jax import models
from rlhf_jax.sampling import sample
from rlhf_jax.train import adapters, online, optim
from rlhf_jax.train.rl_config import RLSettings

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
LAYOUTS = ("unrolled", "scanned")


def footprint(compiled) -> dict:
  """Argument, output, temporary and aliased bytes of a compiled program, and the peak."""
  m = compiled.memory_analysis()
  out = dict(argument_bytes=int(m.argument_size_in_bytes),
             output_bytes=int(m.output_size_in_bytes),
             temp_bytes=int(m.temp_size_in_bytes),
             alias_bytes=int(m.alias_size_in_bytes))
  out["peak_bytes"] = (out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"]
                       - out["alias_bytes"])
  return out


def _model(size: str, remat: str, vocab_chunk: int, attention: str = "auto"):
  model = models.from_config(gvp.hf_config(size), dtype=jnp.float32)
  return model.with_options(remat=remat, vocab_chunk=vocab_chunk or None, attention=attention)


def _batch(size: str):
  w = gvp.SIZES[size]
  ids = jax.ShapeDtypeStruct((w.num_prompts, w.prompt_len), jnp.int32)
  return {"prompt_ids": ids, "prompt_mask": jax.ShapeDtypeStruct(ids.shape, jnp.bool_)}


def _sampling(size: str, layout: str):
  return dataclasses.replace(gvp.sampling_config(size), scan_layers=layout == "scanned")


def inference(size: str, layout: str = "unrolled") -> dict:
  """Sampling G completions per prompt from the base weights."""
  model = _model(size, "none", 0)
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0))
  if layout == "unrolled":
    params = jax.eval_shape(models.unstack_layers, params)
  batch, sc = _batch(size), _sampling(size, layout)
  rng = jax.eval_shape(lambda: jax.random.PRNGKey(0))
  fn = jax.jit(lambda p, ids, mask, r: sample(model, p, ids, mask, r, sc))
  return footprint(fn.lower(params, batch["prompt_ids"], batch["prompt_mask"], rng).compile())


def step(size: str, *, remat: str, vocab_chunk: int, rank, layout: str = "unrolled",
         attention: str = "auto", micro_batches: int = 1) -> dict:
  """The GRPO step training rank-`rank` adapters (None: every weight)."""
  w = gvp.SIZES[size]
  model = _model(size, remat, vocab_chunk, attention)
  settings = RLSettings(group_size=w.group, advantage="grpo", surrogate="ppo_clip",
                        surrogate_kwargs=(("epsilon_low", gvp.EPSILON),), kl_coef=gvp.BETA,
                        kl_estimator="k3", aggregation="token_mean",
                        micro_batches=micro_batches)
  opt = optim.make_optimizer(dict(name="adamw", learning_rate=gvp.LR, weight_decay=0.0,
                                  max_grad_norm=gvp.MAX_GRAD_NORM))
  spec = None
  if rank:
    spec = adapters.from_config({"lora": dict(rank=rank, alpha=2 * rank, targets=TARGETS)},
                                model, settings)
  update = online.make_update(model, [gvp.low_token_fraction(w.vocab)], opt, settings,
                              _sampling(size, layout), lora=spec)
  unroll = layout == "unrolled"

  def init():
    base = model.init(jax.random.PRNGKey(0))
    rng = jax.random.PRNGKey(1)
    if spec is None:
      return online.init_state(base, opt, rng, settings, unroll_layers=unroll)
    return online.init_state(adapters.init_adapters(spec, model, base), opt, rng, settings,
                             ref_params=base, unroll_layers=unroll)
  state = jax.eval_shape(init)
  rng = jax.eval_shape(lambda: jax.random.PRNGKey(2))
  return footprint(update.lower(state, _batch(size), rng).compile())


def _list(text: str, flag: str, cast):
  try:
    out = [cast(x) for x in text.split(",") if x]
  except ValueError:
    raise SystemExit(f"{flag}={text!r}: expected a comma-separated list") from None
  if not out:
    raise SystemExit(f"{flag}={text!r}: expected a comma-separated list")
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--size", default="deep", choices=sorted(gvp.SIZES))
  ap.add_argument("--rank", type=int, default=8)
  ap.add_argument("--remat", default="none,full")
  ap.add_argument("--vocab-chunks", default="0,4096")
  ap.add_argument("--layout", default="unrolled", choices=LAYOUTS,
                  help="unrolled: per-layer weights (the default); scanned: stacked layers "
                  "under lax.scan in the training passes and the sampler")
  ap.add_argument("--attention", default="auto", choices=models.ATTENTION_BACKENDS,
                  help="the training passes' attention backend (`model.attention`)")
  ap.add_argument("--micro-batches", type=int, default=1,
                  help="rl.micro_batches: the learn phase's gradient accumulation")
  ap.add_argument("--no-full", action="store_true", help="skip the full fine-tuning rows")
  ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                "lora_memory.json"))
  args = ap.parse_args(argv)
  if args.rank < 1 or args.micro_batches < 1:
    raise SystemExit("--rank and --micro-batches must be >= 1")
  remats = _list(args.remat, "--remat", str)
  for r in remats:
    if r not in models.REMAT_POLICIES:
      raise SystemExit(f"--remat={r!r}: use {', '.join(models.REMAT_POLICIES)}")
  chunks = _list(args.vocab_chunks, "--vocab-chunks", int)
  if min(chunks) < 0:
    raise SystemExit("--vocab-chunks must be >= 0 (0: no chunking)")

  base = inference(args.size, args.layout)
  rows = [dict(program="inference", remat="-", vocab_chunk=0, **base, ratio=1.0)]
  for remat in remats:
    for chunk in chunks:
      for name, rank in (("lora", args.rank), ("full", None)):
        if name == "full" and args.no_full:
          continue
        r = step(args.size, remat=remat, vocab_chunk=chunk, rank=rank, layout=args.layout,
                 attention=args.attention, micro_batches=args.micro_batches)
        rows.append(dict(program=name, remat=remat, vocab_chunk=chunk, **r,
                         ratio=r["peak_bytes"] / base["peak_bytes"]))
  mb = 2.0 ** 20
  print(f"{'program':10s} {'remat':15s} {'v_chunk':>7s} {'args MB':>8s} {'temp MB':>8s} "
        f"{'out MB':>7s} {'alias MB':>8s} {'peak MB':>8s} {'ratio':>6s}")
  for r in rows:
    print(f"{r['program']:10s} {r['remat']:15s} {r['vocab_chunk']:7d} "
          f"{r['argument_bytes'] / mb:8.1f} {r['temp_bytes'] / mb:8.1f} "
          f"{r['output_bytes'] / mb:7.1f} {r['alias_bytes'] / mb:8.1f} "
          f"{r['peak_bytes'] / mb:8.1f} {r['ratio']:6.3f}")
  w = gvp.SIZES[args.size]
  meta = dict(date=datetime.date.today().isoformat(), jax=jax.__version__,
              backend=jax.default_backend(), size=args.size, rank=args.rank,
              layout=args.layout, attention=args.attention,
              micro_batches=args.micro_batches,
              targets=TARGETS, workload=dict(w._asdict()))
  write_results(args.out, meta, rows)
  return rows


if __name__ == "__main__":
  main()
