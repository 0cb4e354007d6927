"""Reward heads beyond a scalar, as small Flax linen modules over features h [B, D].

- `ArmoRMHead`: multi-objective regression heads + a gating network (ArmoRM).
- `GPMHead`: skew-symmetric preference embeddings + prompt-dependent λ(x) (GPM).
- `EnsembleHead`: K independent heads (combine with `rlhf_jax.rewards.ensemble`).
- `VPLEncoder` / `VPLRewardHead`: the latent-user encoder and z-conditioned RM (VPL);
  `VPLHead` puts them together over a batch of pairs with per-row user contexts.
- `ridge_regression`: ArmoRM stage-1 closed-form fit on frozen features.

Features h are e.g. the decoder's last-token hidden states.
"""

from __future__ import annotations

from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


def _check_features(h: jax.Array, name: str = "h") -> None:
  if h.ndim != 2:
    raise ValueError(f"{name} must be [B, D] features, got shape {h.shape}")


class MLP(nn.Module):
  """Dense layers with ReLU between them; the last layer is linear."""
  features: Sequence[int]
  use_bias: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i, f in enumerate(self.features):
      x = nn.Dense(f, use_bias=self.use_bias, name=f"dense_{i}")(x)
      if i < len(self.features) - 1:
        x = nn.relu(x)
    return x


class ArmoRMHead(nn.Module):
  """ArmoRM: per-objective rewards r(h) [B, O] mixed by a gating network g(h_x).

  r′ = r − λ ⊙ r_v (verbosity decorrelation, λ given, r_v = objective
  `verbosity_index`); g(x) = softmax(MLP(h_x)/τ) [B, O], τ = 10;
  R = β·gᵀ r′ with β a learned scale (init `scale_init`). Returns
  (scores [B], objective_rewards [B, O], gates [B, O]).
  "Interpretable Preferences via Multi-Objective Reward Modeling and
  Mixture-of-Experts" (Wang et al. 2024), official code. Stage 1 fits the
  regression layer with `ridge_regression`; stage 2 trains the gate with `bt`.
  """
  num_objectives: int
  gate_hidden: Sequence[int] = (64,)
  temperature: float = 10.0
  scale_init: float = 1.0
  verbosity_index: Optional[int] = None
  verbosity_coefs: Optional[Sequence[float]] = None

  @nn.compact
  def __call__(self, h: jax.Array, h_prompt: Optional[jax.Array] = None):
    _check_features(h)
    h_prompt = h if h_prompt is None else h_prompt
    _check_features(h_prompt, "h_prompt")
    r = nn.Dense(self.num_objectives, name="regression")(h)
    if self.verbosity_index is not None:
      if self.verbosity_coefs is None or len(self.verbosity_coefs) != self.num_objectives:
        raise ValueError("verbosity_coefs must give one λ per objective "
                         f"({self.num_objectives}) when verbosity_index is set")
      lam = jnp.asarray(self.verbosity_coefs, r.dtype)
      r = r - lam[None, :] * r[:, self.verbosity_index:self.verbosity_index + 1]
    logits = MLP(tuple(self.gate_hidden) + (self.num_objectives,), name="gate")(h_prompt)
    gates = jax.nn.softmax(logits / self.temperature, axis=-1)
    scale = self.param("scale", nn.initializers.constant(self.scale_init), ())
    return scale * jnp.sum(gates * r, axis=-1), r, gates


def ridge_regression(features: jax.Array, targets: jax.Array, *,
                     l2: float = 1e-3) -> tuple[jax.Array, jax.Array]:
  """Closed-form ridge fit W, b = argmin ‖X W + b − Y‖² + l2‖W‖² (bias unpenalised).

  Args:
    features: [N, D]; targets: [N, O].

  Returns:
    (kernel [D, O], bias [O]) — drop into `ArmoRMHead`'s "regression" Dense.
  """
  _check_features(features, "features")
  if targets.ndim != 2 or targets.shape[0] != features.shape[0]:
    raise ValueError(f"targets must be [{features.shape[0]}, O], got {targets.shape}")
  xm = features.mean(0)
  ym = targets.mean(0)
  xc = features - xm[None, :]
  a = xc.T @ xc + l2 * jnp.eye(features.shape[1], dtype=features.dtype)
  w = jnp.linalg.solve(a, xc.T @ (targets - ym[None, :]))
  return w, ym - xm @ w


class GPMHead(nn.Module):
  """GPM embedding head: v = normalise(W h) ∈ R^{2k} and λ(x) = k·softmax(W_λ h_x/√D).

  Returns (embeddings [B, 2k], eigenvalues [B, k]); score pairs with
  `rlhf_jax.losses.reward_model_latent.gpm_score`. Bias-free as in the paper.
  "Beyond Bradley-Terry Models: A General Preference Model" (Zhang et al. 2024).
  """
  num_blocks: int
  normalize: bool = True
  prompt_dependent: bool = True

  @nn.compact
  def __call__(self, h: jax.Array, h_prompt: Optional[jax.Array] = None):
    _check_features(h)
    v = nn.Dense(2 * self.num_blocks, use_bias=False, name="embedding")(h)
    if self.normalize:
      v = v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), 1e-6)
    if not self.prompt_dependent:
      return v, jnp.ones((h.shape[0], self.num_blocks), v.dtype)
    hx = h if h_prompt is None else h_prompt
    _check_features(hx, "h_prompt")
    logits = nn.Dense(self.num_blocks, use_bias=False, name="eigen")(hx) / jnp.sqrt(hx.shape[-1])
    return v, self.num_blocks * jax.nn.softmax(logits, axis=-1)


