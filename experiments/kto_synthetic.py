"""KTO (unpaired) on the synthetic preference task.

    python -m rlhf_jax.train --config=experiments/kto_synthetic.py
    python -m rlhf_jax.train --config=experiments/kto_synthetic.py:fast   # seconds

Each training pair becomes two unpaired examples: (prompt, chosen, desirable) and
(prompt, rejected, undesirable); the reference point is the clipped KL estimate on
mismatched (prompt, other completion) pairs. Evaluation uses the held-out pairs.
Expected: held-out implicit-reward accuracy against true labels >= 0.85 after
300 steps.
"""

from rlhf_jax.train.offline_config import synthetic_config


def get_config(arg=None):
  return synthetic_config("preference", loss="kto", loss_kwargs=dict(beta=0.1), arg=arg)
