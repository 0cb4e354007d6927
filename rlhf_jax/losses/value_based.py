"""Value-based token-level losses: B-Coder's Q-learning with a conservative Bellman backup.

The LM head's logits ℓ(s, ·) [B, T, V] at position t score the token a_t chosen in state
s_t (the prefix before it), as in `rlhf_jax.models.token_logps`; a scalar value head gives
V(s_t) [B, T]. Registered under the "value" family.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from rlhf_jax.losses.common import (check_float, check_nonnegative, check_positive, check_rank,
                                    check_unit_interval)
from rlhf_jax.losses.registry import register

sg = jax.lax.stop_gradient


def bcoder_q_values(logits: jax.Array, values: jax.Array, *, alpha: float = 1.0) -> jax.Array:
  """B-Coder's Q-function from LM logits: Q(s, a) = α[ℓ(s, a) − max_b ℓ(s, b)] + V(s).

  The advantage α(ℓ − max ℓ) is ≤ 0 with 0 at the LM's greedy token, so V(s) = max_a Q(s, a)
  and arg-max Q = arg-max ℓ: a pre-trained LM initialises the greedy policy. Shapes:
  logits [..., V], values [...] -> [..., V].
  """
  check_positive("bcoder_q_values", alpha=alpha)
  adv = logits - jnp.max(logits, axis=-1, keepdims=True)
  return alpha * adv + values[..., None]


class BCoderExtras(NamedTuple):
  """Per token [B, T] (0 where masked): q_taken Q(s_t, a_t); targets the (stop-gradient)
  conservative Bellman target; td_errors Q − target; td_loss, adv_loss, ce_loss the three
  weighted-sum parts before weighting."""
  q_taken: jax.Array
  targets: jax.Array
  td_errors: jax.Array
  td_loss: jax.Array
  adv_loss: jax.Array
  ce_loss: jax.Array


def _take(x, idx):
  return jnp.take_along_axis(x, idx[..., None], axis=-1)[..., 0]


def _next(x, fill=0.0):
  """x[:, t + 1] at t (the last step gets `fill`). [B, T, ...] -> same shape."""
  pad = jnp.full_like(x[:, :1], fill)
  return jnp.concatenate([x[:, 1:], pad], axis=1)


@register("bcoder", family="value", needs=("frozen_logits",))
def bcoder(q_logits, values, actions, rewards, mask, target_logits=None, target_values=None, *,
           frozen_logits, alpha: float = 1.0, gamma: float = 1.0, adv_coef: float = 0.1,
           ce_coef: float = 0.5, margin: float = 0.0):
  """B-Coder: TD loss to a conservative Bellman target, plus advantage and CE regularisers.

  Q(s, a) = α[ℓ(s, a) − max_b ℓ(s, b)] + V(s)  (`bcoder_q_values`);
  conservative target  y_t = r_t + γ Q̄(s_{t+1}, argmax_a q(a|s_{t+1}))  (y_t = r_t at the
  last unmasked token: the sequence ends), with q the FROZEN pre-trained LM
  (`frozen_logits`) and Q̄ the target network (`target_logits`, `target_values`; default:
  the online Q under stop-gradient). The backup evaluates q's greedy policy instead of
  maximising over Q, so it never chases over-estimated actions;
  ℓ_t = (Q(s_t, a_t) − y_t)² + adv_coef·L_adv + ce_coef·L_CE, with
  L_CE = −log softmax(ℓ(s_t))[a_t] (= −log softmax(Q(s_t)/α)[a_t]) and
  L_adv = max_a [A(s_t, a) + margin·1(a ≠ a_t)] − A(s_t, a_t), A = Q − V (a large-margin
  loss on the dataset action; margin 0 gives −A(s_t, a_t) ≥ 0). L_adv's exact form is a
  reconstruction (unverified against the paper); the three-part sum and its weights 0.1 /
  0.5 are the paper's.

  Paper: B-Coder: Value-Based Deep Reinforcement Learning for Program Synthesis (Yu et
  al., 2023). If `frozen_logits` equal the target's logits the target is Q-learning's
  r + γ max_a Q̄(s′, a).

  Shapes: q_logits, frozen_logits, target_logits [B, T, V]; values, target_values,
  rewards [B, T]; actions int [B, T]; mask [B, T] (1 at real tokens, contiguous from
  the first). Returns (loss [B, T] (0 where masked; token-level, reduce with `aggregate`),
  BCoderExtras).
  """
  check_positive("bcoder", alpha=alpha)
  check_unit_interval("bcoder", gamma=gamma)
  check_nonnegative("bcoder", adv_coef=adv_coef, ce_coef=ce_coef, margin=margin)
  check_rank(q_logits, 3, "q_logits")
  check_float(q_logits, "q_logits")
  b, t, v = q_logits.shape
  for name, x in (("values", values), ("rewards", rewards), ("actions", actions),
                  ("mask", mask), ("target_values", target_values)):
    if x is not None and jnp.shape(x) != (b, t):
      raise ValueError(f"bcoder: {name} must be [B, T] = {(b, t)} like q_logits [B, T, V], "
                       f"got {jnp.shape(x)}")
  for name, x in (("frozen_logits", frozen_logits), ("target_logits", target_logits)):
    if x is not None and jnp.shape(x) != (b, t, v):
      raise ValueError(f"bcoder: {name} must be [B, T, V] = {(b, t, v)} like q_logits, got "
                       f"{jnp.shape(x)}")
  if not jnp.issubdtype(jnp.result_type(actions), jnp.integer):
    raise ValueError(f"bcoder: actions must be integer token ids, got {jnp.result_type(actions)}")
  if (target_logits is None) != (target_values is None):
    raise ValueError("bcoder: pass both target_logits and target_values (a target network) "
                     "or neither (the online Q under stop-gradient)")
  if target_logits is None:
    target_logits, target_values = q_logits, values
  m = mask.astype(bool)
  q = bcoder_q_values(q_logits, values, alpha=alpha)
  q_taken = _take(q, actions)
  # Conservative backup: Q̄(s_{t+1}, a*) with a* the frozen LM's greedy token at t + 1.
  q_bar = bcoder_q_values(sg(target_logits), sg(target_values), alpha=alpha)
  greedy = jnp.argmax(frozen_logits, axis=-1)
  boot = _next(_take(q_bar, greedy)) * _next(m.astype(q.dtype))
  targets = sg(rewards + gamma * boot)
  td = q_taken - targets
  adv = q - values[..., None]
  off = margin * (1.0 - jax.nn.one_hot(actions, v, dtype=q.dtype))
  adv_loss = jnp.max(adv + off, axis=-1) - _take(adv, actions)
  ce_loss = -_take(jax.nn.log_softmax(q_logits, axis=-1), actions)
  zero = lambda x: jnp.where(m, x, 0.0)  # noqa: E731
  loss = td ** 2 + adv_coef * adv_loss + ce_coef * ce_loss
  return zero(loss), BCoderExtras(zero(sg(q_taken)), zero(targets), zero(sg(td)),
                                  zero(sg(td ** 2)), zero(sg(adv_loss)), zero(sg(ce_loss)))
