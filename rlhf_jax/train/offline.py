"""The offline step: SFT, preference optimisation and reward-model training.

    step = make_step(paradigm, model, loss_fn, optimizer, loss_kwargs=...)
    state, metrics = step(state, batch)

One step serves three paradigms; they differ only in how a batch becomes a
scalar loss (`make_batch_loss`):
- "sft": masked NLL over `loss_mask`, token mean over the whole batch; packed
  rows (`packed=True`: `segment_ids` / `positions` from `sft_batches(pack=True)`)
  attend only within their own example.
- "preference": any registered preference loss. Paired batches
  (`chosen_*` / `rejected_*`) feed the summed response log-probs, reference
  log-probs (precomputed in the batch as `ref_chosen_logps` /
  `ref_rejected_logps`, else computed from `state.ref_params`) and response
  lengths to a pairwise loss. Unpaired batches (`completion_*`, `label`, and
  the mismatched `kl_*` sequences) feed an unpaired loss such as KTO:
  `logps`, `ref_logps`, `desirable`, and `reference_point`
  z = max(0, mean(log π − log π_ref) over the mismatched pairs), no gradient.
  A listwise loss (PRO, TRPA, GRAO: `logps`, `lengths`, `mask` [B, K]) takes list
  batches (`responses_ids` / `_mask` / `_loss_mask` [B, K, T], best first, optional
  `responses_valid` [B, K] and per-response fields such as `levels` [B, K]) or paired
  batches as lists of two.
- "reward_model": any registered reward-model loss over the scalar rewards a
  reward-head model gives the chosen / rejected sequences (`chosen_rewards`,
  `rejected_rewards`; a listwise loss gets `rewards` [B, 2], chosen first);
  extra numeric batch fields (e.g. `margin`) are passed by name, and the records'
  absolute scores `chosen_reward` / `rejected_reward` are `chosen_targets` /
  `rejected_targets` (HelpSteer2-Preference's BT + regression). Ensemble, ArmoRM,
  GPM and HL-Gauss heads: `offline_heads.HeadedRewardModel` (config.rm_head).
Chosen and rejected sequences go through the model as one [2B, T] batch.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import flax
import jax
import jax.numpy as jnp
import optax

from rlhf_jax import guards
from rlhf_jax import models as models_lib
from rlhf_jax.train import degrees
from rlhf_jax.train.loss_inputs import (call_with_available, is_list_loss,  # noqa: F401
                                        is_unpaired_loss)

PARADIGMS = ("sft", "preference", "reward_model")
PAIRED_KEYS = ("chosen_ids", "chosen_mask", "chosen_loss_mask", "rejected_ids",
               "rejected_mask", "rejected_loss_mask")
LIST_KEYS = ("responses_ids", "responses_mask", "responses_loss_mask")
UNPAIRED_KEYS = ("completion_ids", "completion_mask", "completion_loss_mask", "label",
                 "kl_ids", "kl_mask", "kl_loss_mask")


@flax.struct.dataclass
class OfflineState:
  """step, params, opt_state, ref_params (preference only; None otherwise), rng, guard."""
  step: jax.Array
  params: Any
  opt_state: Any
  ref_params: Any = None
  rng: Optional[jax.Array] = None
  guard: Any = None


def init_state(params, optimizer: optax.GradientTransformation, *, ref_params=None,
               rng: Optional[jax.Array] = None) -> OfflineState:
  guard = guards.nonfinite_init(window=1)  # window=1: orbax cannot save size-0 arrays
  return OfflineState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params), ref_params=ref_params,
                      rng=jax.random.PRNGKey(0) if rng is None else rng,
                      guard=jax.tree.map(jnp.copy, guard))


@dataclasses.dataclass(frozen=True)
class _PackedView:
  """An LM-head model view whose attention stays inside each packed segment."""
  model: Any
  segment_ids: Any
  positions: Any
  head: str = "lm"

  def hidden(self, params, input_ids, attention_mask=None):
    del attention_mask  # the segment ids say which tokens are real
    seg = self.segment_ids
    t = seg.shape[1]
    same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] > 0)
    allowed = (same & jnp.tril(jnp.ones((t, t), bool))[None]) | jnp.eye(t, dtype=bool)[None]
    decoder = type(self.model.module)
    run = decoder._run  # pylint: disable=protected-access
    h, _ = self.model.module.apply({"params": params}, input_ids, self.positions,
                                   allowed[:, None], None, 0, method=run)
    return h

  def logits_from_hidden(self, params, h):
    return self.model.logits_from_hidden(params, h)


def sequence_logps(model, params, ids, attn, loss_mask):
  """Summed log-probs of the `loss_mask` tokens [B] and their count [B]."""
  lp, _ = models_lib.token_logps(model, params, ids, attn)
  m = loss_mask.astype(lp.dtype)
  return jnp.sum(lp * m, axis=1), jnp.sum(m, axis=1)


def _both(model, params, batch, first: str, second: str):
  """Log-probs and lengths of two sequence sets run as one [2B, T] forward pass."""
  cat = lambda k: jnp.concatenate([batch[f"{first}_{k}"], batch[f"{second}_{k}"]], 0)  # noqa: E731
  lp, n = sequence_logps(model, params, cat("ids"), cat("mask"), cat("loss_mask"))
  b = batch[f"{first}_ids"].shape[0]
  return (lp[:b], lp[b:]), (n[:b], n[b:])


def _check_keys(batch: Mapping[str, Any], keys, what: str) -> None:
  missing = [k for k in keys if k not in batch]
  if missing:
    raise KeyError(f"{what} batch is missing {missing}; it has {sorted(batch)}")


def sft_loss(model, params, batch, *, packed: bool = False):
  """Masked NLL: −Σ loss_mask·log p / Σ loss_mask over the whole batch (token mean)."""
  _check_keys(batch, ("input_ids", "attention_mask", "loss_mask"), "SFT")
  view = _PackedView(model, batch["segment_ids"], batch["positions"]) if packed else model
  lp, _ = models_lib.token_logps(view, params, batch["input_ids"], batch["attention_mask"])
  m = batch["loss_mask"].astype(lp.dtype)
  n = jnp.maximum(jnp.sum(m), 1.0)
  nll = -jnp.sum(lp * m) / n
  return nll, {"nll": nll, "tokens": jnp.sum(m)}


def pair_metrics(c, r, rc, rr, lc, lr) -> Dict[str, jax.Array]:
  """Accuracy of the implicit reward log π − log π_ref (or of the length-normalised
  log-prob when there is no reference), its margin, and the chosen NLL per token."""
  out = {"logp_accuracy": jnp.mean((c / jnp.maximum(lc, 1) > r / jnp.maximum(lr, 1))
                                   .astype(jnp.float32)),
         "chosen_nll": -jnp.sum(c) / jnp.maximum(jnp.sum(lc), 1.0)}
  if rc is not None:
    dc, dr = c - rc, r - rr
    out["implicit_reward_accuracy"] = jnp.mean((dc > dr).astype(jnp.float32))
    out["implicit_reward_margin"] = jnp.mean(dc - dr)
  return out


def _reference(ref_params, batch, keys, compute):
  """Precomputed reference log-probs from the batch, else from `ref_params` (no grad)."""
  if all(k in batch for k in keys):
    return tuple(batch[k] for k in keys)
  if ref_params is None:
    return (None,) * len(keys)
  return tuple(jax.lax.stop_gradient(x) for x in compute(ref_params))


def make_ref_logps(model) -> Callable:
  """`ref_logps(ref_params, batch) -> {key: array}`: the batch keys the step reads as
  precomputed reference log-probs, for the batch's kind: `ref_chosen_logps` /
  `ref_rejected_logps` [B] (pairs), `ref_logps` / `ref_kl_logps` [B] (unpaired),
  `ref_responses_logps` [B, K] (lists, `responses_ids`)."""

  @jax.jit
  def ref_logps(ref_params, batch):
    if "responses_ids" in batch:
      return {"ref_responses_logps": _list_logps(model, ref_params, batch)[0]}
    if "completion_ids" in batch:
      names, keys = ("completion", "kl"), ("ref_logps", "ref_kl_logps")
    else:
      names, keys = ("chosen", "rejected"), ("ref_chosen_logps", "ref_rejected_logps")
    (a, b), _ = _both(model, ref_params, batch, *names)
    return dict(zip(keys, (a, b)))
  return ref_logps


def _pair_logps(model, params, ref_params, batch):
  """(chosen, rejected, ref_chosen, ref_rejected, chosen_len, rejected_len) of a paired batch;
  the reference values are None when there is neither a reference nor precomputed ones."""
  (c, r), (lc, lr) = _both(model, params, batch, "chosen", "rejected")
  rc, rr = _reference(ref_params, batch, ("ref_chosen_logps", "ref_rejected_logps"),
                      lambda p: _both(model, p, batch, "chosen", "rejected")[0])
  return c, r, rc, rr, lc, lr


def _degree_inputs(model, params, batch, degree_tokens):
  """SSPO's degree_logits / degree_labels / degree_mask (`rlhf_jax.train.degrees`)."""
  _check_keys(batch, degrees.BATCH_KEYS, "preference-degree (config.data.degrees)")
  logits = degrees.degree_logits(model, params, batch, degree_tokens)
  labels, valid = batch["degree_labels"], batch["degree_valid"]
  hit = (jnp.argmax(logits, axis=-1) == labels) & valid
  acc = jnp.sum(hit) / jnp.maximum(jnp.sum(valid), 1)
  return ({"degree_logits": logits, "degree_labels": labels, "degree_mask": valid},
          {"degree_accuracy": acc.astype(jnp.float32)})


