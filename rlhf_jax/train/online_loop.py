"""The online RL loop: optional SFT warm-up, then fused RL steps on a prompt task.

`train(config) -> summary` builds everything from the config, runs, evaluates
held-out accuracy with greedy decoding before and after RL, and writes
metrics (JSONL, TensorBoard) and a PNG of the reward curve into
`config.workdir`. The per-step work is the single jitted `online.make_update`, run by
the library loop `rlhf_jax.train.loop.run_steps`; prompts, rewards and the evaluator come
from `rlhf_jax.train.online_setup`.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Dict, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import config_utils
from rlhf_jax import data as data_lib
from rlhf_jax import models as models_lib
from rlhf_jax import sharding as sharding_lib
from rlhf_jax.data import prompt_data
from rlhf_jax.rewards import transforms
from rlhf_jax.sampling.config import SamplingConfig
from rlhf_jax.train import adapters as adapters_lib
from rlhf_jax.train import build, config_schema, loop, multiturn, online, online_env, online_setup
from rlhf_jax.train import optim, phases
from rlhf_jax.train import seeds as seeds_lib
from rlhf_jax.train.metrics_io import MetricsWriter
from rlhf_jax.train.online_setup import sft_warmup  # noqa: F401  (re-exported)
from rlhf_jax.train.placement import mesh_of, placement
from rlhf_jax.train.rl_config import RLSettings
from rlhf_jax.train.runner import Runner


def prompt_iterator(tokenizer, examples: Sequence[dict], *, batch_size: int, prompt_length: int,
                    answer_length: int, seed: int) -> data_lib.DataIterator:
  """Resumable, shuffled batches of RL prompts with their answer ids."""
  return prompt_data.prompt_batches(list(examples), tokenizer, batch_size=batch_size,
                                    prompt_length=prompt_length, seed=seed,
                                    answer_length=answer_length)


def value_setup(config, model, params, rng):
  """(value_model, value_params, value_optimizer) from `config.value`, or (None,) * 3.

  The value model is the policy's decoder with a per-token scalar head (`head="value"`),
  initialised from the policy's weights (`params`) and a fresh head; it trains with
  `config.value.optim` (default: `config.optim`).
  """
  vcfg = config.get("value")
  if not vcfg:
    return None, None, None
  value_model = model.with_head("value")
  value_params = jax.tree.map(jnp.copy, {k: v for k, v in models_lib.stack_layers(params).items()
                                         if k != "lm_head"})
  value_params["score"] = value_model.init_score(jax.random.fold_in(rng, 2))
  return value_model, value_params, optim.make_optimizer(vcfg.get("optim") or config.optim)


class _Built(NamedTuple):
  tok: Any
  model: Any
  params: Any
  settings: RLSettings
  task: online_setup.PromptTask
  evaluate: Any
  sampling_cfg: SamplingConfig
  env: Any = None
  env_spec: Any = None


# From this depth on, the layers are stacked and scanned by default (`layer_layout`): at 30
# layers (SmolLM2-135M's shape) that compiles the GRPO step in 6.5 s instead of 27-31 s, at
# the same step time on a quiet 2-core host; at 4-6 layers per-layer weights are faster.
SCAN_FROM_LAYERS = 16


def layer_layout(config, model) -> tuple[bool, bool]:
  """(model.unroll_layers, sampling.scan_layers): the config's values where set; otherwise
  per-layer weights below `SCAN_FROM_LAYERS` layers and stacked, scanned layers (training
  passes and decode, single- or multi-turn) from there on."""
  deep = int(model.config.num_layers) >= SCAN_FROM_LAYERS
  unroll = config_utils.get_key(config, "model.unroll_layers", None)
  scan = config.sampling.get("scan_layers")
  return (not deep if unroll is None else bool(unroll),
          deep if scan is None else scan)


def _build(config) -> _Built:
  """The model, settings, prompts and evaluator of one run (one seed), built and checked
  before anything is written."""
  tok = build.build_tokenizer(config)
  model, params = build.build_model(config.model, tok)
  settings = RLSettings.from_config(config.rl).with_prompt_ids(tok)
  settings.check_batch(int(config.train.prompts_per_step))
  if "values" in settings.estimator_inputs() and not config.get("value"):
    raise ValueError(f"rl.advantage={settings.advantage!r} needs a value model: add "
                     "config.value = dict(optim=dict(learning_rate=...)) (or optim=None to "
                     "reuse config.optim)")
  task = online_setup.build_prompt_task(config, tok)
  build.check_online(config, model, settings, task.train)
  plen, alen = int(config.data.max_prompt_length), int(config.sampling.max_new_tokens)
  vocab_limit = build.vocab_limit(model, tok)  # a padded model vocabulary: sample real ids only
  env, env_spec = online_env.build_env(config, tok)
  if env is None:
    evaluate = online_setup.make_evaluator(model, tok, task.eval, task.score, prompt_length=plen,
                                           max_new_tokens=alen, vocab_limit=vocab_limit)
  else:  # held-out accuracy: the environment's reward of greedy episodes
    evaluate = online_env.make_env_evaluator(model, tok, task.eval, env, env_spec,
                                             prompt_length=plen, vocab_limit=vocab_limit)
  sampling_cfg = SamplingConfig(
      max_new_tokens=alen, temperature=float(config.sampling.temperature),
      top_k=config.sampling.get("top_k"), top_p=config.sampling.get("top_p"),
      eos_ids=(tok.eos_id,), pad_id=tok.pad_id, num_samples=settings.group_size,
      vocab_limit=vocab_limit, compact_stages=config.sampling.get("compact_stages", 0),
      scan_layers=layer_layout(config, model)[1])
  if env is not None and sampling_cfg.compact_stages:
    raise ValueError(f"config key 'sampling.compact_stages'={sampling_cfg.compact_stages} "
                     "applies to the single-turn sampler; a multi-turn rollout (config.env) "
                     "decodes at a fixed batch: unset it")
  if env is not None:
    online_env.check_env(config, tok, model, params, env, env_spec, task.train, sampling_cfg)
  _check_estimator_inputs(config, settings, env, task.train)
  return _Built(tok, model, params, settings, task, evaluate, sampling_cfg, env, env_spec)


def _check_estimator_inputs(config, settings: RLSettings, env, records) -> None:
  """The estimator's declared inputs are ones this step provides (a multi-turn one for
  turn-level estimators), and IGPO's records carry answers: a named error before anything
  is written."""
  if settings.objective == "preference":
    return
  phases.Estimator.build(
      settings.advantage, dict(settings.advantage_kwargs), group_size=settings.group_size,
      provides=online.step_inputs(bool(config.get("value"))) + (
          () if env is None else multiturn.TURN_INPUTS))
  if "answer_probs" in settings.estimator_inputs():
    missing = [i for i, r in enumerate(records) if r.get("answer") in (None, "")]
    if missing:
      raise ValueError(f"rl.advantage={settings.advantage!r} scores each record's ground-truth "
                       f"answer after every turn, but {len(missing)} training records (first: "
                       f"#{missing[0]}) have no 'answer' field; add answers or choose another "
                       "estimator")


def _rewards_and_batches(config, runs: Sequence[_Built]):
  """Rewards over every run's records, and the (stacked, for several seeds) batches."""
  # Dynamic sampling samples `oversample` times more prompts than it learns on.
  tok = runs[0].tok
  nprompts = int(config.train.prompts_per_step) * runs[0].settings.oversample
  table, offsets = seeds_lib.concat_records([r.task.train for r in runs])
  rewards = online_setup.build_rewards(config, tok, table)
  weights = online_setup.reward_weights(rewards, runs[0].settings.reward_weights)
  shaping_needs = transforms.Shaping.from_config(config.get("reward_shaping")).needs
  its = [online_setup.prompt_batches(seeds_lib.seed_config(config, i) if len(runs) > 1 else config,
                                     tok, r.task.train, rewards, batch_size=nprompts,
                                     answers=("answer_probs" in r.settings.estimator_inputs()
                                              or "answer_logps" in shaping_needs))
         for i, r in enumerate(runs)]
  online_setup.probe_host_rewards(config, tok, table, rewards)
  batches = its[0] if len(runs) == 1 else seeds_lib.StackedBatches(its, offsets)
  return rewards, weights, batches


