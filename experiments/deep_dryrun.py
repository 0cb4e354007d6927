"""Multi-host dry run: SmolLM2-135M's depth and head layout at reduced width, 2 GRPO steps.

    python -m rlhf_jax.train --config=experiments/deep_dryrun.py \\
        --config.mesh="{'data': 2, 'fsdp': 2, 'tensor': 2}"
    python -m rlhf_jax.train --config=experiments/deep_dryrun.py:layers=4   # faster compile
    python -m rlhf_jax.train --config=experiments/deep_dryrun.py:runlocal   # 2 layers

The model has SmolLM2-135M's architecture shape (Llama: 30 layers, 9 query heads, 3 KV heads,
SwiGLU, tied embeddings, RoPE θ 100000, RMS eps 1e-5) with head dim 8 instead of 64: hidden
72 = 9 × 8, FFN 192 (SmolLM2: 576 / 1536), over the 16-symbol character vocabulary of the
arithmetic task. No SFT warm-up: the run builds, places and compiles the fused online step
on `config.mesh`, runs `train.steps` = 2 steps (the held-out evaluation before and after is
8 prompts) and writes one checkpoint (step 2) to `config.workdir`, so a new mesh, a pod
slice, a launch script or a checkpoint bucket can be checked in minutes before a real run
(see "TPU pods and multi-host" in docs/scale.md). A random model earns no exact-match
reward; the termination reward varies within groups, so the update has non-zero gradients.
The layer count is the `:layers=N` argument (default 30); `:runlocal` is 2 layers, which
`tests/test_scale_dryrun.py` uses. From 16 layers on the decode scans over the stacked
layers too (the online loop's default by depth), so the 30-layer step compiles in seconds.
Use a new workdir for each dry run (with `resume="auto"` a finished one resumes at step 2
and has nothing to do).
"""

from __future__ import annotations

from rlhf_jax import demo

LAYERS = 30   # SmolLM2-135M
HEADS, KV_HEADS, HEAD_DIM = 9, 3, 8   # SmolLM2-135M: 9, 3, 64
FFN = 192     # SmolLM2-135M: 1536


RUNLOCAL_LAYERS = 2
ARGS = ("runlocal", "layers=N")


def parse_arg(arg) -> int:
  """The layer count of `arg` ("" / None: 30; "runlocal": 2; "layers=N": N >= 1)."""
  if not arg:
    return LAYERS
  if arg == "runlocal":
    return RUNLOCAL_LAYERS
  key, _, value = str(arg).partition("=")
  if key != "layers" or not value.isdigit() or int(value) < 1:
    raise ValueError(f"config arg {arg!r} is unknown; use one of {list(ARGS)} (N >= 1) or "
                     "none (30 layers)")
  return int(value)


def get_config(arg=None):
  layers = parse_arg(arg)
  c = demo.get_config()
  c.workdir = "runs/deep_dryrun"
  c.progress = False
  c.checkpoint = dict(every_steps=2, max_to_keep=1, async_save=True)
  c.model = dict(
      hf_config=dict(
          model_type="llama", hidden_size=HEADS * HEAD_DIM, num_hidden_layers=layers,
          num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
          intermediate_size=FFN, max_position_embeddings=64, tie_word_embeddings=True,
          rope_theta=100000.0, rms_norm_eps=1e-5),
      # Stacked layers: the reference and training passes scan over depth.
      unroll_layers=False)
  # None: by depth (`online_loop.layer_layout`): from 16 layers the decode scans over the
  # stacked layers too; `--config.sampling.scan_layers=False` decodes per layer.
  c.sampling.scan_layers = None
  c.data.update(train_size=256, eval_size=8)
  c.sft.steps = 0
  c.rewards = ("exact_match", "terminated")
  c.sampling.max_new_tokens = 4
  c.rl.group_size = 4
  c.train.update(steps=2, prompts_per_step=8, eval_every=0)
  return c