def _paired_preference(model, loss_fn, loss_kwargs, what, unpaired_loss, degree_tokens=()):
  def batch_loss(params, ref_params, batch):
    _check_keys(batch, PAIRED_KEYS, "paired preference")
    c, r, rc, rr, lc, lr = _pair_logps(model, params, ref_params, batch)
    metrics = pair_metrics(c, r, rc, rr, lc, lr)
    degree_in = {}
    if degree_tokens:
      degree_in, degree_metrics = _degree_inputs(model, params, batch, degree_tokens)
      metrics.update(degree_metrics)
    if unpaired_loss:  # evaluate an unpaired loss on pairs: chosen desirable, z = 0
      available = {"logps": jnp.concatenate([c, r]), "ref_logps": _cat_or_none(rc, rr),
                   "lengths": jnp.concatenate([lc, lr]), "reference_point": 0.0,
                   "desirable": jnp.concatenate([jnp.ones_like(c, bool),
                                                 jnp.zeros_like(r, bool)])}
    else:
      available = {"chosen_logps": c, "rejected_logps": r, "ref_chosen_logps": rc,
                   "ref_rejected_logps": rr, "chosen_lengths": lc, "rejected_lengths": lr,
                   **degree_in}
      available.update(_numeric_fields(batch, available))
    losses, extras = call_with_available(loss_fn, available, loss_kwargs, what)
    cr = getattr(extras, "chosen_rewards", None)
    rj = getattr(extras, "rejected_rewards", None)
    if cr is not None and rj is not None:
      metrics["reward_accuracy"] = jnp.mean((cr > rj).astype(jnp.float32))
      metrics["reward_margin"] = jnp.mean(cr - rj)
    return jnp.mean(losses), metrics
  return batch_loss


