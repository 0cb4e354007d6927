"""Token Hidden Reward (THR) from the LM head's gradients, and GRPO re-weighted by it.

THR_a is how much a GRPO update on token a raises the log-likelihood of its group's correct
responses. Computed here in first order through the LM head: with
ℓ_a = log softmax(W h_a)[y_a], ∇_W ℓ_a = (e_{y_a} − p_a) h_aᵀ, and

    S_a   = Σ_{b in a's group, b correct} ⟨∇_W ℓ_a, ∇_W ℓ_b⟩
          = Σ_b w_b ⟨e_{y_a} − p_a, e_{y_b} − p_b⟩ ⟨h_a, h_b⟩,
    THR_a = A_a · S_a        (A: the GRPO advantage of a's response).

Token Hidden Reward: Steering Exploration-Exploitation in Group Relative Deep Reinforcement
Learning (2025). [derived] The abstract defines THR as each token's influence on the
likelihood of correct responses under GRPO; the LM-head gradient is our choice of the
parameters the influence is measured in (the whole model's gradients per token would cost a
backward pass per token).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.advantages import base
from rlhf_jax.advantages.group import grpo
from rlhf_jax.advantages.registry import register
from rlhf_jax.advantages.reweight import thr
from rlhf_jax.losses.common import check_group_size, check_nonnegative, check_rank


def correct_token_weights(rewards: jax.Array, mask: jax.Array, *, group_size: int) -> jax.Array:
  """[N, T] 1 on the tokens of responses whose reward is above their group's mean (the
  responses GRPO reinforces), 0 elsewhere and on masked tokens."""
  r = base.group_view(rewards, group_size)
  correct = (r > base.group_mean(r)).reshape(-1)
  return mask.astype(jnp.float32) * correct[:, None].astype(jnp.float32)


def lm_head_influence(hidden: jax.Array, logits: jax.Array, token_ids: jax.Array,
                      mask: jax.Array, weights: jax.Array, *, group_size: int) -> jax.Array:
  """S_a = Σ_{b in a's group} w_b ⟨∇_W log π(y_a|h_a), ∇_W log π(y_b|h_b)⟩ through the LM head.

  With g_a = e_{y_a} − softmax(logits_a), ∇_W ℓ_a = g_a h_aᵀ, so the group's weighted
  gradient is one [V, D] matrix M = Σ_b w_b g_b h_bᵀ and S_a = g_aᵀ M h_a: two contractions
  of cost N·T·V·D each, no [N·T]² kernel. float32 throughout; gradient-free (stop_gradient).

  Shapes: hidden [N, T, D] (the final-norm states the LM head reads at the positions that
  predict the tokens), logits [N, T, V], token_ids, mask, weights [N, T] -> [N, T]
  (0 where masked). N = prompts x group_size, the group's rows consecutive.
  """
  check_rank(hidden, 3, "hidden")
  check_rank(logits, 3, "logits")
  n, t, d = hidden.shape
  v = logits.shape[-1]
  for name, x in (("logits", logits.shape[:2]), ("token_ids", token_ids.shape),
                  ("mask", mask.shape), ("weights", weights.shape)):
    if tuple(x) != (n, t):
      raise ValueError(f"lm_head_influence: {name} has leading shape {tuple(x)}, hidden has "
                       f"{(n, t)}")
  check_group_size(n, group_size, "hidden")
  m = mask.astype(jnp.float32)
  h = jax.lax.stop_gradient(hidden).astype(jnp.float32) * m[..., None]
  p = jax.nn.softmax(jax.lax.stop_gradient(logits).astype(jnp.float32), axis=-1)
  g = (jax.nn.one_hot(token_ids, v, dtype=jnp.float32) - p) * m[..., None]
  rows = group_size * t
  hg, gg = h.reshape(-1, rows, d), g.reshape(-1, rows, v)
  wg = (weights.astype(jnp.float32) * m).reshape(-1, rows)
  grad = jnp.einsum("bmv,bm,bmd->bvd", gg, wg, hg, precision="highest")
  s = jnp.einsum("bmv,bvd,bmd->bm", gg, grad, hg, precision="highest")
  return s.reshape(n, t) * m


@register("grpo_thr", family="group", needs=("lm_head_influence", "mask", "group_size"))
def grpo_thr(rewards: jax.Array, *, lm_head_influence: jax.Array, mask: jax.Array,
             group_size: int, p: float = 0.1, min_abs: float = 0.0,
             eps: float = 1e-6) -> jax.Array:
  """GRPO advantages re-weighted per token by the Token Hidden Reward.

  A = grpo(r);  THR_t = A·S_t;  A_t = A·(1 + p·sign(THR_t)) where |THR_t| > min_abs.
  p > 0 amplifies tokens that raise the likelihood of the group's correct responses
  (exploitation, greedy accuracy); p < 0 the reverse (exploration, pass@k).

  Token Hidden Reward (2025), see the module doc. `lm_head_influence` is S [N, T]
  (`lm_head_influence` over the responses above their group's mean; the RL step computes it
  with the sampling policy). Shapes: rewards [N], lm_head_influence, mask [N, T] -> [N, T].
  """
  check_nonnegative("grpo_thr", eps=eps)
  if lm_head_influence.shape != mask.shape or lm_head_influence.shape[:1] != rewards.shape:
    raise ValueError(f"grpo_thr: lm_head_influence {lm_head_influence.shape} must be [N, T] "
                     f"like mask {mask.shape}, N = len(rewards) = {rewards.shape[0]}")
  a = grpo(rewards, group_size=group_size, eps=eps)
  return thr(a, token_hidden_reward=a[:, None] * lm_head_influence, mask=mask, p=p,
             min_abs=min_abs)
