"""What every pairwise reward-model loss shares: the extras tuple and the soft-label likelihood.

`reward_model.py` (Bradley–Terry and its variants) and `reward_model_latent.py` (GPM)
both build on these; both re-export them, so `from rlhf_jax.losses.reward_model import
PairwiseExtras, smoothed_log_likelihood` keeps working.
"""

from __future__ import annotations

from typing import NamedTuple, Union

import jax

from rlhf_jax.losses.common import log_sigmoid

ArrayOrFloat = Union[jax.Array, float]


class PairwiseExtras(NamedTuple):
  """Per-example diagnostics of a pairwise reward-model loss.

  margins: r_w − r_l [B]; accuracy: 1.0 where r_w > r_l [B].
  """
  margins: jax.Array
  accuracy: jax.Array


def pairwise_extras(margins: jax.Array) -> PairwiseExtras:
  """`PairwiseExtras` of margins [B]: accuracy is 1.0 where the margin is positive."""
  return PairwiseExtras(margins=margins, accuracy=(margins > 0).astype(margins.dtype))


def smoothed_log_likelihood(logits: jax.Array, labels: ArrayOrFloat) -> jax.Array:
  """Soft-label binary log-likelihood `p·log σ(x) + (1−p)·log σ(−x)`.

  Shared by every pairwise/probabilistic preference loss here; `labels=1`
  gives the plain BT log-likelihood.
  """
  return labels * log_sigmoid(logits) + (1.0 - labels) * log_sigmoid(-logits)