def _cat_or_none(a, b):
  return None if a is None else jnp.concatenate([a, b])


def _numeric_fields(batch, taken):
  return {k: v for k, v in batch.items() if k not in taken and k not in PAIRED_KEYS}


def _unpaired_preference(model, loss_fn, loss_kwargs, what):
  def batch_loss(params, ref_params, batch):
    _check_keys(batch, UNPAIRED_KEYS, "unpaired (KTO) preference")
    (lp, kl), (n, _) = _both(model, params, batch, "completion", "kl")
    ref, ref_kl = _reference(ref_params, batch, ("ref_logps", "ref_kl_logps"),
                             lambda p: _both(model, p, batch, "completion", "kl")[0])
    if ref is None:
      raise ValueError(f"{what} needs reference log-probs: keep the reference model "
                       "(reference_free=False) or precompute them (precompute_ref=True)")
    z = jax.lax.stop_gradient(jnp.maximum(jnp.mean(kl - ref_kl), 0.0))
    desirable = batch["label"] > 0.5
    available = {"logps": lp, "ref_logps": ref, "desirable": desirable, "lengths": n,
                 "reference_point": z}
    losses, _ = call_with_available(loss_fn, available, loss_kwargs, what)
    d = desirable.astype(jnp.float32)
    delta = lp - ref
    return jnp.mean(losses), {
        "kl_estimate": z,
        "desirable_reward": jnp.sum(delta * d) / jnp.maximum(jnp.sum(d), 1.0),
        "undesirable_reward": jnp.sum(delta * (1 - d)) / jnp.maximum(jnp.sum(1 - d), 1.0)}
  return batch_loss


