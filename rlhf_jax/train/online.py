"""The fused online RL step: sample, score and optimise in ONE jitted program.

    update = make_update(model, reward_fns, optimizer, settings, sampling_config)
    state, metrics = update(state, prompt_batch, rng)

`update` composes the named phases (all inside one `jax.jit`, state donated):
rollout -> score -> signals -> estimate (`rlhf_jax.train.phases`) -> learn
(`rlhf_jax.train.learn`) -> bookkeep (below): G samples per prompt from the KV-cache
sampler; rewards from the reward functions (weighted, or constrained); reference
log-probs, KL and values; advantages from the registered estimator (its declaration says
what it reads; ReMax's greedy baseline is one more, greedy, decode per prompt);
`epochs` x `num_minibatches` optimiser updates of the surrogate + KL + entropy (+ value)
objective, each accumulated over `micro_batches`; then the KL controller, dual
variables, reference update, non-finite guard and metrics.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import optax

from rlhf_jax import guards
from rlhf_jax import sampling as sampling_lib
from rlhf_jax.train import adapters as adapters_lib
from rlhf_jax.train import knapsack as knapsack_lib
from rlhf_jax.train import learn as learn_lib
from rlhf_jax.train import multiturn, phases, preference_step, shaping_inputs
from rlhf_jax.train.phases import Rollout, Scores, Signals, score, score_each  # noqa: F401
from rlhf_jax.train.step_metrics import step_metrics, variant_metrics
from rlhf_jax.train.rl_config import RLSettings
from rlhf_jax.train.rl_state import RLState, as_shaping, init_state  # noqa: F401  (re-exported)

RewardFn = Callable[..., jax.Array]


def make_bookkeep(settings: RLSettings):
  """Returns `bookkeep(state, trained, ok, sc, adv_state, metrics) -> (state, metrics)`:
  the KL controller, dual variables, reference update and non-finite guard."""
  kl_controller = settings.kl_controller()
  ref_update = settings.reference_update()
  iterate_update = settings.iterate_update()
  dual = settings.reward_constraints()
  single_update = settings.epochs * settings.num_minibatches == 1

  def bookkeep(state: RLState, trained: learn_lib.Trainable, sc: Scores, adv_state, metrics):
    kl_state = kl_controller.update(state.kl_state, metrics["seq_kl"], sc.rewards.shape[0])
    metrics = dict(metrics, kl_beta=kl_state.beta)
    guard = guards.nonfinite_init(window=1) if state.guard is None else state.guard
    kept = state.replace(step=state.step + 1, guard=guard)
    new = dict(params=trained.params, opt_state=trained.opt_state,
               value_params=trained.value_params, value_opt_state=trained.value_opt_state)
    reward_state = state.reward_state
    if dual is not None:  # dual descent on the batch means of the constraint rewards
      reward_state = dual.update(reward_state, jnp.mean(sc.each[:, 1:], axis=0))
      for i, lam in enumerate(dual.multipliers(reward_state)):
        metrics[f"lagrange_multiplier_{i}"] = lam
    new_state = kept.replace(kl_state=kl_state, adv_state=adv_state, reward_state=reward_state,
                             shaping_state=sc.shaping_state, **new)
    # A non-finite reward, loss or gradient keeps the previous state (step still advances).
    # With one update per step that update already kept the old params (see
    # `learn.learn`), so only the small remaining fields are selected here.
    skipped = ~trained.ok
    if single_update:
      kept = kept.replace(**new)
    new_state = guards.select_tree(skipped, kept, new_state)
    if settings.moves_reference:  # a lagged / EMA reference follows the (kept) policy
      ref = ref_update.update(state.ref_params, new_state.params, state.step + 1)
      new_state = new_state.replace(
          ref_params=guards.select_tree(skipped, state.ref_params, ref))
    if iterate_update is not None:  # the kept iterate π_t, every k-th update
      it = iterate_update.update(state.iterate_params, new_state.params, state.step + 1)
      new_state = new_state.replace(
          iterate_params=guards.select_tree(skipped, state.iterate_params, it))
    guard = guards.nonfinite_update(guard, metrics["loss"], skipped)
    metrics.update(skipped=skipped.astype(jnp.float32), skipped_total=guard.total,
                   bad_steps_in_a_row=guard.consecutive)
    return new_state.replace(guard=guard), metrics
  return bookkeep


def learn_data(ro: Rollout, sig: Signals, advantages) -> Dict[str, jax.Array]:
  """The arrays the learn phase trains on (value targets only with a value model)."""
  data = {"ids": ro.ids, "attn": ro.attn, "mask": ro.loss_mask, "old_logps": ro.logps,
          "ref_logps": sig.ref_logps, "advantages": advantages}
  if sig.old_vocab_mean_logps is not None:
    data["old_vocab_mean_logps"] = sig.old_vocab_mean_logps
  if sig.ref_logits is not None:  # a value-based surrogate (B-Coder)
    data.update(frozen_logits=sig.ref_logits, token_rewards=sig.token_rewards)
  if sig.values is not None:
    adv_tok = advantages if advantages.ndim == 2 else advantages[:, None] * ro.loss_mask
    data.update(old_values=sig.values, returns=(adv_tok + sig.values) * ro.loss_mask)
  return data


def make_update(model, reward_fns: Sequence[RewardFn], optimizer: optax.GradientTransformation,
                settings: RLSettings, sampling_config, *, reward_weights=None, value_model=None,
                value_optimizer: Optional[optax.GradientTransformation] = None,
                env=None, env_spec=None, jit: bool = True, donate: bool = True,
                out_shardings=None, reward_shaping=None, lora=None):
  """Returns `update(state, prompt_batch, rng) -> (state, metrics)`, one jitted program.

  prompt_batch: {"prompt_ids" [B, P], "prompt_mask" [B, P], ...extras [B, ...]};
  extras are repeated G times and handed to every reward function. The rewards are
  weighted by `reward_weights` (default `settings.reward_weights`, else all 1).
  With an environment (`rlhf_jax.envs.make`: `env`, `env_spec`) the rollout phase is the
  multi-turn one (`rlhf_jax.train.multiturn`): the environment's trajectory reward reaches
  the reward functions as `extras["env_reward"]` (`multiturn.env_reward()` returns it),
  and turn-level estimators ("step" family, e.g. `gigpo`, `turn_returns`) get the turns.
  `reward_shaping` (`config.reward_shaping`, `rlhf_jax.rewards.transforms`): transforms of
  the rewards [N, K] before they are weighted; one declaring "ref_rewards" makes the step
  also sample G completions per prompt from the reference policy and score them.
  With `lora` (an `adapters.LoraSpec`; state.params = `adapters.init_adapters(...)`,
  state.ref_params = the base weights) only the adapters train; the sampler decodes from
  the policy with its adapters attached (`adapters.policy`) and the base is the reference
  (`rlhf_jax.train.adapters`).
  """
  g = settings.group_size
  if getattr(sampling_config, "num_samples", g) != g:
    raise ValueError(f"sampling.num_samples={sampling_config.num_samples} differs from "
                     f"rl.group_size={g}; set them equal")
  if not reward_fns:
    raise ValueError("make_update needs at least one reward function")
  vocab_limit = getattr(sampling_config, "vocab_limit", None)  # the trainer's = the sampler's
  pref, estimator = None, None
  if settings.objective == "preference":  # the pairs phase replaces the estimate phase
    if value_model is not None:
      raise ValueError("rl.objective='preference' trains no value model: remove config.value")
    pref = preference_step.PreferencePhase.build(settings, vocab_limit=vocab_limit)
    if pref.reference_answer and not getattr(sampling_config, "eos_ids", ()):
      raise ValueError(f"rl.preference_loss={settings.preference_loss!r} scores the reference "
                       "answers as completions ending with EOS: set sampling eos_ids")
  else:
    estimator = phases.Estimator.build(
        settings.advantage, dict(settings.advantage_kwargs), group_size=g,
        provides=step_inputs(value_model is not None) + (() if env is None
                                                         else multiturn.TURN_INPUTS))
  needs = () if estimator is None else estimator.needs
  if env is not None and "greedy_rewards" in needs:
    raise ValueError(f"rl.advantage={settings.advantage!r} needs a greedy single-turn decode, "
                     "which a multi-turn environment does not have; choose another estimator")
  weights = reward_weights or settings.reward_weights or None
  shaping = as_shaping(reward_shaping)
  score_rollout = phases.make_score(reward_fns, weights, settings.reward_constraints(),
                                    len(settings.constraint_thresholds), shaping, g)
  if pref is not None and (pref.reference_answer or pref.opponent) and shaping.needs:
    what = "the prompts' reference answers" if pref.reference_answer else "one opponent per sample"
    raise ValueError(f"rl.preference_loss={settings.preference_loss!r} also scores {what}, "
                     f"which config.reward_shaping's {sorted(shaping.needs)} (reference samples, "
                     "groups or model passes of the sampled rows) do not apply to; remove those "
                     "transforms or choose another preference loss")
  if "ref_rewards" in shaping.needs and env is not None:
    raise ValueError("config.reward_shaping: lsc / par score reference-policy samples, which "
                     "the multi-turn rollout does not draw; remove them with config.env")
  model_inputs = shaping_inputs.Needs.build(shaping, env=env, pref=pref,
                                            sampling_config=sampling_config)
  greedy_config = (dataclasses.replace(sampling_config, temperature=0.0, top_k=None, top_p=None,
                                       num_samples=1)
                   if "greedy_rewards" in needs else None)
  rounds = settings.adaptive_rounds
  if rounds > 1 and (env is not None or shaping.needs):
    raise ValueError("rl.adaptive_sampling (Reinforce-Ada) draws rounds of samples from the "
                     "single-turn sampler and groups them itself; it does not combine with "
                     "config.env or reward_shaping transforms that read groups, reference "
                     "samples or model passes: remove one")
  knap = dict(settings.knapsack)
  if knap and (env is not None or shaping.needs):
    raise ValueError("rl.knapsack draws ragged groups from the single-turn sampler; it does not "
                     "combine with config.env or reward_shaping transforms that read groups, "
                     "reference samples or model passes: remove one")
  pool_config = (sampling_config if rounds == 1 else
                 dataclasses.replace(sampling_config, num_samples=g * rounds))
  if greedy_config is not None and shaping.steps:
    raise ValueError(f"rl.advantage={settings.advantage!r} scores one greedy decode per prompt, "
                     "which config.reward_shaping's transforms do not apply to; remove "
                     "config.reward_shaping or choose another estimator")
  objective = (learn_lib.make_objective(model, settings, value_model, vocab_limit=vocab_limit)
               if pref is None else pref.make_objective(model))
  bookkeep = make_bookkeep(settings)
  old_vocab_mean = pref is None and learn_lib.old_vocab_mean_needed(settings)

  def rollout(params, prompt_batch, rng):
    """The rollout phase: single-turn sampling, or multi-turn with the environment."""
    if env is None:
      return phases.rollout(model, params, prompt_batch, rng, sampling_config), None
    episodes = lambda p, b, r: multiturn.rollout_multiturn(  # noqa: E731
        model, p, b, r, sampling_config, env, env_spec)
    if getattr(env, "host_callbacks", False):  # a host environment: seeds run one by one
      episodes = multiturn.in_sequence_under_vmap(episodes)
    return episodes(params, prompt_batch, rng)

  def reference_rewards(state, prompt_batch, rng):
    """The rewards [N, G, K] of G reference-policy samples of each row's prompt."""
    if "ref_rewards" not in shaping.needs:
      return None
    ref_ro = phases.rollout(model, state.ref_params, prompt_batch, jax.random.fold_in(rng, 1),
                            sampling_config)
    each = phases.score_each(reward_fns, ref_ro.prompt_ids, ref_ro.completion_ids,
                             ref_ro.completion_mask,
                             dict(phases.repeat_extras(prompt_batch, g),
                                  prompt_mask=ref_ro.prompt_mask))
    return jnp.repeat(each.reshape(-1, g, each.shape[1]), g, axis=0)

  def sample_and_score(params, state, prompt_batch, rng):
    """rollout -> score (Reinforce-Ada's and dynamic sampling's selections; ReMax's greedy
    baseline; Nash-MD's opponents; GRAO's and IGPO's answers)."""
    reward_state = state.reward_state
    extra = {}
    if knap:  # Knapsack RL: the B·G samples split among the prompts, one row per sample
      alloc = knapsack_lib.allocate(state.alloc_state, prompt_batch, group_size=g,
                                    min_samples=knap.get("min_samples", 2),
                                    max_samples=knap.get("max_samples", 0))
      rows = knapsack_lib.gather(prompt_batch, alloc.rows)
      ro, info = phases.rollout(model, params, rows, rng,
                                dataclasses.replace(sampling_config, num_samples=1)), None
      sc = score_rollout(ro, phases.repeat_extras(rows, 1), reward_state, state.shaping_state)
      extra["knapsack"] = alloc
    elif rounds > 1:  # Reinforce-Ada: R rounds of G samples per prompt, drawn at once
      ro, info = phases.rollout(model, params, prompt_batch, rng, pool_config), None
      pool = score_rollout(ro, phases.repeat_extras(prompt_batch, g * rounds), reward_state,
                           state.shaping_state)
      ro, sc, extra["adaptive"] = phases.select_adaptive(
          ro, pool, group_size=g, rounds=rounds,
          **{k: v for k, v in settings.adaptive_sampling if k != "rounds"})
    else:
      ro, info = rollout(params, prompt_batch, rng)
      extras = phases.repeat_extras(prompt_batch, g)
      sc = score_rollout(ro, extras if info is None else multiturn.with_env_reward(extras, info),
                         reward_state, state.shaping_state,
                         reference_rewards(state, prompt_batch, rng),
                         model_inputs(model, params, ro, prompt_batch, g, vocab_limit))
    if greedy_config is not None:  # ReMax's baseline: the reward of a greedy decode per prompt
      gro = phases.rollout(model, params, prompt_batch, rng, greedy_config)
      extra["greedy"] = jax.lax.stop_gradient(
          score_rollout(gro, phases.repeat_extras(prompt_batch, 1), reward_state).rewards)
    if pref is not None and pref.opponent:  # Nash-MD: one mixture-policy opponent per sample
      opp = sampling_lib.sample_mixture(model, params, state.ref_params, prompt_batch["prompt_ids"],
                                        prompt_batch["prompt_mask"], jax.random.fold_in(rng, 2),
                                        sampling_config, beta=pref.mixture_beta)
      extra["opponent"] = score_rollout(phases.from_samples(opp), extras, reward_state,
                                        state.shaping_state).rewards
    if pref is not None and pref.reference_answer:  # GRAO: the prompts' reference answers
      ids, mask = phases.reference_answers(
          prompt_batch, sampling_config.eos_ids[0],
          "rl.preference_loss reads the prompts' reference answers (GRAO)")
      ans_ro = phases.Rollout(prompt_ids=prompt_batch["prompt_ids"],
                              prompt_mask=prompt_batch["prompt_mask"], completion_ids=ids,
                              completion_mask=mask.astype(bool), loss_mask=mask,
                              logps=jnp.zeros(mask.shape), lengths=jnp.sum(mask, 1),
                              finished=jnp.ones(mask.shape[:1], bool))
      extra["answers"] = {"ids": ids, "mask": mask, "rewards": jax.lax.stop_gradient(
          score_rollout(ans_ro, phases.repeat_extras(prompt_batch, 1), reward_state,
                        state.shaping_state).rewards)}
    if "answer_probs" in needs:  # IGPO: P(ground-truth answer) after each turn
      ids, mask = phases.batch_answers(
          prompt_batch, "rl.advantage='igpo' scores the ground-truth answer after each turn")
      extra["answer_probs"] = multiturn.answer_probs(model, params, ro, info, ids, mask,
                                                     group_size=g, vocab_limit=vocab_limit)
    if settings.oversample > 1:  # dynamic sampling: learn on informative groups only
      ro, sc, info, chosen, extra["selected"] = phases.select_groups(
          ro, sc, info, group_size=g, keep=ro.prompt_ids.shape[0] // g // settings.oversample)
      for key in ("greedy", "answers", "answer_probs"):
        if key in extra:
          extra[key] = jax.tree.map(lambda x: x[chosen], extra[key])  # noqa: B023
    return ro, info, sc, extra

  def estimate_or_pair(state: RLState, ro, info, sc, sig, extra, rng, policy):
    """The estimate phase (advantages), or the pairs phase of the preference objective
    (`policy`: the sampling policy's parameters): returns (learn data, adv_state, metrics)."""
    if pref is not None:
      data, more = pref.data(model, ro, sc, sig, state.iterate_params,
                             jax.random.fold_in(rng, 2**31 - 1), extra.get("opponent"),
                             extra.get("answers"), policy_params=policy)
      return data, state.adv_state, more
    adaptive = extra.get("adaptive")
    adv, adv_state = (phases.estimate(estimator, sc, ro, sig, state.adv_state, extra.get("greedy"),
                                      prompt_means=None if adaptive is None
                                      else adaptive.prompt_means,
                                      group_ids=extra["knapsack"].rows if knap else None)
                      if info is None else
                      multiturn.estimate(estimator, sc, ro, sig, state.adv_state, info,
                                         answer_probs=extra.get("answer_probs")))
    return learn_data(ro, sig, adv), adv_state, {}

  def update(state: RLState, prompt_batch: Dict[str, jax.Array], rng: jax.Array):
    rng_sample, rng_perm = jax.random.split(jax.random.fold_in(rng, state.step))
    settings.check_batch(prompt_batch["prompt_ids"].shape[0] // settings.oversample)
    policy = state.params if lora is None else adapters_lib.policy(lora, state.ref_params,
                                                                    state.params)
    ro, info, sc, extra = sample_and_score(policy, state, prompt_batch, rng_sample)
    if settings.sample_filter:  # PF-PPO: train on the kept samples of each group only
      ro, extra["kept"] = phases.filter_samples(ro, sc, jax.random.fold_in(rng_sample, 3),
                                                group_size=g, **dict(settings.sample_filter))
    beta = state.kl_state.beta
    sig = phases.signals(model, state.ref_params, ro, sc.rewards, beta,
                         group_size=1 if knap else g,
                         kl_in_reward=settings.kl_in_reward, value_model=value_model,
                         value_params=state.value_params, vocab_limit=vocab_limit,
                         policy_params=policy if old_vocab_mean else None,
                         influence_params=policy if "lm_head_influence" in needs else None,
                         ref_logits=settings.value_based)
    data, adv_state, more = estimate_or_pair(state, ro, info, sc, sig, extra, rng_perm, policy)
    carry = learn_lib.Trainable(state.params, state.value_params, state.opt_state,
                                state.value_opt_state, guards.is_finite_tree(sc.rewards))
    obj = (objective if lora is None else
           adapters_lib.wrap_objective(lora, objective, state.ref_params))
    trained, aux = learn_lib.learn(obj, settings, optimizer, value_optimizer, carry, data,
                                   ro.prompt_len, beta, rng_perm,
                                   normalizer=None if pref is None else pref.normalizer)
    metrics = dict(step_metrics(ro, sc, sig, aux, g,
                                group_ids=extra["knapsack"].rows if knap else None),
                   **variant_metrics(info, extra), **more)
    if knap:  # the success rates the records' next allocation reads
      state = state.replace(alloc_state=knapsack_lib.update(
          state.alloc_state, prompt_batch, sc.rewards, extra["knapsack"].rows,
          threshold=knap.get("threshold", 0.5)))
    return bookkeep(state, trained, sc, adv_state, metrics)

  if not jit:
    return update
  return jax.jit(update, donate_argnums=(0,) if donate else (), out_shardings=out_shardings)


def step_inputs(has_value_model: bool) -> tuple:
  """The estimator inputs the single-turn step provides (`phases.STEP_INPUTS`)."""
  return tuple(n for n in phases.STEP_INPUTS if n != "values" or has_value_model)
