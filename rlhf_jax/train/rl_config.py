"""The static (hashable) settings of the fused RL step, read from a config block.

`RLSettings.from_config(config.rl)` validates every key, so a typo or an
incompatible combination fails before anything is compiled, with a message
naming the key and the fix.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Tuple

from rlhf_jax import advantages as advantages_lib
from rlhf_jax import losses as losses_lib
from rlhf_jax.losses import aggregate as aggregate_lib
from rlhf_jax.losses import kl as kl_lib
from rlhf_jax.rewards import shaping_state
from rlhf_jax.train import reference as reference_lib


OBJECTIVES = ("policy_gradient", "preference")
PAIRINGS = ("best_worst", "all_pairs", "rso")
SAMPLE_FILTER_KEYS = ("num_best", "num_worst", "num_random")
ADAPTIVE_KEYS = ("rounds", "threshold", "balanced")
KNAPSACK_KEYS = ("min_samples", "max_samples", "threshold")


def _check_keys(name: str, kw: Mapping[str, Any], known: Tuple[str, ...], reader: str) -> None:
  """Raises ValueError naming `rl.<name>`'s keys that `reader` does not read."""
  unknown = sorted(set(kw) - set(known))
  if unknown:
    raise ValueError(f"rl.{name} has unknown keys {unknown}; {reader} reads {', '.join(known)}")


def _freeze(d: Optional[Mapping[str, Any]]) -> Tuple[Tuple[str, Any], ...]:
  return tuple(sorted(dict(d or {}).items()))


