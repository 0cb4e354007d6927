"""The online step's named phases before learning: rollout -> score -> signals -> estimate.

Each phase is a pure function of arrays (models and static settings are closed over or
passed first) with its own unit test; `rlhf_jax.train.online.make_update` composes them
with `learn` (`rlhf_jax.train.learn`) and `bookkeep` inside one `jax.jit`:

    ro = rollout(model, params, prompt_batch, rng, sampling_config)       # -> Rollout
    sc = score(rewards, ro, extras, reward_state)                         # -> Scores
    sg = signals(model, ref_params, ro, sc.rewards, beta, ...)            # -> Signals
    adv, adv_state = estimator(sc, ro, sg, adv_state)                     # -> advantages

Which inputs an estimator receives is read from its registered declaration
(`rlhf_jax.advantages.declaration(name)`); an estimator needing an input the step cannot
provide is refused when the estimator is built, naming the method and the input.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import flax
import jax
import jax.numpy as jnp

from rlhf_jax import advantages as advantages_lib
from rlhf_jax.advantages import allocation as allocation_lib
from rlhf_jax.advantages import turn as turn_lib
from rlhf_jax import sampling as sampling_lib
from rlhf_jax.losses import kl as kl_lib
from rlhf_jax.train.policy_passes import (completion_logits, completion_logps,  # noqa: F401
                                          head_influence)

RewardFn = Callable[..., jax.Array]


# ----------------------------------------------------------------------------- rollout


@flax.struct.dataclass
class Rollout:
  """Sampled trajectories, G consecutive rows per prompt (N = prompts x G).

  prompt_ids, prompt_mask: [N, P] left-padded prompts (repeated per sample).
  completion_ids, completion_mask: [N, T] sampled tokens; mask marks real tokens.
  loss_mask: [N, T] float32, the tokens that are trained (model tokens).
  logps: [N, T] sampler log-probs at temperature 1 (equal to the trainer's).
  lengths: [N] int32 number of completion tokens; finished: [N] bool (ended with EOS).
  """
  prompt_ids: jax.Array
  prompt_mask: jax.Array
  completion_ids: jax.Array
  completion_mask: jax.Array
  loss_mask: jax.Array
  logps: jax.Array
  lengths: jax.Array
  finished: jax.Array

  @property
  def prompt_len(self) -> int:
    return self.prompt_ids.shape[1]

  @property
  def ids(self) -> jax.Array:
    """[N, P + T]: the trainer's teacher-forced input."""
    return jnp.concatenate([self.prompt_ids, self.completion_ids], axis=1)

  @property
  def attn(self) -> jax.Array:
    return jnp.concatenate([self.prompt_mask.astype(bool), self.completion_mask.astype(bool)],
                           axis=1)


def rollout(model, params, prompt_batch: Mapping[str, jax.Array], rng: jax.Array,
            sampling_config) -> Rollout:
  """Samples `sampling_config.num_samples` completions per prompt (KV-cache decoder)."""
  return from_samples(sampling_lib.sample(model, params, prompt_batch["prompt_ids"],
                                          prompt_batch["prompt_mask"], rng, sampling_config))


def from_samples(out) -> Rollout:
  """The `Rollout` of a sampler's `SampleOutput` (no gradient; every sampled token trained)."""
  out = jax.tree.map(jax.lax.stop_gradient, out)
  return Rollout(prompt_ids=out.prompt_ids, prompt_mask=out.prompt_mask,
                 completion_ids=out.completion_ids, completion_mask=out.completion_mask,
                 loss_mask=out.completion_mask.astype(jnp.float32), logps=out.logps,
                 lengths=out.lengths, finished=out.finished)


def repeat_extras(prompt_batch: Mapping[str, jax.Array], group_size: int) -> Dict[str, jax.Array]:
  """The prompt batch's fields other than the prompt, repeated G times (one row per sample)."""
  return {k: jnp.repeat(v, group_size, axis=0) for k, v in prompt_batch.items()
          if k not in ("prompt_ids", "prompt_mask")}


# ----------------------------------------------------------------------------- score


@flax.struct.dataclass
class Scores:
  """rewards [N]: what the estimator sees; each [N, K]: every reward function's output
  (after `config.reward_shaping`); shaping_state: the reward transforms' new state."""
  rewards: jax.Array
  each: jax.Array
  shaping_state: Any = None


def score_each(reward_fns: Sequence[RewardFn], prompt_ids, completion_ids, completion_mask,
               extras: Mapping[str, jax.Array]) -> jax.Array:
  """The reward functions' outputs side by side: [N, K] (a function may return [N, k])."""
  cols, n = [], completion_ids.shape[0]
  for fn in reward_fns:
    r = jnp.asarray(fn(prompt_ids, completion_ids, completion_mask, extras), jnp.float32)
    if r.ndim not in (1, 2) or r.shape[0] != n:
      name = getattr(fn, "__qualname__", None) or repr(fn)
      raise ValueError(f"reward function {name} returned shape {tuple(r.shape)}; expected [N] "
                       f"(or [N, k]) with N = {n} completions: one reward per completion")
    cols.append(r[:, None] if r.ndim == 1 else r)
  return jnp.concatenate(cols, axis=1)


def score(reward_fns: Sequence[RewardFn], weights: Sequence[float], prompt_ids, completion_ids,
          completion_mask, extras: Mapping[str, jax.Array]):
  """Weighted sum of reward functions: returns (total [N], each [N, K])."""
  each = score_each(reward_fns, prompt_ids, completion_ids, completion_mask, extras)
  if len(weights) != each.shape[1]:
    raise ValueError(f"rl.reward_weights has {len(weights)} entries but the reward functions "
                     f"return {each.shape[1]} rewards; give one weight per reward")
  return each @ jnp.asarray(weights, jnp.float32), each


def make_score(reward_fns: Sequence[RewardFn], weights: Optional[Sequence[float]], dual=None,
               num_constraints: int = 0, shaping=None, group_size: int = 1):
  """Returns `score_rollout(rollout, extras, reward_state, shaping_state=None,
  ref_rewards=None, inputs=None) -> Scores`.

  The reward functions' outputs [N, K] first go through the `shaping` transforms
  (`rlhf_jax.rewards.transforms.Shaping`, with their state and the reference policy's
  rewards [N, M, K] where declared). Without constraints the rewards are then the weighted
  sum of the columns (`weights` None: all 1); with constrained RLHF's `dual` they are
  v_0 + Σ λ_i (v_i − θ_i) (task reward first).
  """
  def score_rollout(ro: Rollout, extras: Mapping[str, jax.Array], reward_state,
                    shaping_state=None, ref_rewards=None, inputs=None) -> Scores:
    args = (ro.prompt_ids, ro.completion_ids, ro.completion_mask,
            dict(extras, prompt_mask=ro.prompt_mask))
    each = score_each(reward_fns, *args)
    if shaping is not None and shaping.steps:
      inputs = dict(inputs or {}, completion_logps=ro.logps,
                    completion_mask=ro.completion_mask.astype(jnp.float32))
      each, shaping_state = shaping(each, group_size=group_size, ref_rewards=ref_rewards,
                                    inputs=inputs,
                                    state=shaping_state)
    if dual is None:
      w = (1.0,) * each.shape[1] if weights is None else weights
      if len(w) != each.shape[1]:
        raise ValueError(f"rl.reward_weights has {len(w)} entries but the reward functions "
                         f"return {each.shape[1]} rewards (after config.reward_shaping); give "
                         "one weight per reward")
      return Scores(rewards=each @ jnp.asarray(w, jnp.float32), each=each,
                    shaping_state=shaping_state)
    if each.shape[1] != 1 + num_constraints:
      raise ValueError(f"rl.constraint_thresholds has {num_constraints} thresholds, so the "
                       f"reward functions must return 1 + {num_constraints} rewards (task "
                       f"first, then the constraints); they return {each.shape[1]}")
    return Scores(rewards=dual.reward(reward_state, each[:, 0], each[:, 1:]), each=each,
                  shaping_state=shaping_state)
  return score_rollout


def select_adaptive(ro: Rollout, sc: Scores, *, group_size: int, rounds: int,
                    threshold: float = 0.7, balanced: bool = True):
  """Reinforce-Ada's selection as a phase: from R rounds of G samples per prompt, G per
  prompt (`allocation.reinforce_ada_select`). Returns (rollout, scores, selection)."""
  sel = allocation_lib.reinforce_ada_select(sc.rewards, group_size=group_size, rounds=rounds,
                                            threshold=threshold, balanced=balanced)
  take = lambda x: jnp.take(x, sel.rows, axis=0)  # noqa: E731
  sc = jax.tree.map(take, sc.replace(shaping_state=None)).replace(shaping_state=sc.shaping_state)
  return jax.tree.map(take, ro), sc, sel


def select_groups(ro: Rollout, sc: Scores, extras, *, group_size: int, keep: int):
  """Dynamic sampling's selection at a fixed shape: the first `keep` groups whose rewards
  are not all equal (batch order), then equal-reward groups if there are not enough.

  `extras`: any pytree of per-row arrays [N, ...] (e.g. a multi-turn `TurnInfo`), selected
  alike. Returns (rollout, scores, extras, chosen group indices [keep], informative [keep]).
  """
  r = sc.rewards.reshape(-1, group_size)
  informative = jnp.any(r != r[:, :1], axis=1)
  chosen = jnp.argsort(~informative, stable=True)[:keep]
  rows = (chosen[:, None] * group_size + jnp.arange(group_size)[None, :]).reshape(-1)
  take = lambda x: jnp.take(x, rows, axis=0)  # noqa: E731
  sc = jax.tree.map(take, sc.replace(shaping_state=None)).replace(shaping_state=sc.shaping_state)
  return (jax.tree.map(take, ro), sc, jax.tree.map(take, extras), chosen, informative[chosen])


def batch_answers(prompt_batch: Mapping[str, jax.Array], who: str):
  """The prompt batch's ground-truth answers: (ids int32, mask bool) [B, A], right-padded.
  A named error (`who` reads them) when the batch has none."""
  if "answer_ids" not in prompt_batch:
    raise ValueError(f"{who}, but the prompt batches have no answer_ids: use a task whose "
                     "records have an 'answer' field")
  ids = prompt_batch["answer_ids"].astype(jnp.int32)
  return ids, prompt_batch.get("answer_mask", ids != 0).astype(bool)


def reference_answers(prompt_batch, eos_id: int,
                      who: str = "the step scores the prompts' reference answers"):
  """The prompt batch's reference answers as completions: `answer_ids` with EOS appended
  after the last real token: (ids [B, A + 1], mask [B, A + 1] float32). A named error when
  the batch has no answers."""
  ids, mask = batch_answers(prompt_batch, who)
  b = ids.shape[0]
  ids = jnp.concatenate([ids, jnp.zeros((b, 1), jnp.int32)], 1)
  mask = jnp.concatenate([mask, jnp.zeros((b, 1), bool)], 1)
  end = jnp.sum(mask, axis=1)
  at_end = jnp.arange(ids.shape[1])[None, :] == end[:, None]
  return jnp.where(at_end, eos_id, ids), (mask | at_end).astype(jnp.float32)


def filter_samples(ro: Rollout, sc: Scores, rng: jax.Array, *, group_size: int,
                   num_best: int = 0, num_worst: int = 0, num_random: int = 0):
  """PF-PPO's policy filtration as a phase: the `num_best` / `num_worst` highest / lowest
  rewarded samples of each group, and `num_random` others drawn uniformly, keep their loss
  mask; the others are not trained on (fixed shape: their `loss_mask` is zeroed).

  Returns (rollout, kept [N] bool). `advantages.allocation.pf_ppo_filter` (Shen et al.,
  2024) picks the samples from `sc.rewards`.
  """
  keep = allocation_lib.pf_ppo_filter(sc.rewards, group_size=group_size, num_best=num_best,
                                      num_worst=num_worst, num_random=num_random,
                                      rng=rng if num_random else None)
  return ro.replace(loss_mask=ro.loss_mask * keep[:, None].astype(ro.loss_mask.dtype)), keep


# ----------------------------------------------------------------------------- signals


@flax.struct.dataclass
class Signals:
  """Per-token quantities the estimator and the loss read besides the rewards.

  ref_logps: [N, T] reference log-probs of the sampled tokens.
  kl: [N, T] k1 = sampler log-prob − reference log-prob (masked).
  token_rewards: [N, T] the sequence reward on the last token, minus β·kl with
    `kl_in_reward` (token-level estimators read these).
  values: [N, T] value-model predictions (None without a value model).
  old_vocab_mean_logps: [N, T] the sampling policy's mean_v log π_old(v|·) at each position
    (ROVER's targets over several updates; None otherwise).
  lm_head_influence: [N, T] each token's LM-head gradient inner product with its group's
    responses above the group mean (`advantages.hidden_reward.lm_head_influence`; THR's
    input; None otherwise).
  ref_logits: [N, T, V] the reference's logits at the completion positions (the frozen LM
    of a value-based surrogate, B-Coder; None otherwise).
  """
  ref_logps: jax.Array
  kl: jax.Array
  token_rewards: jax.Array
  values: Optional[jax.Array] = None
  old_vocab_mean_logps: Optional[jax.Array] = None
  lm_head_influence: Optional[jax.Array] = None
  ref_logits: Optional[jax.Array] = None


def signals(model, ref_params, ro: Rollout, rewards: jax.Array, beta: jax.Array, *,
            group_size: int, kl_in_reward: bool, value_model=None,
            value_params=None, vocab_limit: Optional[int] = None,
            policy_params=None, influence_params=None, ref_logits: bool = False) -> Signals:
  """Reference log-probs, the sampler-vs-reference KL, token rewards and values; with
  `policy_params` (the sampling policy) also its vocabulary-mean log-probs; with
  `influence_params` (the sampling policy) the tokens' LM-head influence (THR); with
  `ref_logits` the reference's logits at the completion positions (B-Coder)."""
  ids, attn = ro.ids, ro.attn
  ref_logps, _ = completion_logps(model, ref_params, ids, attn, ro.prompt_len, group_size,
                                  vocab_limit)
  mask = ro.loss_mask
  kl_tok = kl_lib.k1(ro.logps, ref_logps, mask)
  token_rewards = kl_lib.kl_in_reward(rewards, kl_tok, mask,
                                      beta=beta if kl_in_reward else 0.0)
  values = None
  if value_model is not None:
    v = value_model.apply(value_params, ids, attention_mask=attn)
    values = v[:, ro.prompt_len - 1:-1] * mask
  old_vm = None
  if policy_params is not None:
    old_vm = jax.lax.stop_gradient(completion_logps(
        model, policy_params, ids, attn, ro.prompt_len, group_size, vocab_limit,
        vocab_mean=True)[2]) * mask
  influence = (None if influence_params is None else
               head_influence(model, influence_params, ro, rewards, group_size=group_size,
                              vocab_limit=vocab_limit))
  frozen = None
  if ref_logits:
    frozen = jax.lax.stop_gradient(completion_logits(model, ref_params, ids, attn,
                                                     ro.prompt_len, vocab_limit))
  return Signals(ref_logps=ref_logps, kl=kl_tok, token_rewards=token_rewards, values=values,
                 old_vocab_mean_logps=old_vm, lm_head_influence=influence, ref_logits=frozen)


# ----------------------------------------------------------------------------- estimate

# Inputs an estimator may declare that the single-turn step computes (`values` only with
# a value model; `greedy_rewards` costs one greedy decode per prompt).
STEP_INPUTS = ("group_size", "mask", "lengths", "values", "greedy_rewards", "answer_ids",
               "vocab_mean_log_ratio", "prompt_means", "lm_head_influence", "group_ids")


def answer_ids(completion_ids: jax.Array, completion_mask: jax.Array) -> jax.Array:
  """[N] int32 ids equal exactly for equal completions (a polynomial hash of the masked
  tokens): the final-answer identity COPO's answer entropy reads, for tasks whose
  completion is the answer."""
  m = completion_mask.astype(bool)
  tok = jnp.where(m, completion_ids.astype(jnp.uint32) + 1, 0)
  powers = jnp.cumprod(jnp.full((tok.shape[1],), 1000003, jnp.uint32))
  return jax.lax.bitcast_convert_type(jnp.sum(tok * powers[None, :], axis=1), jnp.int32)


@dataclasses.dataclass(frozen=True)
class Estimator:
  """A registered advantage estimator bound to its hyper-parameters and the step's inputs.

  Built once, when the config is read (`Estimator.build`), from the estimator's
  declaration: its kind picks the first argument (sequence rewards, token rewards, or
  the unweighted [N, K] rewards), its `needs` the keyword inputs, its `state` the
  `(init, update)` pair the step keeps.
  """
  name: str
  kind: str
  needs: Tuple[str, ...]
  kwargs: Tuple[Tuple[str, Any], ...]
  group_size: int
  stateful: bool = False

  @classmethod
  def build(cls, name: str, kwargs: Mapping[str, Any], *, group_size: int,
            provides: Sequence[str]) -> "Estimator":
    """Checks the declaration against what the step `provides`; raises ValueError naming
    the estimator, the missing input and the fix."""
    decl = advantages_lib.declaration(name)
    decl.check_kwargs(kwargs, key="rl.advantage_kwargs")
    missing = [n for n in decl.needs if n not in provides and n not in kwargs]
    if missing:
      fix = ("add a value model: config.value = dict(optim=None), or make_update(..., "
             "value_model=...)" if missing == ["values"]
             else "the single-turn online step does not compute it")
      raise ValueError(f"rl.advantage={name!r} needs {', '.join(map(repr, missing))}, which "
                       f"the RL step does not provide ({fix}); the step provides "
                       f"{sorted(provides)}")
    return cls(name=name, kind=decl.kind, needs=decl.needs, kwargs=tuple(sorted(kwargs.items())),
               group_size=group_size, stateful=decl.state is not None)

  def _transform(self):
    return advantages_lib.declaration(self.name).state(group_size=self.group_size)

  def init_state(self):
    """The estimator's initial state (None for stateless estimators)."""
    return self._transform().init() if self.stateful else None

  def __call__(self, scores: Scores, ro: Rollout, sig: Signals, state,
               greedy_rewards: Optional[jax.Array] = None,
               turn_inputs: Optional[Mapping[str, jax.Array]] = None,
               prompt_means: Optional[jax.Array] = None,
               group_ids: Optional[jax.Array] = None):
    """(advantages [N] or [N, T], new state).

    `prompt_means` [N // G]: the mean reward of every sample drawn for each prompt
    (Reinforce-Ada's pool, `rl.adaptive_sampling`); default: each group's mean.
    `group_ids` [N]: each sample's prompt (Knapsack RL's ragged groups, `rl.knapsack`);
    default: G consecutive samples per prompt.

    `turn_inputs` (multi-turn rollouts): the turn-level inputs ("step_rewards",
    "anchor_ids", "step_mask") and "token_turn" [N, T]; a "step" estimator's per-turn
    advantages [N, K] are then spread over each turn's trained tokens.
    """
    inputs = {"group_size": self.group_size, "mask": ro.loss_mask,
              "lengths": jnp.sum(ro.loss_mask, axis=1), "values": sig.values,
              "greedy_rewards": greedy_rewards, **(turn_inputs or {})}
    if "vocab_mean_log_ratio" in self.needs:
      # ROVER's targets at estimate time: the policy is the sampling policy (θ = θ_old), so
      # mean_v (log π_θ − log π_old) is 0; the learn phase adds its value at each update.
      inputs["vocab_mean_log_ratio"] = jnp.zeros(ro.loss_mask.shape, jnp.float32)
    if "lm_head_influence" in self.needs:
      if sig.lm_head_influence is None:
        raise ValueError(f"rl.advantage={self.name!r} reads the tokens' LM-head influence: "
                         "call phases.signals with influence_params=<the sampling policy>")
      inputs["lm_head_influence"] = sig.lm_head_influence
    if "answer_ids" in self.needs:
      inputs["answer_ids"] = answer_ids(ro.completion_ids, ro.completion_mask)
    if "group_ids" in self.needs:
      n = ro.loss_mask.shape[0]
      inputs["group_ids"] = (jnp.arange(n, dtype=jnp.int32) // self.group_size
                             if group_ids is None else group_ids)
    if "prompt_means" in self.needs:
      inputs["prompt_means"] = (jnp.mean(scores.rewards.reshape(-1, self.group_size), axis=1)
                                if prompt_means is None else prompt_means)
    kwargs = dict(self.kwargs)
    for n in self.needs:
      if n not in kwargs:
        kwargs[n] = inputs[n]
    first = {"token": sig.token_rewards, "multi_reward": scores.each}.get(self.kind,
                                                                          scores.rewards)
    if self.stateful:
      state = self._transform().update(state, scores.rewards)
      kwargs["state"] = state
    try:
      out = advantages_lib.get(self.name)(first, **kwargs)
    except ValueError as e:
      raise ValueError(f"rl.advantage={self.name!r} (rl.group_size={self.group_size}, "
                       f"rl.advantage_kwargs={dict(self.kwargs)}): {e}") from e
    if isinstance(out, tuple) and hasattr(out, "combine"):  # e.g. COPO's blend
      out = out.combine()
    if isinstance(out, tuple):
      raise ValueError(f"advantage estimator {self.name!r} returns several arrays "
                       f"({type(out).__name__}: {', '.join(getattr(out, '_fields', ()))}), not "
                       "one advantage; combine them in a custom estimator to use it in the RL "
                       "step")
    if self.kind == "step":
      out = turn_lib.per_token(out, inputs["token_turn"], ro.loss_mask)
    return out, state


def estimate(estimator: Estimator, scores: Scores, ro: Rollout, sig: Signals, adv_state,
             greedy_rewards: Optional[jax.Array] = None,
             turn_inputs: Optional[Mapping[str, jax.Array]] = None,
             prompt_means: Optional[jax.Array] = None, group_ids: Optional[jax.Array] = None):
  """The estimate phase: `(advantages, new adv_state)` (see `Estimator.__call__`)."""
  return estimator(scores, ro, sig, adv_state, greedy_rewards, turn_inputs, prompt_means,
                   group_ids)