class EnsembleHead(nn.Module):
  """K independently initialised reward heads (MLP per member). h [B, D] -> [B, K].

  "Reward Model Ensembles Help Mitigate Overoptimization" (Coste et al. 2023);
  combine members with `rlhf_jax.rewards.ensemble.{wco, uwo, mean}`.
  """
  num_members: int
  hidden: Sequence[int] = ()

  @nn.compact
  def __call__(self, h: jax.Array) -> jax.Array:
    _check_features(h)
    members = nn.vmap(MLP, variable_axes={"params": 0}, split_rngs={"params": True},
                      in_axes=None, out_axes=1, axis_size=self.num_members)
    return members(tuple(self.hidden) + (1,), name="members")(h)[..., 0]


class VPLEncoder(nn.Module):
  """VPL user encoder: pairs [B, P, 2D] -> (mean [B, Z], log_var [B, Z]).

  e_p = MLP([e(chosen_p); e(rejected_p)]); one self-attention layer over the
  user's P context pairs; masked mean-pool; linear heads to μ and log σ².
  "Personalizing RLHF with Variational Preference Learning" (Poddar et al. 2024).
  """
  latent_dim: int
  hidden: int = 64
  num_heads: int = 1

  @nn.compact
  def __call__(self, chosen_features: jax.Array, rejected_features: jax.Array,
               mask: Optional[jax.Array] = None):
    if chosen_features.ndim != 3 or chosen_features.shape != rejected_features.shape:
      raise ValueError("chosen_features and rejected_features must both be [B, P, D], got "
                       f"{chosen_features.shape} and {rejected_features.shape}")
    b, p, _ = chosen_features.shape
    mask = jnp.ones((b, p), bool) if mask is None else mask.astype(bool)
    x = MLP((self.hidden, self.hidden), name="pair_mlp")(
        jnp.concatenate([chosen_features, rejected_features], axis=-1))
    attn_mask = nn.make_attention_mask(mask, mask)
    x = x + nn.MultiHeadDotProductAttention(num_heads=self.num_heads, name="attention")(
        x, x, mask=attn_mask)
    w = mask[..., None].astype(x.dtype)
    pooled = jnp.sum(x * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1.0)
    return nn.Dense(self.latent_dim, name="mean")(pooled), nn.Dense(
        self.latent_dim, name="log_var")(pooled)


class VPLRewardHead(nn.Module):
  """z-conditioned reward r(s, z) = MLP([e(s); z]). h [B, D], z [B, Z] -> [B]."""
  hidden: Sequence[int] = (64,)

  @nn.compact
  def __call__(self, h: jax.Array, z: jax.Array) -> jax.Array:
    _check_features(h)
    if z.ndim != 2 or z.shape[0] != h.shape[0]:
      raise ValueError(f"z must be [{h.shape[0]}, Z], got {z.shape}")
    return MLP(tuple(self.hidden) + (1,), name="mlp")(jnp.concatenate([h, z], -1))[:, 0]


class VPLHead(nn.Module):
  """VPL over a batch of B pairs: row b's user context is a [B] mask over the batch's pairs.

  `encode(hc, hr, context)`: features [B, D] and a [B, B] context mask (row b reads
  the pairs its mask marks, e.g. the pairs of b's user) -> (mean, log_var) [B, Z].
  `rewards(h, z)`: every sequence's reward under every row's latent, [P, D] x [B, Z]
  -> [B, P]. "Personalizing RLHF with Variational Preference Learning" (Poddar et al.
  2024).
  """
  latent_dim: int = 8
  hidden: int = 64
  reward_hidden: Sequence[int] = (64,)
  num_heads: int = 1

  def setup(self):
    self.encoder = VPLEncoder(self.latent_dim, self.hidden, self.num_heads)
    self.reward = VPLRewardHead(tuple(self.reward_hidden))

  def encode(self, hc: jax.Array, hr: jax.Array, context: jax.Array):
    _check_features(hc, "chosen features")
    _check_features(hr, "rejected features")
    b = hc.shape[0]
    if context.shape != (b, b):
      raise ValueError(f"context must be a [{b}, {b}] mask over the batch, got {context.shape}")
    tile = lambda h: jnp.broadcast_to(h[None], (b,) + h.shape)  # noqa: E731
    return self.encoder(tile(hc), tile(hr), context)

  def rewards(self, h: jax.Array, z: jax.Array) -> jax.Array:
    _check_features(h)
    b, p, d = z.shape[0], h.shape[0], h.shape[1]
    hh = jnp.broadcast_to(h[None], (b, p, d)).reshape(b * p, d)
    zz = jnp.broadcast_to(z[:, None], (b, p, z.shape[1])).reshape(b * p, z.shape[1])
    return self.reward(hh, zz).reshape(b, p)

  def own_rewards(self, h: jax.Array, z: jax.Array) -> jax.Array:
    """Row b's sequence under row b's latent: [B, D] x [B, Z] -> [B]."""
    return self.reward(h, z)

  def __call__(self, hc: jax.Array, hr: jax.Array, context: jax.Array):
    mean, log_var = self.encode(hc, hr, context)
    return self.rewards(hc, mean), self.rewards(hr, mean), mean, log_var