def _named_rewards(metrics, rewards) -> None:
  """Adds `reward/<name>_mean|std` next to the positional `reward_<i>_mean|std`."""
  for i, r in enumerate(rewards):
    for stat in ("mean", "std"):
      if f"reward_{i}_{stat}" in metrics:
        metrics[f"reward/{r.name}_{stat}"] = metrics[f"reward_{i}_{stat}"]


class Setup(NamedTuple):
  """Everything `train` builds from the config before anything is written."""
  cfgs: Sequence[Any]
  runs: Sequence[_Built]
  rewards: Sequence[Any]
  weights: Any
  batches: Any
  optimizer: Any
  rngs: Sequence[jax.Array]
  lora: Any = None   # adapters.LoraSpec with config.lora


  def init_states(self, config, all_params):
    """(value_model, value_optimizer, state): one state per seed (stacked for several)."""
    model, settings = self.runs[0].model, self.runs[0].settings
    unroll_layers = layer_layout(config, model)[0]
    states = []
    for p, rng in zip(all_params, self.rngs):
      value_model, value_params, value_opt = value_setup(config, model, p, rng)
      # LoRA: the adapters train; the base weights are the (fixed) reference.
      policy, ref = ((p, None) if self.lora is None else
                     (adapters_lib.init_adapters(self.lora, model, p), p))
      states.append(online.init_state(
          policy, self.optimizer, jax.random.fold_in(rng, 1), settings, ref_params=ref,
          value_params=value_params, value_optimizer=value_opt, unroll_layers=unroll_layers,
          reward_shaping=config.get("reward_shaping"), num_rewards=len(self.rewards),
          # every seed's records (record_index is offset per seed): Knapsack RL's table
          num_records=sum(len(r.task.train) for r in self.runs)))
    return value_model, value_opt, (states[0] if len(states) == 1 else seeds_lib.stack(states))

  def make_update(self, config, value_model, value_opt, out_shardings=None):
    """The fused step of this config (vmapped over seeds when there are several)."""
    first = self.runs[0]
    update = online.make_update(first.model, [r.fn for r in self.rewards], self.optimizer,
                                first.settings, first.sampling_cfg, reward_weights=self.weights,
                                value_model=value_model, value_optimizer=value_opt,
                                env=first.env, env_spec=first.env_spec,
                                out_shardings=out_shardings, jit=len(self.runs) == 1,
                                reward_shaping=config.get("reward_shaping"), lora=self.lora)
    return update if len(self.runs) == 1 else seeds_lib.vmapped(update,
                                                                 out_shardings=out_shardings)