@dataclasses.dataclass(frozen=True)
class RLSettings:
  """Hashable settings of one RL update (closed over by `jax.jit`).

  group_size: samples per prompt (G).
  advantage / advantage_kwargs: a name from `rlhf_jax.advantages.names()`.
  surrogate / surrogate_kwargs: a policy-gradient loss from `rlhf_jax.losses`, or a
    value-based one (`bcoder`: Q = α(ℓ − max ℓ) + V from the policy's logits and a value
    model, a conservative target from the reference's greedy tokens; needs config.value).
  kl_coef, kl_estimator ("k1", "k2", "k3", "low_var_kl", "abs_kl"), kl_in_reward:
    the KL penalty to the reference, in the loss (default) or in the reward.
  kl_target, kl_horizon: when kl_target is set, β adapts (Ziegler et al.) from
    kl_coef towards the target sequence KL; otherwise β = kl_coef is fixed.
  entropy_coef: weight of the entropy bonus (subtracted from the loss).
  aggregation: a mode of `rlhf_jax.losses.aggregate.aggregate`.
  epochs, num_minibatches, micro_batches: μ passes over the sampled batch, split
    into minibatches (one optimiser update each), each accumulated over
    micro-batches (a memory knob: the update does not depend on it).
  value_coef, value_clip: PPO value loss (only with a value model).
  reward_weights: one weight per reward function (default all 1).
  constraint_thresholds, constraint_equality, constraint_lr: constrained RLHF (Moskovitz
    et al. 2023): the first reward is the task reward and the next C rewards are
    constraints v_i ≥ θ_i (or = θ_i); the step trains on v_0 + Σ λ_i (v_i − θ_i) and
    updates the multipliers λ (state) by dual descent on the batch means
    (`rlhf_jax.rewards.shaping_state.lagrangian_multipliers`). Exclusive with reward_weights.
  dynamic_sampling: DAPO's dynamic sampling (Yu et al. 2025) at a fixed compiled shape: with
    k >= 2 the step samples k x prompts_per_step prompts (the loop's batches are k times
    larger), keeps prompts_per_step groups whose rewards are not all equal (in batch order;
    equal-reward groups only when there are not enough others) and learns on those alone.
    0 or 1: off.
  ref_update_every, ref_ema_decay: the reference policy is fixed (default), set to the
    policy after every k-th update (`ref_update_every=k`), or an EMA of the policy
    (`ref_ema_decay=δ`: ref ← δ·ref + (1 − δ)·θ after each update); `rlhf_jax.train.reference`.
  objective: "policy_gradient" (advantages and `surrogate`) or "preference" (online
    preference optimisation, `rlhf_jax.train.preference_step`): pairs (or the ranked group)
    from each prompt's G scored samples, trained with `preference_loss` /
    `preference_loss_kwargs` (default dpo). `pairs`: "best_worst", "all_pairs" or "rso"
    (statistical rejection sampling at temperature `rso_beta`). `preference_temperature`
    T: OSP's preference strength σ((r_w − r_l)/T). `iterate_every=k` keeps the policy of
    every k-th update as the iterate π_t that INPO's loss reads (DNO's previous-iterate
    reference is `ref_update_every=k`). `mixture_beta` β: Nash-MD's opponent is sampled
    from the geometric mixture π^(1−β) π_ref^β. `token_reward_prompts`: T-REG's two
    contrastive revision prompts (better, worse), each prepended to the prompt; the token
    rewards σ(log π(y_t|x_better) − log π(y_t|x_worse)) − ½ come from the sampling policy
    (`token_reward_prompt_ids` holds them tokenized: `with_prompt_ids(tokenizer)`).
  adaptive_sampling: Reinforce-Ada's adaptive sampling, e.g. {"rounds": 4, "threshold":
    0.7, "balanced": True}: up to `rounds` rounds of G samples per prompt (all drawn at
    once), each prompt using its rounds until it has ⌊G/2⌋ positives (reward > threshold)
    and G − ⌊G/2⌋ negatives (balanced; else one positive), keeping G of them balanced
    (`advantages.allocation.reinforce_ada_select`); the pool's mean reward reaches the
    estimator as `prompt_means` (`rl.advantage="reinforce_ada"`). Empty: off.
  sample_filter: PF-PPO's policy filtration (Shen et al. 2024), e.g. {"num_best": 1,
    "num_worst": 1} (best-worst), {"num_best": 1, "num_random": 1} (best-random) or
    {"num_best": 1} (best-of-N): per group, only the kept samples are trained on
    (`advantages.allocation.pf_ppo_filter`); the estimator still sees all G. Empty: off.
  knapsack: Knapsack RL's budget allocation, e.g. {"min_samples": 2, "max_samples": 16,
    "threshold": 0.5}: the step's B·G samples are split among the B prompts by
    `advantages.allocation.knapsack_allocate` on each prompt's success rate (reward >
    threshold) when its record was last trained on (`state.alloc_state`,
    `rlhf_jax.train.knapsack`); groups are then ragged, so the estimator must read
    `group_ids` (`rl.advantage="grpo_ragged"`). Empty: off (G samples per prompt).
  """
  group_size: int = 4
  advantage: str = "grpo"
  advantage_kwargs: Tuple[Tuple[str, Any], ...] = ()
  surrogate: str = "ppo_clip"
  surrogate_kwargs: Tuple[Tuple[str, Any], ...] = ()
  kl_coef: float = 0.0
  kl_estimator: str = "k3"
  kl_in_reward: bool = False
  kl_target: Optional[float] = None
  kl_horizon: float = 10000.0
  entropy_coef: float = 0.0
  aggregation: str = "token_mean"
  epochs: int = 1
  num_minibatches: int = 1
  micro_batches: int = 1
  value_coef: float = 0.5
  value_clip: Optional[float] = 0.2
  reward_weights: Tuple[float, ...] = ()
  constraint_thresholds: Tuple[float, ...] = ()
  constraint_equality: Tuple[bool, ...] = ()
  constraint_lr: float = 0.1
  ref_update_every: int = 0
  ref_ema_decay: Optional[float] = None
  dynamic_sampling: int = 0
  objective: str = "policy_gradient"
  preference_loss: Optional[str] = None
  preference_loss_kwargs: Tuple[Tuple[str, Any], ...] = ()
  pairs: str = "best_worst"
  rso_beta: float = 0.5
  preference_temperature: float = 1.0
  iterate_every: int = 0
  mixture_beta: float = 0.125
  token_reward_prompts: Tuple[str, ...] = ()
  token_reward_prompt_ids: Tuple[Tuple[int, ...], ...] = ()
  sample_filter: Tuple[Tuple[str, Any], ...] = ()
  adaptive_sampling: Tuple[Tuple[str, Any], ...] = ()
  knapsack: Tuple[Tuple[str, Any], ...] = ()

  @classmethod
  def from_config(cls, cfg: Mapping[str, Any]) -> "RLSettings":
    cfg = dict(cfg)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(cfg) - fields)
    if unknown:
      raise ValueError(f"unknown rl config keys {unknown}; known keys: {sorted(fields)}")
    for key in ("advantage_kwargs", "surrogate_kwargs", "preference_loss_kwargs",
                "sample_filter", "adaptive_sampling", "knapsack"):
      if key in cfg:
        cfg[key] = _freeze(cfg[key])
    if cfg.get("token_reward_prompts") is not None:
      prompts = cfg["token_reward_prompts"]
      cfg["token_reward_prompts"] = ((prompts,) if isinstance(prompts, str)
                                     else tuple(prompts))
    for key, kind in (("reward_weights", float), ("constraint_thresholds", float),
                      ("constraint_equality", bool)):
      if cfg.get(key) is not None:
        cfg[key] = tuple(kind(w) for w in cfg[key])
    if cfg.get("objective") == "preference" and not cfg.get("preference_loss"):
      cfg["preference_loss"] = "dpo"
    settings = cls(**cfg)
    settings.validate()
    return settings

  def validate(self) -> None:
    """Raises ValueError naming the offending key."""
    if self.group_size < 1:
      raise ValueError(f"rl.group_size must be >= 1, got {self.group_size}")
    if self.advantage not in advantages_lib.REGISTRY:
      raise ValueError(f"rl.advantage={self.advantage!r} is unknown; choose one of "
                       f"{', '.join(advantages_lib.names())}")
    fam = losses_lib.REGISTRY.family(self.surrogate) if self.surrogate in losses_lib.REGISTRY else None
    if fam not in ("policy_gradient", "value"):
      hint = (f" ({self.surrogate!r} is a preference loss: set rl.objective='preference' and "
              f"rl.preference_loss={self.surrogate!r})" if fam == "preference" else "")
      raise ValueError(f"rl.surrogate={self.surrogate!r} is not a policy-gradient or value-based "
                       f"loss{hint}; choose one of "
                       f"{', '.join([*losses_lib.names('policy_gradient'), *losses_lib.names('value')])}")
    self._validate_objective()
    if self.kl_estimator not in losses_lib.names("kl"):
      raise ValueError(f"rl.kl_estimator={self.kl_estimator!r} is unknown; choose one of "
                       f"{', '.join(losses_lib.names('kl'))}")
    if self.aggregation not in aggregate_lib.MODES:
      raise ValueError(f"rl.aggregation={self.aggregation!r} is unknown; choose one of "
                       f"{', '.join(aggregate_lib.MODES)}")
    for key in ("epochs", "num_minibatches", "micro_batches"):
      if getattr(self, key) < 1:
        raise ValueError(f"rl.{key} must be >= 1, got {getattr(self, key)}")
    if self.constraint_thresholds and self.reward_weights:
      raise ValueError("rl.constraint_thresholds and rl.reward_weights are exclusive: with "
                       "constraints the rewards are v_0 + sum_i lambda_i (v_i - theta_i)")
    if self.constraint_equality and (len(self.constraint_equality)
                                     != len(self.constraint_thresholds)):
      raise ValueError(f"rl.constraint_equality has {len(self.constraint_equality)} entries "
                       f"but rl.constraint_thresholds has {len(self.constraint_thresholds)}")
    if self.dynamic_sampling < 0 or (self.dynamic_sampling > 1 and self.group_size < 2):
      raise ValueError(f"rl.dynamic_sampling={self.dynamic_sampling}: use 0 (off) or an "
                       "oversampling factor k >= 2 with rl.group_size >= 2 (a group of one "
                       "always has zero variance)")
    if self.ref_update_every < 0:
      raise ValueError(f"rl.ref_update_every must be >= 0 (0: a fixed reference), got "
                       f"{self.ref_update_every}")
    if self.ref_ema_decay is not None:
      if self.ref_update_every:
        raise ValueError("rl.ref_update_every and rl.ref_ema_decay are exclusive; set one")
      if not 0.0 <= self.ref_ema_decay <= 1.0:
        raise ValueError(f"rl.ref_ema_decay must be in [0, 1], got {self.ref_ema_decay}")
    self._validate_sample_filter()
    self._validate_adaptive()
    self._validate_knapsack()
    advantages_lib.declaration(self.advantage).check_kwargs(dict(self.advantage_kwargs),
                                                            key="rl.advantage_kwargs")
    losses_lib.declaration(self.surrogate).check_kwargs(dict(self.surrogate_kwargs),
                                                        key="rl.surrogate_kwargs")

  def _validate_sample_filter(self) -> None:
    if not self.sample_filter:
      return
    kw = dict(self.sample_filter)
    _check_keys("sample_filter", kw, SAMPLE_FILTER_KEYS, "PF-PPO's filter")
    counts = [kw.get(k, 0) for k in SAMPLE_FILTER_KEYS]
    if any(not isinstance(c, int) or c < 0 for c in counts) or not sum(counts):
      raise ValueError(f"rl.sample_filter={kw}: num_best / num_worst / num_random are "
                       "integers >= 0 and keep at least one sample per group")
    if sum(counts) > self.group_size:
      raise ValueError(f"rl.sample_filter={kw} keeps {sum(counts)} samples per group, more than "
                       f"rl.group_size={self.group_size}")
    if self.objective == "preference":
      raise ValueError("rl.sample_filter (PF-PPO) filters the policy-gradient step's samples; "
                       "rl.objective='preference' builds its own pairs: remove one")

  def _validate_adaptive(self) -> None:
    if not self.adaptive_sampling:
      return
    kw = dict(self.adaptive_sampling)
    _check_keys("adaptive_sampling", kw, ADAPTIVE_KEYS, "Reinforce-Ada's sampling")
    rounds = kw.get("rounds")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 2:
      raise ValueError(f"rl.adaptive_sampling.rounds={rounds!r}: give an int >= 2 (the most "
                       "rounds of rl.group_size samples drawn per prompt)")
    if not isinstance(kw.get("threshold", 0.7), (int, float)) or not isinstance(
        kw.get("balanced", True), bool):
      raise ValueError(f"rl.adaptive_sampling={kw}: threshold is a number (a positive sample "
                       "has reward > threshold) and balanced a bool")
    self._exclusive("rl.adaptive_sampling (Reinforce-Ada) selects each prompt's samples itself",
                    "dynamic_sampling", "sample_filter", "objective")

  def _validate_knapsack(self) -> None:
    if not self.knapsack:
      return
    kw = dict(self.knapsack)
    _check_keys("knapsack", kw, KNAPSACK_KEYS, "Knapsack RL's allocation")
    lo, hi = kw.get("min_samples", 2), kw.get("max_samples", 0)
    if (any(isinstance(v, bool) or not isinstance(v, int) for v in (lo, hi))
        or not 1 <= lo <= self.group_size or (hi and hi < self.group_size)):
      raise ValueError(f"rl.knapsack={kw}: min_samples is an int in [1, rl.group_size="
                       f"{self.group_size}] and max_samples 0 (no cap) or an int >= "
                       "rl.group_size (the budget is rl.group_size samples per prompt)")
    if not isinstance(kw.get("threshold", 0.5), (int, float)):
      raise ValueError(f"rl.knapsack={kw}: threshold is a number (a success has reward > "
                       "threshold)")
    if "group_ids" not in advantages_lib.declaration(self.advantage).needs:
      raise ValueError(f"rl.knapsack gives prompts different numbers of samples, which "
                       f"rl.advantage={self.advantage!r} does not read (it assumes groups of "
                       "rl.group_size); use rl.advantage='grpo_ragged'")
    self._exclusive("rl.knapsack allocates each prompt's samples itself", "dynamic_sampling",
                    "sample_filter", "adaptive_sampling", "objective")

  def _exclusive(self, what: str, *keys: str) -> None:
    """Raises ValueError when any of the sample-selection `keys` is on alongside `what`."""
    on = {"dynamic_sampling": self.dynamic_sampling > 1,
          "sample_filter": bool(self.sample_filter),
          "adaptive_sampling": bool(self.adaptive_sampling),
          "objective": self.objective == "preference"}
    for key in keys:
      if on[key]:
        shown = "objective='preference'" if key == "objective" else key
        raise ValueError(f"{what}; it does not combine with rl.{shown}: remove one")

  @property
  def value_based(self) -> bool:
    """The surrogate is a value-based loss (B-Coder): the learn phase trains Q from the
    policy's logits and a value model, against the reference's logits."""
    return losses_lib.REGISTRY.family(self.surrogate) == "value"

  @property
  def adaptive_rounds(self) -> int:
    """Rounds of G samples drawn per prompt (1: no adaptive sampling)."""
    return int(dict(self.adaptive_sampling).get("rounds", 1))

  def _validate_objective(self) -> None:
    if self.objective not in OBJECTIVES:
      raise ValueError(f"rl.objective={self.objective!r} is unknown; choose one of "
                       f"{', '.join(OBJECTIVES)}")
    if self.iterate_every < 0:
      raise ValueError(f"rl.iterate_every must be >= 0 (0: no kept iterate), got "
                       f"{self.iterate_every}")
    if self.objective != "preference":
      for key in ("preference_loss", "preference_loss_kwargs", "iterate_every",
                  "token_reward_prompts"):
        if getattr(self, key):
          raise ValueError(f"rl.{key} is read only with rl.objective='preference'; set "
                           f"rl.objective='preference' or remove rl.{key}")
      return
    loss = self.preference_loss
    fam = losses_lib.REGISTRY.family(loss) if loss in losses_lib.REGISTRY else None
    if fam != "preference":
      what = "a policy-gradient loss" if fam == "policy_gradient" else "not a preference loss"
      fix = (" (for it, use rl.objective='policy_gradient' and rl.surrogate="
             f"{loss!r})" if fam == "policy_gradient" else "")
      raise ValueError(f"rl.preference_loss={loss!r} is {what}{fix}; choose one of "
                       f"{', '.join(losses_lib.names('preference'))}")
    if self.group_size < 2:
      raise ValueError(f"rl.objective='preference' builds pairs within each prompt's group: "
                       f"rl.group_size must be >= 2, got {self.group_size}")
    if self.pairs not in PAIRINGS:
      raise ValueError(f"rl.pairs={self.pairs!r} is unknown; choose one of {', '.join(PAIRINGS)}")
    if not 0.0 <= self.mixture_beta <= 1.0:
      raise ValueError(f"rl.mixture_beta must be in [0, 1], got {self.mixture_beta}")
    if self.rso_beta <= 0 or self.preference_temperature <= 0:
      raise ValueError(f"rl.rso_beta and rl.preference_temperature must be > 0, got "
                       f"{self.rso_beta} and {self.preference_temperature}")
    prompts = self.token_reward_prompts
    if prompts and (len(prompts) != 2
                    or not all(isinstance(t, str) and t for t in prompts)):
      raise ValueError(f"rl.token_reward_prompts={prompts!r}: give two non-empty strings, "
                       "(better, worse), e.g. ('Answer correctly: ', 'Answer wrongly: ')")
    if self.kl_coef or self.kl_target is not None or self.kl_in_reward or self.entropy_coef:
      raise ValueError("rl.kl_coef / rl.kl_target / rl.kl_in_reward / rl.entropy_coef shape the "
                       "policy-gradient objective; with rl.objective='preference' the loss's own "
                       "beta (rl.preference_loss_kwargs) sets the strength of the reference")

  def with_prompt_ids(self, tokenizer) -> "RLSettings":
    """These settings with `token_reward_prompts` tokenized (a named error when the
    tokenizer cannot encode one)."""
    ids = []
    for text in self.token_reward_prompts:
      try:
        enc = tuple(int(t) for t in tokenizer.encode(text))
      except Exception as e:  # pylint: disable=broad-except
        raise ValueError(f"rl.token_reward_prompts: the tokenizer cannot encode {text!r} "
                         f"({type(e).__name__}: {e}); use characters it knows") from None
      if not enc:
        raise ValueError(f"rl.token_reward_prompts: {text!r} encodes to no tokens")
      ids.append(enc)
    return dataclasses.replace(self, token_reward_prompt_ids=tuple(ids))

  def estimator_inputs(self) -> frozenset:
    """Inputs the advantage estimator declares that rl.advantage_kwargs does not set
    (e.g. "values" for GAE, "greedy_rewards" for ReMax)."""
    needs = advantages_lib.declaration(self.advantage).needs
    return frozenset(needs) - {k for k, _ in self.advantage_kwargs}

  def initial_adv_state(self):
    """The estimator's initial state, for estimators that declare one (e.g. BNPO)."""
    decl = advantages_lib.declaration(self.advantage)
    return None if decl.state is None else decl.state(group_size=self.group_size).init()

  def reward_constraints(self):
    """Constrained RLHF's `(init, update, multipliers, reward)`, or None without constraints."""
    if not self.constraint_thresholds:
      return None
    return shaping_state.lagrangian_multipliers(
        thresholds=self.constraint_thresholds, lr=float(self.constraint_lr),
        equality=self.constraint_equality or None)

  def reference_update(self):
    """The `(init, update)` reference policy rule these settings describe."""
    if self.ref_ema_decay is not None:
      return reference_lib.ema_reference(decay=float(self.ref_ema_decay))
    if self.ref_update_every:
      return reference_lib.periodic_reference(every=int(self.ref_update_every))
    return reference_lib.fixed_reference()

  def iterate_update(self):
    """The `(init, update)` rule of the kept iterate π_t (`iterate_every`), or None."""
    if not self.iterate_every:
      return None
    return reference_lib.periodic_reference(every=int(self.iterate_every))

  @property
  def moves_reference(self) -> bool:
    return self.ref_ema_decay is not None or self.ref_update_every > 0

  def kl_controller(self):
    """The `(init, update)` KL controller these settings describe."""
    if self.kl_target is None:
      return kl_lib.fixed_kl_controller(beta=self.kl_coef)
    return kl_lib.adaptive_kl_controller(init_beta=self.kl_coef, target=self.kl_target,
                                         horizon=self.kl_horizon)

  @property
  def oversample(self) -> int:
    """How many prompts the step samples per prompt it learns on (dynamic sampling)."""
    return max(1, self.dynamic_sampling)

  def check_batch(self, num_prompts: int) -> None:
    """Checks that the sampled batch splits into minibatches and micro-batches."""
    if self.objective == "preference":  # minibatches and micro-batches of whole groups
      if num_prompts % self.num_minibatches or (num_prompts // self.num_minibatches
                                                % self.micro_batches):
        raise ValueError(
            f"rl.num_minibatches={self.num_minibatches} x rl.micro_batches={self.micro_batches} "
            f"must divide prompts_per_step={num_prompts}: rl.objective='preference' splits the "
            "batch by prompt (whole groups); pick divisors")
      return
    n = num_prompts * self.group_size
    if n % self.num_minibatches:
      raise ValueError(
          f"rl.num_minibatches={self.num_minibatches} does not divide the {n} samples "
          f"(prompts_per_step={num_prompts} x group_size={self.group_size}); pick a divisor")
    per_mb = n // self.num_minibatches
    if per_mb % self.micro_batches:
      raise ValueError(
          f"rl.micro_batches={self.micro_batches} does not divide the {per_mb} samples of a "
          f"minibatch; pick a divisor")
