"""DPO on the synthetic preference pairs, starting from SmolLM2-135M-Instruct.

    python -m rlhf_jax.train --config=experiments/smollm2/dpo.py:cpu     # 2 CPU cores
    python -m rlhf_jax.train --config=experiments/smollm2/dpo.py:gpu     # one GPU
    python -m rlhf_jax.train --config=experiments/smollm2/dpo.py:smoke   # 2 steps

The pairs come from `rlhf_jax.data.PreferenceTask` (strings over "abcd", known reward
r(y) = count(y, "a") - 0.25 len(y)); held-out pairs have no label noise, so
`eval/implicit_reward_accuracy` is measured against true labels. See README.md.
"""

from __future__ import annotations

from experiments.smollm2 import _common
from rlhf_jax.train.offline_config import synthetic_config


def get_config(arg=None):
  arg = _common.check_variant(arg, "dpo")
  c = synthetic_config("preference", loss="dpo", loss_kwargs=dict(beta=0.1),
                       learning_rate=5e-6, batch_size=8, steps=60)
  return _common.offline_variant(c, "dpo", arg)
