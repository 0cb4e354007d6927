"""Online DPO on the demo's 2-digit addition: the fused step with `rl.objective='preference'`.

Command: `python -m rlhf_jax.train --config=experiments/online_dpo.py`
(`:runlocal` for a seconds-long smoke run). Same model, SFT warm-up, prompts and
exact-match reward as the GRPO demo (`experiments/grpo_arithmetic.py`); each step
samples 8 completions per prompt, pairs every two of different reward (all_pairs) and
trains DPO (β = 0.1) against the SFT policy. Measured numbers: docs/online.md.
Other online preference methods are config changes, e.g. DNO:
`--config.rl.preference_loss=dno --config.rl.ref_update_every=50`, INPO:
`--config.rl.preference_loss=inpo --config.rl.iterate_every=50`.
"""

from rlhf_jax import demo


def get_config(arg=None):
  c = demo.get_config(arg)
  c.workdir = "runs/online_dpo"
  c.rl = demo.rl_block(objective="preference", preference_loss="dpo", pairs="all_pairs",
                       preference_loss_kwargs=dict(beta=0.1))
  return c
