"""DPO on the synthetic preference task (known reward r(y) = #a - 0.25 len(y)).

    python -m rlhf_jax.train --config=experiments/dpo_synthetic.py
    python -m rlhf_jax.train --config=experiments/dpo_synthetic.py:fast   # seconds

Expected: held-out implicit-reward accuracy against true labels
(`eval/implicit_reward_accuracy`) >= 0.9 after 300 steps (~1 CPU minute).
"""

from rlhf_jax.train.offline_config import synthetic_config


def get_config(arg=None):
  return synthetic_config("preference", loss="dpo", loss_kwargs=dict(beta=0.1), arg=arg)
