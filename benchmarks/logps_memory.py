"""Compiled temporary memory of the log-prob + gradient of an LM head, with and without
vocabulary chunking.

For hidden states h [B, T, D] and a tied LM head (the embedding [V, D], SmolLM2-135M's
shape by default: V 49152, D 576) this compiles `jax.grad` of the summed log-probs and
entropies of `rlhf_jax.models.logps_from_hidden` with respect to h and the head, and reads
XLA's `memory_analysis().temp_size_in_bytes` (buffers other than the inputs and outputs;
nothing runs and nothing is allocated). Rows cross the sequence chunk (`chunk_size`: T,
i.e. none, or 128) with the vocabulary chunk (None or `--vocab-chunk`). Without a
vocabulary chunk the temporary memory holds [B, chunk, V] float32 blocks; with one only
[B, chunk, vocab_chunk] blocks and kernel-sized gradient buffers.

  python -m benchmarks.logps_memory [--lengths=1024,4096] [--vocab=49152] [--hidden=576]
      [--batch=1] [--vocab-chunk=4096] [--chunk-size=128] [--dtype=float32] [--out=...json]
"""

from __future__ import annotations

import argparse
import datetime
import os

import jax
import jax.numpy as jnp

from benchmarks.sampler import write_results
from rlhf_jax import models


def temp_bytes(*, batch: int, length: int, vocab: int, hidden: int, chunk_size: int,
               vocab_chunk, dtype: str = "float32") -> dict:
  """Compiled temp / argument / output bytes of log-prob + entropy and their gradient."""
  model = models.from_config(dict(model_type="llama", vocab_size=vocab, hidden_size=hidden,
                                  intermediate_size=4 * hidden, num_hidden_layers=1,
                                  num_attention_heads=1, num_key_value_heads=1,
                                  max_position_embeddings=length, tie_word_embeddings=True),
                             dtype=dtype, param_dtype=dtype)
  h = jax.ShapeDtypeStruct((batch, length, hidden), jnp.dtype(dtype))
  params = {"embed": jax.ShapeDtypeStruct((vocab, hidden), jnp.dtype(dtype))}
  targets = jax.ShapeDtypeStruct((batch, length), jnp.int32)

  def loss(p, h, y):
    lp, ent = models.logps_from_hidden(model, p, h, y, chunk_size=chunk_size,
                                       vocab_chunk=vocab_chunk)
    return jnp.sum(lp) + 0.01 * jnp.sum(ent)
  compiled = jax.jit(jax.grad(loss, (0, 1))).lower(params, h, targets).compile()
  mem = compiled.memory_analysis()
  return dict(batch=batch, length=length, vocab=vocab, hidden=hidden, chunk_size=chunk_size,
              vocab_chunk=vocab_chunk, dtype=dtype, temp_bytes=int(mem.temp_size_in_bytes),
              argument_bytes=int(mem.argument_size_in_bytes),
              output_bytes=int(mem.output_size_in_bytes),
              full_logits_bytes=batch * length * vocab * 4)


def _ints(text: str, flag: str) -> list:
  try:
    out = [int(x) for x in text.split(",") if x]
  except ValueError:
    raise SystemExit(f"{flag}={text!r}: expected comma-separated positive ints") from None
  if not out or min(out) < 1:
    raise SystemExit(f"{flag}={text!r}: expected comma-separated positive ints")
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--lengths", default="1024,4096")
  ap.add_argument("--vocab", type=int, default=49152)
  ap.add_argument("--hidden", type=int, default=576)
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--vocab-chunk", type=int, default=4096)
  ap.add_argument("--chunk-size", type=int, default=128)
  ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                "logps_memory.json"))
  args = ap.parse_args(argv)
  lengths = _ints(args.lengths, "--lengths")
  for flag in ("vocab", "hidden", "batch", "vocab_chunk", "chunk_size"):
    if getattr(args, flag) < 1:
      raise SystemExit(f"--{flag.replace('_', '-')} must be >= 1")
  rows = []
  for t in lengths:
    for chunk in dict.fromkeys((t, min(args.chunk_size, t))):
      for vc in (None, args.vocab_chunk):
        rows.append(temp_bytes(batch=args.batch, length=t, vocab=args.vocab, hidden=args.hidden,
                               chunk_size=chunk, vocab_chunk=vc, dtype=args.dtype))
  mb = lambda b: b / 2**20  # noqa: E731
  print(f"log-prob + entropy + gradient, tied head V={args.vocab} D={args.hidden} "
        f"B={args.batch} {args.dtype}; compiled temporary memory (MiB)")
  print("     T  seq chunk  vocab chunk    temp MiB   [B,T,V] f32 MiB")
  for r in rows:
    print(f"{r['length']:6d} {r['chunk_size']:10d} {str(r['vocab_chunk']):>12s} "
          f"{mb(r['temp_bytes']):11.1f} {mb(r['full_logits_bytes']):17.1f}")
  meta = dict(date=datetime.date.today().isoformat(), backend=jax.default_backend(),
              device=str(jax.devices()[0].device_kind), jax=jax.__version__)
  write_results(args.out, meta, rows)


if __name__ == "__main__":
  main()