def setup(config) -> Setup:
  """Checks and builds the config's runs, rewards, prompt batches and optimiser."""
  config_schema.check(config, "online")
  n = seeds_lib.num_seeds(config)
  cfgs = [seeds_lib.seed_config(config, i) for i in range(n)] if n > 1 else [config]
  runs = [_build(c) for c in cfgs]
  lora = adapters_lib.from_config(config, runs[0].model, runs[0].settings)  # None without
  rewards, weights, batches = _rewards_and_batches(config, runs)
  return Setup(cfgs, runs, rewards, weights, batches, optim.make_optimizer(config.optim),
               [jax.random.PRNGKey(int(c.seed)) for c in cfgs], lora)


def build_update(config):
  """`(update, state, batches)` of one seed's run of `config`, without the SFT warm-up,
  evaluation or a mesh: the step `train` runs, for tests and notebooks."""
  built = setup(config)
  value_model, value_opt, state = built.init_states(config, [r.params for r in built.runs])
  return built.make_update(config, value_model, value_opt), state, built.batches


def train(config) -> Dict[str, Any]:
  """Runs the configured online experiment; returns a summary dict.

  With `config.seeds = N > 1`, N runs (seeds config.seed + i) step together in one
  `vmap`ped program (`rlhf_jax.train.seeds`); accuracies are then per-seed lists. Every
  config, data and reward error is raised before anything is written to `config.workdir`.
  """
  config_schema.check(config, "online")
  n = seeds_lib.num_seeds(config)
  sharding_lib.init_distributed(config.get("distributed"))
  t_start = time.time()
  built = setup(config)
  cfgs, runs, rewards, batches, rngs = built.cfgs, built.runs, built.rewards, built.batches, built.rngs
  model, lora = runs[0].model, built.lora
  steps = int(config.train.steps)
  init_states = lambda all_params: built.init_states(config, all_params)  # noqa: E731
  value_model, value_opt, state = init_states([r.params for r in runs])
  for msg in dict.fromkeys(r.task.message for r in runs):
    online_setup.log_once(msg)
  os.makedirs(config.workdir, exist_ok=True)
  writer = MetricsWriter(config.workdir, total_steps=steps, desc="rl",
                         progress=config.get("progress", True))
  summary: Dict[str, Any] = {"dropped_prompts": runs[0].task.message} if runs[0].task.message else {}
  seed_of = lambda i: None if n == 1 else i  # noqa: E731

  def params_of(st, i):  # the policy's parameters of seed i (adapters merged with LoRA)
    one = lambda tree: tree if n == 1 else seeds_lib.unstack(tree, i)  # noqa: E731
    return (one(st.params) if lora is None else
            adapters_lib.merged(lora, one(st.ref_params), one(st.params)))

  def evaluate_all(st, step):
    accs = [r.evaluate(params_of(st, i)) for i, r in enumerate(runs)]
    for i, a in enumerate(accs):
      writer.write(step, {"accuracy": a}, prefix="eval/", seed=seed_of(i))
    return accs[0] if n == 1 else accs
  run = Runner(config, state, batches)
  if run.start_step == 0:
    if config.get("sft") and int(config.sft.steps) > 0:
      t0 = time.time()
      tuned = [online_setup.sft_warmup(c, model, r.params, r.tok, r.task.train, writer=writer)
               for c, r in zip(cfgs, runs)]
      summary["sft_seconds"] = time.time() - t0
      _, _, state = init_states(tuned)
    summary["accuracy_before"] = evaluate_all(state, 0)
    logging.info("held-out accuracy before RL: %s", summary["accuracy_before"])
  else:
    state = run.state
    summary["resumed_from"] = run.start_step
  put_state, put_batch, out_shardings = (
      seeds_lib.mesh_placement(mesh_of(config), state) if n > 1 and config.get("mesh")
      else placement(config, model, state))
  state = put_state(state)
  update = built.make_update(config, value_model, value_opt, out_shardings)
  rng = rngs[0] if n == 1 else jnp.stack(rngs)
  eval_every = int(config.train.get("eval_every", 0) or 0)
  step_times = []

  def on_step(step, state, metrics, seconds) -> bool:
    if step == run.start_step + 1:
      summary["first_step_seconds"] = seconds
    else:
      step_times.append(seconds)
    rows = [metrics] if n == 1 else seeds_lib.per_seed(metrics, n)
    for i, row in enumerate(rows):
      row["tokens_per_second"] = row["num_tokens"] / seconds
      _named_rewards(row, rewards)
      writer.write(step, row, seed=seed_of(i))
    if eval_every and step % eval_every == 0 and step < steps:
      evaluate_all(state, step)
    worst = max(rows, key=lambda r: r["bad_steps_in_a_row"])
    return run.after_step(step, state, worst)

  state, done = loop.run_steps(update, state, batches, rng, start=run.start_step, stop=steps,
                               put_batch=put_batch, on_step=on_step)
  if run.stopped_by_signal:
    writer.close()
    return dict(summary, stopped_at=done, state=state)
  summary["accuracy_after"] = evaluate_all(state, steps)
  if config.get("export_hf"):
    summary["hf_model"] = build.export_hf(config, model, params_of(state, 0))
  if lora is not None:
    first = lambda tree: tree if n == 1 else seeds_lib.unstack(tree, 0)  # noqa: E731
    summary.update(adapters_lib.export(lora, config, model, first(state.params),
                                       first(state.ref_params)))
  summary["steady_step_seconds"] = float(np.median(step_times)) if step_times else None
  curves = ["reward_mean", "eval/accuracy", "kl", "response_length"]
  if len(rewards) > 1:
    curves += [f"reward/{r.name}_mean" for r in rewards]
  summary["plot"] = writer.plot(curves, name="reward_curve")
  run.finish(steps, state)
  summary["total_seconds"] = time.time() - t_start
  summary["state"] = state
  writer.close()
  return summary
