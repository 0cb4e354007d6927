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
- `vpl` (`latent_dim`, `hidden`, `reward_hidden`): `VPLHead`, with loss `vpl` (`kl_coef`).
  Records carry a `user_id`; a user's context is the user's pairs in the batch. Training:
  each row's user ELBO with z ~ q(z | the user's pairs), each user counted once (rows
  weighted by 1/n_user), divided by B. Evaluation: the held-out pair's BT loss under the
  posterior mean from the user's *other* pairs in the batch (its own label is never read),
  plus kl_coef·KL; accuracy is that pair's margin > 0.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Mapping, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import models as models_lib
from rlhf_jax.losses import reward_model_latent
from rlhf_jax.models import reward_heads

HEADS = ("ensemble", "armorm", "gpm", "hl_gauss", "vpl")
TARGET_KEYS = ("chosen_reward", "rejected_reward")
USER_KEY = "user_id"


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
      if self.name == "vpl":
        return reward_heads.VPLHead(**kw)
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
    if self.name == "vpl":
      args = (h, h, jnp.ones((1, 1), bool))
    return {"backbone": backbone_params, "head": mod.init(rng, *args)["params"]}

  def logical_axes(self, params):
    """The backbone's logical axes; the (small) head is replicated."""
    return {"backbone": self.backbone.logical_axes(params["backbone"]),
            "head": jax.tree.map(lambda x: (None,) * x.ndim, params["head"])}

  def features(self, params, ids, mask, loss_mask):
    """(h at the last non-pad token, h at the last prompt token), each [B, D]."""
    h = self.backbone.hidden(params["backbone"], ids, mask)
    last = models_lib.last_index(mask)
    prompt_last = jnp.maximum(jnp.argmax(loss_mask.astype(jnp.int32), axis=1) - 1, 0)
    take = lambda i: jnp.take_along_axis(h, i[:, None, None], axis=1)[:, 0]  # noqa: E731
    return take(last), take(prompt_last)

  def outputs(self, params, ids, mask, loss_mask):
    """Head outputs for sequences [B, T] (response marked by `loss_mask`)."""
    return self._apply(params["head"], *self.features(params, ids, mask, loss_mask))


def check_config(head_cfg: Mapping[str, Any], loss: str) -> None:
  """Named errors for head / loss combinations that cannot train."""
  name = dict(head_cfg or {}).get("name")
  if (name == "vpl") != (loss == "vpl"):
    raise ValueError(f"config.loss={loss!r} with config.rm_head.name={name!r}: the 'vpl' loss "
                     "and the 'vpl' head go together (set both, e.g. rm_head=dict(name='vpl', "
                     "latent_dim=8) with loss='vpl')")


def check_records(head_cfg: Mapping[str, Any], records, what: str) -> None:
  """The VPL head needs each record's `user_id` (an integer)."""
  if dict(head_cfg or {}).get("name") != "vpl":
    return
  for i in range(min(len(records), 64)):
    v = records[i].get(USER_KEY) if isinstance(records[i], Mapping) else None
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
      raise ValueError(f"rm_head 'vpl' groups pairs by user: {what} record {i} has "
                       f"{USER_KEY}={v!r}; give every record an integer 'user_id'")


def vpl_context(user_ids: jax.Array, *, leave_one_out: bool) -> jax.Array:
  """[B] user ids -> [B, B] mask: row b reads the pairs of b's user (without b itself
  when `leave_one_out`)."""
  same = user_ids[:, None] == user_ids[None, :]
  if leave_one_out:
    same = same & ~jnp.eye(user_ids.shape[0], dtype=bool)
  return same


def vpl_batch_loss(module, head_params, hc, hr, user_ids, rng, call: Callable):
  """(per-row losses [B] whose sum is the batch objective, margins [B]); see module doc.

  `call(chosen_rewards, rejected_rewards, mean, log_var, mask)` applies the `vpl` loss.
  `rng` None: evaluation (leave-one-out context, z = posterior mean).
  """
  apply = lambda method, *a: module.apply({"params": head_params}, *a, method=method)  # noqa: E731
  b = hc.shape[0]
  context = vpl_context(user_ids, leave_one_out=rng is None)
  mean, log_var = apply("encode", hc, hr, context)
  if rng is None:
    cr, rr = apply("own_rewards", hc, mean), apply("own_rewards", hr, mean)
    losses, _ = call(cr[:, None], rr[:, None], mean, log_var, None)
    return losses / b, cr - rr
  z = reward_model_latent.reparameterize(rng, mean, log_var)
  cr, rr = apply("rewards", hc, z), apply("rewards", hr, z)  # [B rows, B pairs]
  losses, _ = call(cr, rr, mean, log_var, context)
  n_user = jnp.sum(context, axis=1).astype(losses.dtype)
  return losses / (n_user * b), jnp.diagonal(cr - rr)


def headed_batch_loss(model: HeadedRewardModel, loss_fn: Callable, loss_kwargs, what: str,
                      call: Callable):
  """`batch_loss(params, ref_params, batch, rng=None)` for a headed reward model (see
  module doc). `batch_loss.stochastic`: the training step passes a fresh `rng` (VPL's z)."""

  def batch_loss(params, ref_params, batch, rng=None):
    del ref_params
    b = batch["chosen_ids"].shape[0]
    cat = lambda k: jnp.concatenate([batch[f"chosen_{k}"], batch[f"rejected_{k}"]], 0)  # noqa: E731
    split = lambda x: (x[:b], x[b:])  # noqa: E731
    if model.name == "vpl":
      if USER_KEY not in batch:
        raise KeyError(f"rm_head 'vpl' needs the batch's {USER_KEY!r} (records need an "
                       "integer 'user_id')")
      hc, hr = split(model.features(params, cat("ids"), cat("mask"), cat("loss_mask"))[0])
      vpl_call = lambda c, r, m, v, mask: call(  # noqa: E731
          loss_fn, {"chosen_rewards": c, "rejected_rewards": r, "mean": m, "log_var": v,
                    "mask": mask}, loss_kwargs, what)
      rows, diff = vpl_batch_loss(model.module(), params["head"], hc, hr,
                                  batch[USER_KEY], rng, vpl_call)
      return jnp.sum(rows), {"accuracy": jnp.mean((diff > 0).astype(jnp.float32)),
                             "reward_margin": jnp.mean(diff)}
    out = model.outputs(params, cat("ids"), cat("mask"), cat("loss_mask"))
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
  batch_loss.stochastic = model.name == "vpl"
  return batch_loss
