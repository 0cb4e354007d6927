"""Reward models with heads beyond a scalar, for the offline "reward_model" paradigm.

`config.rm_head = {"name": ..., **options}` puts a head from `rlhf_jax.models.reward_heads`
on the decoder's hidden state at the last non-pad token (features h [B, D]; the prompt
feature h_x is the hidden state at the last prompt token):

- `ensemble` (`num_members`, `hidden`): `EnsembleHead`; the loss (e.g. `bt`) is applied
  to each member's `chosen_rewards`/`rejected_rewards` and averaged; accuracy uses the
  member mean.
- `armorm` (`num_objectives`, `gate_hidden`): `ArmoRMHead`; the gated score is the reward
  (stage 2, e.g. `bt`).
- `gpm` (`num_blocks`): `GPMHead`; loss `gpm` gets `chosen_embeddings`,
  `rejected_embeddings`, `eigenvalues` (λ(x)); accuracy: gpm_score(v_c, v_r) > 0.
- `hl_gauss` (`num_bins`): a linear layer to bins; loss `hl_gauss` (`v_min`, `v_max` in
  loss_kwargs) regresses the records' `chosen_reward` / `rejected_reward`; accuracy
  compares the predicted values.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Mapping, Tuple

import jax
import jax.numpy as jnp

from rlhf_jax.losses import reward_model_latent
from rlhf_jax.models import reward_heads

HEADS = ("ensemble", "armorm", "gpm", "hl_gauss")
TARGET_KEYS = ("chosen_reward", "rejected_reward")


def _freeze(x):
  if isinstance(x, (list, tuple)):
    return tuple(_freeze(v) for v in x)
  return x


@dataclasses.dataclass(frozen=True)
class HeadedRewardModel:
  """A decoder backbone (`backbone.hidden`) plus a reward head; params {"backbone", "head"}."""
  backbone: Any
  name: str
  options: Tuple[Tuple[str, Any], ...] = ()

  @classmethod
  def from_config(cls, backbone, head_cfg: Mapping[str, Any]) -> "HeadedRewardModel":
    cfg = dict(head_cfg)
    name = cfg.pop("name", None)
    if name not in HEADS:
      raise ValueError(f"config.rm_head.name={name!r} is unknown; use one of {HEADS}")
    if name == "hl_gauss" and "num_bins" not in cfg:
      raise ValueError("config.rm_head with name 'hl_gauss' needs num_bins")
    return cls(backbone, name, tuple(sorted((k, _freeze(v)) for k, v in cfg.items())))

  def module(self):
    kw = dict(self.options)
    try:
      if self.name == "ensemble":
        return reward_heads.EnsembleHead(num_members=kw.pop("num_members", 4),
                                         hidden=kw.pop("hidden", ()), **kw)
      if self.name == "armorm":
        return reward_heads.ArmoRMHead(num_objectives=kw.pop("num_objectives", 4), **kw)
      if self.name == "gpm":
        return reward_heads.GPMHead(num_blocks=kw.pop("num_blocks", 2), **kw)
      return reward_heads.MLP((kw.pop("num_bins"),), **kw)
    except TypeError as e:
      raise ValueError(f"config.rm_head options {dict(self.options)} do not fit the "
                       f"{self.name!r} head: {e}") from None

  def _apply(self, head_params, h, h_prompt):
    mod = self.module()
    if self.name in ("armorm", "gpm"):
      return mod.apply({"params": head_params}, h, h_prompt)
    return mod.apply({"params": head_params}, h)

  def init(self, rng, backbone_params) -> Dict[str, Any]:
    h = jnp.zeros((1, self.backbone.config.hidden_size), jnp.float32)
    mod = self.module()
    args = (h, h) if self.name in ("armorm", "gpm") else (h,)
    return {"backbone": backbone_params, "head": mod.init(rng, *args)["params"]}

  def logical_axes(self, params):
    """The backbone's logical axes; the (small) head is replicated."""
    return {"backbone": self.backbone.logical_axes(params["backbone"]),
            "head": jax.tree.map(lambda x: (None,) * x.ndim, params["head"])}

  def outputs(self, params, ids, mask, loss_mask):
    """Head outputs for sequences [B, T] (response marked by `loss_mask`)."""
    h = self.backbone.hidden(params["backbone"], ids, mask)
    t = ids.shape[1]
    last = jnp.argmax(jnp.arange(t) * mask.astype(jnp.int32), axis=1)
    prompt_last = jnp.maximum(jnp.argmax(loss_mask.astype(jnp.int32), axis=1) - 1, 0)
    take = lambda i: jnp.take_along_axis(h, i[:, None, None], axis=1)[:, 0]  # noqa: E731
    return self._apply(params["head"], take(last), take(prompt_last))


def headed_batch_loss(model: HeadedRewardModel, loss_fn: Callable, loss_kwargs, what: str,
                      call: Callable):
  """`batch_loss(params, ref_params, batch)` for a headed reward model (see module doc)."""

  def batch_loss(params, ref_params, batch):
    del ref_params
    b = batch["chosen_ids"].shape[0]
    cat = lambda k: jnp.concatenate([batch[f"chosen_{k}"], batch[f"rejected_{k}"]], 0)  # noqa: E731
    out = model.outputs(params, cat("ids"), cat("mask"), cat("loss_mask"))
    split = lambda x: (x[:b], x[b:])  # noqa: E731
    if model.name == "ensemble":
      cr, rr = split(out)  # [B, K]
      per_member = jax.vmap(
          lambda c, r: call(loss_fn, {"chosen_rewards": c, "rejected_rewards": r},
                            loss_kwargs, what)[0], in_axes=1)(cr, rr)
      losses, sc, sr = jnp.mean(per_member, axis=0), jnp.mean(cr, 1), jnp.mean(rr, 1)
      diff = sc - sr
    elif model.name == "armorm":
      sc, sr = split(out[0])
      losses, _ = call(loss_fn, {"chosen_rewards": sc, "rejected_rewards": sr}, loss_kwargs,
                       what)
      diff = sc - sr
    elif model.name == "gpm":
      (vc, vr), (lam, _) = split(out[0]), split(out[1])
      losses, _ = call(loss_fn, {"chosen_embeddings": vc, "rejected_embeddings": vr,
                                 "eigenvalues": lam}, loss_kwargs, what)
      diff = reward_model_latent.gpm_score(vc, vr, eigenvalues=lam)
    else:  # hl_gauss
      missing = [k for k in TARGET_KEYS if k not in batch]
      if missing:
        raise KeyError(f"rm_head 'hl_gauss' regresses scalar targets; the batch has no "
                       f"{missing} (records need chosen_reward / rejected_reward)")
      values = jnp.concatenate([batch["chosen_reward"], batch["rejected_reward"]])
      both, extras = call(loss_fn, {"logits": out, "values": values}, loss_kwargs, what)
      lc, lr = split(both)
      losses = 0.5 * (lc + lr)
      sc, sr = split(extras.predictions)
      diff = sc - sr
    return jnp.mean(losses), {"accuracy": jnp.mean((diff > 0).astype(jnp.float32)),
                              "reward_margin": jnp.mean(diff)}
  return batch_loss