def _list_logps(model, params, batch):
  """Summed log-probs and lengths [B, K] of the K responses per row, as one [B*K, T] pass."""
  b, k, t = batch["responses_ids"].shape
  flat = lambda name: batch[name].reshape(b * k, t)  # noqa: E731
  lp, n = sequence_logps(model, params, *(flat(name) for name in LIST_KEYS))
  return lp.reshape(b, k), n.reshape(b, k)


def _list_preference(model, loss_fn, loss_kwargs, what):
  """A listwise loss on list batches (`responses_*` [B, K, T], best first, optional
  `responses_valid` [B, K]) or on paired batches (a list of two: chosen, rejected)."""
  def batch_loss(params, ref_params, batch):
    if "responses_ids" in batch:
      _check_keys(batch, LIST_KEYS, "listwise preference")
      if batch["responses_ids"].ndim != 3:
        raise ValueError(f"responses_ids must be [B, K, T], got {batch['responses_ids'].shape}")
      lp, n = _list_logps(model, params, batch)
      (ref,) = _reference(ref_params, batch, ("ref_responses_logps",),
                          lambda p: (_list_logps(model, p, batch)[0],))
      valid = batch.get("responses_valid")
      valid = jnp.ones(lp.shape, bool) if valid is None else valid.astype(bool)
      taken = LIST_KEYS + ("responses_valid", "ref_responses_logps")
    else:
      _check_keys(batch, PAIRED_KEYS, f"{what} (listwise; or pass responses_* lists)")
      c, r, rc, rr, lc, lr = _pair_logps(model, params, ref_params, batch)
      lp, n = jnp.stack([c, r], 1), jnp.stack([lc, lr], 1)
      ref = None if rc is None else jnp.stack([rc, rr], 1)
      valid = jnp.ones(lp.shape, bool)
      taken = PAIRED_KEYS + ("ref_chosen_logps", "ref_rejected_logps")
    available = {"logps": lp, "lengths": n, "mask": valid, "ref_logps": ref}
    available.update({k: v for k, v in batch.items() if k not in taken and k not in available})
    losses, _ = call_with_available(loss_fn, available, loss_kwargs, what)
    # Top-1: the first valid response has the highest length-normalised log-prob.
    s = jnp.where(valid, lp / jnp.maximum(n, 1.0), -jnp.inf)
    top1 = jnp.argmax(s, axis=1) == jnp.argmax(valid, axis=1)
    return jnp.mean(losses), {"top1_logp_accuracy": jnp.mean(top1.astype(jnp.float32)),
                              "num_valid_responses": jnp.mean(jnp.sum(valid, axis=1))}
  return batch_loss


def _reward_model(model, loss_fn, loss_kwargs, what):
  def batch_loss(params, ref_params, batch):
    del ref_params
    _check_keys(batch, PAIRED_KEYS[:2] + PAIRED_KEYS[3:5], "reward-model")
    ids = jnp.concatenate([batch["chosen_ids"], batch["rejected_ids"]], 0)
    mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]], 0)
    rewards = model.apply(params, ids, attention_mask=mask)
    b = batch["chosen_ids"].shape[0]
    cr, rr = rewards[:b], rewards[b:]
    available = {"chosen_rewards": cr, "rejected_rewards": rr,
                 "rewards": jnp.stack([cr, rr], axis=1)}
    available.update(_numeric_fields(batch, available))
    # The records' absolute scores (`chosen_reward` / `rejected_reward`) are the regression
    # targets of losses that declare them (HelpSteer2-Preference's `bt_regression`).
    for side in ("chosen", "rejected"):
      if f"{side}_reward" in batch and f"{side}_targets" not in available:
        available[f"{side}_targets"] = batch[f"{side}_reward"].astype(cr.dtype)
    losses, _ = call_with_available(loss_fn, available, loss_kwargs, what)
    return jnp.mean(losses), {"accuracy": jnp.mean((cr > rr).astype(jnp.float32)),
                              "reward_margin": jnp.mean(cr - rr),
                              "reward_mean": jnp.mean(rewards)}
  return batch_loss


