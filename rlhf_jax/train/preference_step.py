"""Online preference optimisation inside the fused step: the pairs phase and its objective.

With `rl.objective = "preference"` the step samples G completions per prompt, scores
them with the configured rewards (verifiers, a reward model or an LM judge), and instead
of advantages builds preference data from each group:

    pairs = group_pairs(rewards [B, G], mode="best_worst" | "all_pairs" | "rso")
    data, metrics = phase.data(ro, sc, sig, iterate_params, rng)    # the pairs phase
    loss, aux = phase.objective(params, None, minibatch, normalizer, beta)

then learns with any registered preference loss (`rl.preference_loss`: dpo, ipo, simpo,
cdpo, rdpo, hinge, copg, dno, inpo, osp, power_dl, ... and the listwise pro / trpa on the
group ranked by reward). The loss is called with the inputs its declaration lists
(`rlhf_jax.train.loss_inputs`): sequence log-probs of the chosen / rejected samples under
the policy, the reference (`ref_params`: fixed, or DNO's previous iterate with
`rl.ref_update_every=k`) and, for INPO, the kept iterate (`rl.iterate_every=k`); their
lengths and rewards; OSP's preference strength σ((r_w − r_l)/T). A pair whose two rewards
are equal carries no preference and has weight 0; the loss is the weighted mean over the
minibatch's pairs (so micro-batches do not change it).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import losses as losses_lib
from rlhf_jax.losses.preference_online import rso_sample
from rlhf_jax.train import loss_inputs
from rlhf_jax.train.phases import Rollout, Scores, Signals, batch_answers, completion_logps
from rlhf_jax.train.rl_config import PAIRINGS

PAIR_INPUTS = ("chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps",
               "chosen_lengths", "rejected_lengths", "chosen_rewards", "rejected_rewards",
               "preference_strength")
ITERATE_INPUTS = ("prev_chosen_logps", "prev_rejected_logps")
LIST_INPUTS = ("logps", "ref_logps", "lengths", "rewards", "mask", "levels")
OPPONENT_INPUTS = ("logps", "ref_logps", "lengths", "rewards", "preference_probs")
ANSWER_INPUTS = ("ref_answer_logps", "ref_answer_lengths", "ref_answer_rewards")
TOKEN_INPUTS = ("chosen_token_logps", "rejected_token_logps", "chosen_mask", "rejected_mask")
TOKEN_REWARD_INPUTS = ("chosen_token_rewards", "rejected_token_rewards")
ONLINE_FIX = ("the online preference step provides the inputs above; choose another "
              "rl.preference_loss")


class Pairs(NamedTuple):
  """Within-group pairs: chosen / rejected sample indices [B, K] in 0..G-1, weight [B, K]
  (1: the chosen sample's reward is strictly higher; 0: no preference)."""
  chosen: jax.Array
  rejected: jax.Array
  weight: jax.Array


def num_pairs(group_size: int, mode: str) -> int:
  """K, the pairs per group `group_pairs` builds."""
  return group_size * (group_size - 1) // 2 if mode == "all_pairs" else 1


def group_pairs(rewards: jax.Array, *, mode: str, rng: Optional[jax.Array] = None,
                rso_beta: float = 0.5) -> Pairs:
  """Preference pairs from the rewards [B, G] of each prompt's G samples.

  best_worst: one pair, the highest against the lowest reward (first of ties).
  all_pairs: every i < j, ordered by reward: G(G-1)/2 pairs.
  rso: RSO (Liu et al., 2024): two samples drawn by statistical rejection sampling from
    π_r ∝ π exp(r / rso_beta) among the group (`rso_sample`, `rng` per group), ordered by
    reward.
  """
  b, g = rewards.shape
  rewards = jax.lax.stop_gradient(rewards)
  if mode == "best_worst":
    hi = jnp.argmax(rewards, axis=1)[:, None]
    lo = jnp.argmin(rewards, axis=1)[:, None]
  elif mode == "all_pairs":
    i, j = (jnp.asarray(a, jnp.int32) for a in np.triu_indices(g, k=1))
    ri, rj = rewards[:, i], rewards[:, j]
    hi = jnp.where(ri >= rj, i[None], j[None])
    lo = jnp.where(ri >= rj, j[None], i[None])
  elif mode == "rso":
    if rng is None:
      raise ValueError("group_pairs(mode='rso') needs rng")
    keys = jax.vmap(lambda k: jax.random.fold_in(rng, k))(jnp.arange(b))
    draw = jax.vmap(lambda k, r: rso_sample(k, r, num_samples=2, beta=rso_beta))(keys, rewards)
    two = jnp.take_along_axis(rewards, draw.indices, axis=1)
    first_wins = two[:, 0] >= two[:, 1]
    hi = jnp.where(first_wins, draw.indices[:, 0], draw.indices[:, 1])[:, None]
    lo = jnp.where(first_wins, draw.indices[:, 1], draw.indices[:, 0])[:, None]
    valid = jnp.all(draw.valid, axis=1)[:, None]
  else:
    raise ValueError(f"rl.pairs={mode!r} is unknown; choose one of {', '.join(PAIRINGS)}")
  r_hi = jnp.take_along_axis(rewards, hi, axis=1)
  r_lo = jnp.take_along_axis(rewards, lo, axis=1)
  weight = (r_hi > r_lo).astype(jnp.float32)
  if mode == "rso":
    weight = weight * valid
  return Pairs(hi.astype(jnp.int32), lo.astype(jnp.int32), weight)


def reward_levels(rewards: jax.Array) -> jax.Array:
  """Preference levels [B, G]: 1 + the number of distinct higher rewards in the group (1 = best)."""
  higher = rewards[:, None, :] > rewards[:, :, None]          # [B, i, j]: r_j > r_i
  first = jnp.tril(rewards[:, None, :] == rewards[:, :, None], k=-1)
  distinct = ~jnp.any(first, axis=1)                          # j is the first of its value
  return 1 + jnp.sum(higher & distinct[:, None, :], axis=2).astype(jnp.int32)


def _grouped(x, g):
  return x.reshape((x.shape[0] // g, g) + x.shape[1:])


def _sequence(token_logps, mask):
  return jnp.sum(token_logps * mask, axis=-1)


@dataclasses.dataclass(frozen=True)
class PreferencePhase:
  """The pairs phase and the preference objective of the online step (built from settings).

  loss: the registered preference loss; kwargs: `rl.preference_loss_kwargs`;
  listwise: the loss ranks the whole group (PRO, TRPA) instead of pairs;
  uses_iterate: the loss reads the kept iterate's log-probs (INPO's π_t);
  opponent: the loss scores each sample against an opponent (Nash-MD's
    `preference_probs`): the step samples one opponent per sample from the geometric
    mixture π^(1−β) π_ref^β (`rl.mixture_beta`) and P(y ≻ y′) = σ((r(y) − r(y′))/T);
  reference_answer: the loss reads the policy's log-probs and the reward of the prompt's
    reference answer (GRAO): the prompt batch's `answer_ids` / `answer_mask` plus EOS.
  token_prompts: T-REG's contrastive prompt ids (better, worse) when the loss reads token
    rewards: r̂_t = σ(log π(y_t|better + x, y<t) − log π(y_t|worse + x, y<t)) − ½ under
    the sampling policy (`contrastive_token_rewards`).
  """
  loss: str
  kwargs: Tuple[Tuple[str, Any], ...]
  group_size: int
  pairs: str
  rso_beta: float
  temperature: float
  listwise: bool
  uses_iterate: bool
  opponent: bool = False
  reference_answer: bool = False
  mixture_beta: float = 0.125
  vocab_limit: Optional[int] = None
  token_prompts: Tuple[Tuple[int, ...], ...] = ()

  @classmethod
  def build(cls, settings, *, vocab_limit: Optional[int] = None) -> "PreferencePhase":
    """Checks the loss's declared inputs against what the step provides (named errors)."""
    name = settings.preference_loss
    fn = losses_lib.get(name)
    kwargs = dict(settings.preference_loss_kwargs)
    params = loss_inputs.parameter_names(fn)
    opponent = "preference_probs" in params
    listwise = loss_inputs.is_list_loss(fn) and not opponent
    provides = set(OPPONENT_INPUTS if opponent else LIST_INPUTS if listwise
                   else PAIR_INPUTS + TOKEN_INPUTS)
    token_prompts = ()
    if not (opponent or listwise) and any(n in params for n in TOKEN_REWARD_INPUTS):
      if not settings.token_reward_prompt_ids:
        raise ValueError(f"rl.preference_loss={name!r} needs token rewards from two contrastive "
                         "prompts: set rl.token_reward_prompts=(better, worse), e.g. "
                         "('Answer correctly: ', 'Answer wrongly: ')")
      token_prompts = tuple(settings.token_reward_prompt_ids)
      provides |= set(TOKEN_REWARD_INPUTS)
    elif settings.token_reward_prompts:
      raise ValueError(f"rl.token_reward_prompts is read by losses with token rewards (treg); "
                       f"rl.preference_loss={name!r} does not take them: remove it")
    reference_answer = listwise and any(n in params for n in ANSWER_INPUTS)
    if reference_answer:
      provides |= set(ANSWER_INPUTS)
    if opponent and settings.dynamic_sampling > 1:
      raise ValueError(f"rl.preference_loss={name!r} samples an opponent per sample, which "
                       "rl.dynamic_sampling does not select; set rl.dynamic_sampling=0")
    uses_iterate = any(n in params for n in ITERATE_INPUTS)
    if uses_iterate and not listwise:
      if not settings.iterate_every:
        raise ValueError(f"rl.preference_loss={name!r} needs the previous iterate's log-probs "
                         f"({', '.join(ITERATE_INPUTS)}): set rl.iterate_every=k to keep the "
                         "policy of every k-th step as the iterate")
      provides |= set(ITERATE_INPUTS)
    missing = loss_inputs.missing_inputs(fn, provides, kwargs)
    if missing:
      raise ValueError(f"rl.preference_loss={name!r} needs {', '.join(map(repr, missing))}, "
                       f"which the online preference step does not provide (it provides "
                       f"{sorted(provides)}); choose another rl.preference_loss, e.g. dpo")
    for k in kwargs:
      if k not in params:
        raise ValueError(f"rl.preference_loss_kwargs has {k!r}, which {name!r} does not take; "
                         f"it takes {sorted(p for p in params if p not in provides)}")
    return cls(loss=name, kwargs=tuple(sorted(kwargs.items())), group_size=settings.group_size,
               pairs=settings.pairs, rso_beta=float(settings.rso_beta),
               temperature=float(settings.preference_temperature), listwise=listwise,
               uses_iterate=uses_iterate, opponent=opponent, reference_answer=reference_answer,
               mixture_beta=float(settings.mixture_beta), vocab_limit=vocab_limit,
               token_prompts=token_prompts)

  # --------------------------------------------------------------------- the pairs phase

  def data(self, model, ro: Rollout, sc: Scores, sig: Signals, iterate_params,
           rng: jax.Array, opponent_rewards: Optional[jax.Array] = None,
           answers: Optional[Dict[str, jax.Array]] = None, policy_params=None
           ) -> Tuple[Dict[str, jax.Array], Dict[str, jax.Array]]:
    """Group-major learn data [B, G, ...] with the pairs (or ranking, or each sample's
    preference over its opponent) and their weights; `answers` (GRAO): the reference
    answers' "ids", "mask" [B, A] and "rewards" [B] (`phases.reference_answers`);
    `policy_params`: the sampling policy (T-REG's token rewards)."""
    g = self.group_size
    rewards = _grouped(sc.rewards, g)
    mask = ro.loss_mask
    data = {"ids": _grouped(ro.ids, g), "attn": _grouped(ro.attn, g), "mask": _grouped(mask, g),
            "rewards": rewards, "ref_seq": _grouped(_sequence(sig.ref_logps, mask), g)}
    if self.uses_iterate:
      prev, _ = completion_logps(model, iterate_params, ro.ids, ro.attn, ro.prompt_len, g,
                                 self.vocab_limit)
      data["prev_seq"] = _grouped(_sequence(jax.lax.stop_gradient(prev), mask), g)
    if self.opponent:
      probs = jax.nn.sigmoid((sc.rewards - opponent_rewards) / self.temperature)
      data["preference_probs"] = _grouped(jax.lax.stop_gradient(probs), g)
      data["weight"] = jnp.ones(rewards.shape, jnp.float32)
      return data, {"win_rate_vs_mixture": jnp.mean(probs)}
    if self.listwise:
      order = jnp.argsort(-rewards, axis=1, stable=True)       # best first
      data["order"] = order.astype(jnp.int32)
      if self.reference_answer:
        data.update(answer_ids=answers["ids"], answer_mask=answers["mask"],
                    answer_rewards=answers["rewards"])
      spread = jnp.max(rewards, axis=1) > jnp.min(rewards, axis=1)
      data["weight"] = spread.astype(jnp.float32)
      return data, {"preference_groups": jnp.mean(data["weight"])}
    pairs = group_pairs(rewards, mode=self.pairs, rng=rng, rso_beta=self.rso_beta)
    data.update(chosen=pairs.chosen, rejected=pairs.rejected, weight=pairs.weight)
    metrics = {"preference_pairs": jnp.mean(pairs.weight)}
    if self.token_prompts:
      if policy_params is None:
        raise ValueError("the pairs phase of a token-reward loss needs policy_params")
      tok = contrastive_token_rewards(model, policy_params, ro, self.token_prompts,
                                      group_size=g, vocab_limit=self.vocab_limit)
      data["token_rewards"] = _grouped(tok, g)
      metrics["token_reward_mean"] = jnp.sum(tok * mask) / jnp.maximum(jnp.sum(mask), 1.0)
    return data, metrics

  @staticmethod
  def normalizer(mb) -> jax.Array:
    """The minibatch's total pair weight (the weighted mean's denominator), at least 1."""
    return jnp.maximum(jnp.sum(mb["weight"]), 1.0)

  # --------------------------------------------------------------------- the objective

  def make_objective(self, model):
    """`objective(params, value_params, mb, normalizer, beta) -> (loss, aux)`."""
    fn = losses_lib.get(self.loss)
    kwargs = dict(self.kwargs)
    g = self.group_size
    what = f"rl.preference_loss={self.loss!r}"
    call = lambda available: loss_inputs.call_with_available(  # noqa: E731
        fn, available, kwargs, what, key="rl.preference_loss_kwargs", fix=ONLINE_FIX)

    def objective(params, value_params, mb, normalizer, beta):
      del value_params, beta
      b = mb["ids"].shape[0]
      flat = lambda x: x.reshape((b * g,) + x.shape[2:])  # noqa: E731
      lp, _ = completion_logps(model, params, flat(mb["ids"]), flat(mb["attn"]),
                               mb["prompt_len"], g, self.vocab_limit)
      mask = mb["mask"]
      seq = _sequence(lp.reshape(mask.shape), mask)            # [b, G]
      lengths = jnp.sum(mask, axis=-1)
      if self.opponent:
        available = {"logps": seq.reshape(-1), "ref_logps": mb["ref_seq"].reshape(-1),
                     "lengths": lengths.reshape(-1), "rewards": mb["rewards"].reshape(-1),
                     "preference_probs": mb["preference_probs"].reshape(-1)}
        losses, _ = call(available)
        loss = jnp.sum(losses * mb["weight"].reshape(-1)) / normalizer
        return loss, {"loss": loss}
      if self.listwise:
        take = lambda x: jnp.take_along_axis(x, mb["order"], axis=1)  # noqa: E731
        rewards = take(mb["rewards"])
        available = {"logps": take(seq), "ref_logps": take(mb["ref_seq"]),
                     "lengths": take(lengths), "rewards": rewards,
                     "mask": jnp.ones(seq.shape, bool), "levels": reward_levels(rewards)}
        if self.reference_answer:
          p = mb["prompt_len"]
          amask = mb["answer_mask"]
          alp, _ = completion_logps(
              model, params, jnp.concatenate([mb["ids"][:, 0, :p], mb["answer_ids"]], 1),
              jnp.concatenate([mb["attn"][:, 0, :p], amask.astype(bool)], 1), p, 1,
              self.vocab_limit)
          available.update(ref_answer_logps=_sequence(alp, amask),
                           ref_answer_lengths=jnp.sum(amask, axis=-1),
                           ref_answer_rewards=mb["answer_rewards"])
        losses, _ = call(available)
        w = mb["weight"]
        loss = jnp.sum(losses * w) / normalizer
        return loss, {"loss": loss}
      pick = lambda x, idx: jnp.take_along_axis(x, mb[idx], axis=1).reshape(-1)  # noqa: E731
      both = lambda x: (pick(x, "chosen"), pick(x, "rejected"))  # noqa: E731
      (cl, rl), (rc, rr) = both(seq), both(mb["ref_seq"])
      (nc, nr), (wc, wr) = both(lengths), both(mb["rewards"])
      available = {"chosen_logps": cl, "rejected_logps": rl, "ref_chosen_logps": rc,
                   "ref_rejected_logps": rr, "chosen_lengths": nc, "rejected_lengths": nr,
                   "chosen_rewards": wc, "rejected_rewards": wr,
                   "preference_strength": jax.nn.sigmoid((wc - wr) / self.temperature)}
      if self.uses_iterate:
        available["prev_chosen_logps"], available["prev_rejected_logps"] = both(mb["prev_seq"])
      rows = lambda x, idx: jnp.take_along_axis(  # noqa: E731
          x, mb[idx][..., None], axis=1).reshape((-1,) + x.shape[2:])
      tokens = lp.reshape(mask.shape)
      available.update(chosen_token_logps=rows(tokens, "chosen"),
                       rejected_token_logps=rows(tokens, "rejected"),
                       chosen_mask=rows(mask, "chosen"), rejected_mask=rows(mask, "rejected"))
      if self.token_prompts:
        available.update(chosen_token_rewards=rows(mb["token_rewards"], "chosen"),
                         rejected_token_rewards=rows(mb["token_rewards"], "rejected"))
      losses, _ = call(available)
      w = mb["weight"].reshape(-1)
      mean = lambda x: jnp.sum(x * w) / normalizer  # noqa: E731
      margin = jax.lax.stop_gradient((cl - rc) - (rl - rr))
      loss = mean(losses)
      return loss, {"loss": loss, "implicit_accuracy": mean((margin > 0).astype(jnp.float32)),
                    "logratio_margin": mean(margin), "pair_reward_gap": mean(wc - wr)}
    return objective


def contrastive_token_rewards(model, params, ro: Rollout, prompts, *, group_size: int,
                              vocab_limit: Optional[int] = None) -> jax.Array:
  """T-REG's token rewards of every sampled completion [N, T] (no gradient):

    r̂_t = σ(log π(y_t | x_better, y<t) − log π(y_t | x_worse, y<t)) − ½,

  x_better / x_worse = the contrastive prompt's tokens (`prompts` = (better ids, worse
  ids)) followed by the sample's prompt (pads skipped); 0 outside the completion's loss
  mask. Zhou et al., "T-REG: Preference Optimization with Token-Level Reward
  Regularization" (2024).
  """
  n = ro.ids.shape[0]
  model.config.check_sequence_length(
      max(len(p) for p in prompts) + ro.ids.shape[1],
      what="rl.token_reward_prompts: the longest contrastive prompt + prompt + completion",
      fix="shorten the prompts")
  out = []
  for prefix in prompts:
    k = len(prefix)
    pre = jnp.broadcast_to(jnp.asarray(prefix, ro.ids.dtype), (n, k))
    ids = jnp.concatenate([pre, ro.ids], 1)
    attn = jnp.concatenate([jnp.ones((n, k), ro.attn.dtype), ro.attn], 1)
    lp, _ = completion_logps(model, params, ids, attn, ro.prompt_len + k, group_size,
                             vocab_limit)
    out.append(jax.lax.stop_gradient(lp))
  return losses_lib.preference_aux.treg_token_rewards(out[0], out[1], ro.loss_mask)
