"""IPO on the synthetic preference task (known reward r(y) = #a - 0.25 len(y)).

    python -m rlhf_jax.train --config=experiments/ipo_synthetic.py
    python -m rlhf_jax.train --config=experiments/ipo_synthetic.py:fast   # seconds

IPO regresses the log-ratio margin to 1/(2 beta). Expected: held-out
implicit-reward accuracy against true labels (`eval/implicit_reward_accuracy`)
>= 0.85 after 300 steps.
"""

from rlhf_jax.train.offline_config import synthetic_config


def get_config(arg=None):
  return synthetic_config("preference", loss="ipo", loss_kwargs=dict(beta=0.5), arg=arg)
