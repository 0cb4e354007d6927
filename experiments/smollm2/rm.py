"""A Bradley-Terry reward model on SmolLM2-135M-Instruct's backbone (fresh scalar head).

    python -m rlhf_jax.train --config=experiments/smollm2/rm.py:cpu     # 2 CPU cores
    python -m rlhf_jax.train --config=experiments/smollm2/rm.py:gpu     # one GPU
    python -m rlhf_jax.train --config=experiments/smollm2/rm.py:smoke   # 2 steps

The backbone is SmolLM2's decoder (all layers trained); the reward is a fresh linear
head on the last non-pad token's hidden state, trained with -log sigma(r_chosen -
r_rejected) on the synthetic preference pairs (known reward, see dpo.py).
`eval/accuracy` is the held-out pairwise accuracy against true labels. See README.md.
"""

from __future__ import annotations

from experiments.smollm2 import _common
from rlhf_jax.train.offline_config import synthetic_config


def get_config(arg=None):
  arg = _common.check_variant(arg, "rm")
  c = synthetic_config("reward_model", loss="bt", learning_rate=2e-5, batch_size=8, steps=60)
  return _common.offline_variant(c, "rm", arg)