def make_batch_loss(paradigm: str, model, loss_fn: Optional[Callable], loss_kwargs=None, *,
                    packed: bool = False, unpaired: Optional[bool] = None,
                    degree_tokens: Tuple[int, ...] = ()):
  """Returns `batch_loss(params, ref_params, batch) -> (loss, metrics)` for a paradigm.

  `unpaired` (preference only): the batch is unpaired (KTO-style); default: whether
  the loss has an unpaired signature. Pass False to evaluate an unpaired loss on pairs.
  `degree_tokens` (paired preference, SSPO): the class tokens' ids; the batch's degree
  variants are classified by the policy's logits at them (`rlhf_jax.train.degrees`).
  """
  loss_kwargs = dict(loss_kwargs or {})
  if paradigm not in PARADIGMS:
    raise ValueError(f"paradigm={paradigm!r} is unknown; use one of {PARADIGMS}")
  if paradigm == "sft":
    return lambda params, ref_params, batch: sft_loss(model, params, batch, packed=packed)
  if loss_fn is None:
    raise ValueError(f"paradigm {paradigm!r} needs a loss function (config.loss)")
  what = getattr(loss_fn, "__name__", "the loss")
  if paradigm == "reward_model":
    from rlhf_jax.train import offline_heads  # pylint: disable=import-outside-toplevel
    if isinstance(model, offline_heads.HeadedRewardModel):
      return offline_heads.headed_batch_loss(model, loss_fn, loss_kwargs, what,
                                             lambda f, a, k, w: call_with_available(f, a, k, w))
    return _reward_model(model, loss_fn, loss_kwargs, what)
  if is_list_loss(loss_fn):
    return _list_preference(model, loss_fn, loss_kwargs, what)
  unpaired_loss = is_unpaired_loss(loss_fn)
  if unpaired_loss if unpaired is None else unpaired:
    return _unpaired_preference(model, loss_fn, loss_kwargs, what)
  return _paired_preference(model, loss_fn, loss_kwargs, what, unpaired_loss,
                            tuple(degree_tokens))


def make_step(paradigm: str, model, loss_fn: Optional[Callable],
              optimizer: optax.GradientTransformation, *, loss_kwargs=None, packed: bool = False,
              jit: bool = True, donate: bool = True, skip_nonfinite: bool = True,
              out_shardings=None, degree_tokens: Tuple[int, ...] = ()):
  """Returns `step(state, batch) -> (state, metrics)`: one optimiser update.

  A step whose loss or gradients are not finite leaves the state unchanged
  (`skipped` = 1 in the metrics; `guard` counts consecutive and total skips).
  `out_shardings` (e.g. the state's shardings) is passed to `jax.jit`.
  """
  batch_loss = make_batch_loss(paradigm, model, loss_fn, loss_kwargs, packed=packed,
                               degree_tokens=degree_tokens)
  grad_fn = jax.value_and_grad(batch_loss, has_aux=True)

  # A stochastic objective (VPL's sampled z) draws from fold_in(state.rng, step): exact on resume.
  kw = ((lambda state: {"rng": jax.random.fold_in(state.rng, state.step)})
        if getattr(batch_loss, "stochastic", False) else (lambda state: {}))

  def step(state: OfflineState, batch: Dict[str, jax.Array]):
    (loss, metrics), grads = grad_fn(state.params, state.ref_params, batch, **kw(state))
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))
    if skip_nonfinite:
      new, skipped = guards.apply_if_finite(new, state.replace(step=state.step + 1), loss, grads)
      new = new.replace(guard=guards.nonfinite_update(state.guard, loss, skipped))
      metrics["skipped"] = skipped.astype(jnp.float32)
    return new, metrics

  if not jit:
    return step
  return jax.jit(step, donate_argnums=(0,) if donate else (), out_shardings=out_shardings)


def make_eval(paradigm: str, model, loss_fn: Optional[Callable], *, loss_kwargs=None,
              packed: bool = False, degree_tokens: Tuple[int, ...] = ()):
  """Returns a jitted `evaluate(state, batch) -> metrics` (no update).

  Preference evaluation always reads paired batches (held-out pairs), also for
  unpaired losses, whose eval loss then uses chosen = desirable and z = 0.
  """
  batch_loss = make_batch_loss(paradigm, model, loss_fn, loss_kwargs, packed=packed,
                               unpaired=False if paradigm == "preference" else None,
                               degree_tokens=degree_tokens)

  @jax.jit
  def evaluate(state: OfflineState, batch):
    loss, metrics = batch_loss(state.params, state.ref_params, batch)
    return dict(metrics, loss=loss)
  return evaluate
