"""Robust DPO (rDPO) on the synthetic preference task with 20% flipped labels.

    python -m rlhf_jax.train --config=experiments/rdpo_synthetic.py
    python -m rlhf_jax.train --config=experiments/rdpo_synthetic.py:fast   # seconds

Training pairs have their labels flipped with probability 0.2 (`task.flip_rate`);
rDPO is told eps=0.2. Held-out pairs are clean. Expected: held-out implicit-reward
accuracy against true labels >= 0.85 after 300 steps.
"""

from rlhf_jax.train.offline_config import synthetic_config


def get_config(arg=None):
  return synthetic_config("preference", loss="rdpo", loss_kwargs=dict(beta=0.1, eps=0.2),
                          task=dict(flip_rate=0.2), arg=arg)
