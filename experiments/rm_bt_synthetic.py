"""Bradley-Terry reward model on the synthetic preference task.

    python -m rlhf_jax.train --config=experiments/rm_bt_synthetic.py
    python -m rlhf_jax.train --config=experiments/rm_bt_synthetic.py:fast   # seconds

A tiny Llama with a scalar head (reward at the last non-pad token) trained with
-log sigma(r_chosen - r_rejected). Expected: held-out pairwise accuracy against true
labels (`eval/accuracy`) >= 0.9.
"""

from rlhf_jax.train.offline_config import synthetic_config


def get_config(arg=None):
  return synthetic_config("reward_model", loss="bt", arg=arg)
