"""Base configs for the offline paradigms on the built-in synthetic preference task.

`experiments/{sft,dpo,ipo,rdpo,kto,rm_bt}_synthetic.py` are thin wrappers over
`synthetic_config`. The task (`rlhf_jax.data.PreferenceTask`) has a known reward
r(y) = count(y, "a") - 0.25 len(y), so held-out accuracies are measured against
true labels (the eval pairs are generated with `flip_rate=0`).
"""

from __future__ import annotations

import ml_collections

from rlhf_jax import config_utils
from rlhf_jax.train import relabel

FAST_ARGS = ("runlocal", "fast")


def tiny_llama(hidden_size: int = 32, layers: int = 2) -> dict:
  """A random-init Llama small enough to train on CPU in seconds (char vocabulary)."""
  return dict(model_type="llama", hidden_size=hidden_size, num_hidden_layers=layers,
              num_attention_heads=4, num_key_value_heads=2, intermediate_size=2 * hidden_size,
              max_position_embeddings=64, tie_word_embeddings=True, rope_theta=10000.0,
              rms_norm_eps=1e-5)


def synthetic_config(paradigm: str, *, loss: str | None = None, loss_kwargs=None,
                     arg: str | None = None, steps: int = 300, fast_steps: int = 40,
                     learning_rate: float = 1e-3, batch_size: int = 32,
                     task: dict | None = None) -> ml_collections.ConfigDict:
  """An offline config on the synthetic preference task; `arg` in FAST_ARGS shrinks it."""
  if arg not in (None, "", *FAST_ARGS):
    raise ValueError(f"config arg {arg!r} is unknown; use one of {list(FAST_ARGS)} or none "
                     "(the full run)")
  fast = arg in FAST_ARGS
  c = ml_collections.ConfigDict()
  c.paradigm = paradigm
  c.seed = 0
  c.workdir = f"runs/{paradigm}_{loss or 'sft'}_synthetic"
  c.resume = "auto"
  c.progress = not fast
  c.tokenizer = "char"
  c.model = dict(hf_config=tiny_llama())
  c.task = dict(name="preference", alphabet="abcd", target="a", length_penalty=0.25,
                min_len=1, max_len=8, prompt_len=6, user_targets="", **(task or {}))
  c.data = dict(source="synthetic", train_size=2048, eval_size=256, max_length=20,
                max_prompt_length=8, eval_batch_size=64, truncation="error",
                skip_invalid=False, packing=False, num_responses=0, passthrough=(),
                relabel="", goal_template=relabel.GOAL_TEMPLATE)
  config_utils.optional_blocks(c.data, "degrees")
  c.loss = loss or ""
  c.loss_kwargs = dict(loss_kwargs or {})
  c.precompute_ref = False
  c.optim = dict(learning_rate=learning_rate, warmup_steps=10, max_grad_norm=1.0)
  c.train = dict(steps=steps, batch_size=batch_size, eval_every=100)
  c.checkpoint = dict(every_steps=0, max_to_keep=2, async_save=False)
  c.export_hf = False  # True: write the trained model to <workdir>/hf_model
  config_utils.optional_blocks(c, "rm_head", "mesh", "distributed")
  if fast:
    c.train.steps = fast_steps
    c.train.eval_every = 0
    c.data.train_size, c.data.eval_size = 512, 128
  return c
