"""SFT on the chosen responses of the synthetic preference task.

    python -m rlhf_jax.train --config=experiments/sft_synthetic.py
    python -m rlhf_jax.train --config=experiments/sft_synthetic.py:fast   # seconds

Masked NLL on the response tokens (prompt tokens excluded). Expected: held-out
`eval/nll` falls from ln(84) ~ 4.4 (random init, char vocabulary) to < 2.0.
"""

from rlhf_jax.train.offline_config import synthetic_config


def get_config(arg=None):
  return synthetic_config("sft", arg=arg, learning_rate=3e-3)
