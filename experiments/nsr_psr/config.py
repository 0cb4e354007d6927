"""Config for the NSR / PSR pass@k experiment (online-loop configs from the demo).

Run from the repository root (the paper's regime: a small step, lr 1e-4, on a good
prior, 400 SFT steps; no KL, as in the paper's scripts):

    python -m experiments.nsr_psr.run --config=experiments/nsr_psr/config.py:full

The earlier large-step set-up (lr 1e-3 on the demo's 220-step SFT model), where NSR
collapses:

    python -m experiments.nsr_psr.run --config=experiments/nsr_psr/config.py:full,\
lr=1e-3,sft_steps=220,steps=200,methods=grpo+psr+nsr,tag=highlr
"""

from __future__ import annotations

from experiments import _toylib
from rlhf_jax import demo

KNOWN_METHODS = {"grpo": dict(advantage="grpo"), "psr": dict(advantage="psr"),
                 "nsr": dict(advantage="nsr"), "w_reinforce": dict(advantage="w_reinforce")}


def get_config(arg=None):
  """`fast` for CI, `full` for the README numbers; `key=value` overrides.

  lr: Adam learning rate of RL; kl_coef: KL-to-SFT penalty; sft_steps: SFT warm-up steps
  (the demo uses 220); steps: RL steps; group_size: samples per prompt;
  methods: `+`-separated names among grpo, psr, nsr, w_reinforce; tag: names the outputs.
  """
  c = _toylib.parse_arg(arg, variant="fast", seeds=0, first_seed=0, steps=0, num_samples=16,
                        eval_size=0, lr=1e-4, kl_coef=0.0, sft_steps=400, group_size=8,
                        methods="", tag="")
  full = c.variant == "full"
  c.seeds = c.seeds or (3 if full else 1)
  c.steps = c.steps or (150 if full else 80)
  c.methods = c.methods or ("grpo+psr+nsr+w_reinforce" if full else "psr+nsr")
  c.eval_size = c.eval_size or (200 if full else 100)
  c.ks = (1, 2, 4, 8, 16)
  online = demo.get_config()
  online.progress = False
  online.train.steps = c.steps
  online.train.prompts_per_step = 16
  online.train.eval_every = 0
  online.data.eval_size = c.eval_size
  online.optim.learning_rate = c.lr
  online.sft.steps = c.sft_steps
  online.rl.update(group_size=c.group_size, surrogate="ppo_clip", kl_coef=c.kl_coef,
                   aggregation="token_mean")
  c.online = online
  names = [m for m in c.methods.split("+") if m]
  unknown = [m for m in names if m not in KNOWN_METHODS]
  if unknown or not names:
    raise ValueError(f"config arg methods={c.methods!r}: unknown {unknown}; use '+'-separated "
                     f"names among {sorted(KNOWN_METHODS)}")
  c.method_overrides = {m: KNOWN_METHODS[m] for m in names}
  return c
