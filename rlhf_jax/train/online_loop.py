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
from typing import Any, Dict, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import config_utils
from rlhf_jax import data as data_lib
from rlhf_jax import models as models_lib
from rlhf_jax import sharding as sharding_lib
from rlhf_jax.data import prompt_data
from rlhf_jax.sampling.config import SamplingConfig
from rlhf_jax.train import build, config_schema, loop, online, online_setup, optim
from rlhf_jax.train.metrics_io import MetricsWriter
from rlhf_jax.train.online_setup import sft_warmup  # noqa: F401  (re-exported)
from rlhf_jax.train.placement import placement
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


def _build(config):
  """Everything the run needs, built and checked before anything is written."""
  tok = build.build_tokenizer(config)
  model, params = build.build_model(config.model, tok)
  settings = RLSettings.from_config(config.rl)
  nprompts = int(config.train.prompts_per_step)
  settings.check_batch(nprompts)
  if "values" in settings.estimator_inputs() and not config.get("value"):
    raise ValueError(f"rl.advantage={settings.advantage!r} needs a value model: add "
                     "config.value = dict(optim=dict(learning_rate=...)) (or optim=None to "
                     "reuse config.optim)")
  task = online_setup.build_prompt_task(config, tok)
  build.check_online(config, model, settings, task.train)
  rewards = online_setup.build_rewards(config, tok, task.train)
  weights = online_setup.reward_weights(rewards, settings.reward_weights)
  batches = online_setup.prompt_batches(config, tok, task.train, rewards, batch_size=nprompts)
  online_setup.probe_host_rewards(config, tok, task.train, rewards)
  plen, alen = int(config.data.max_prompt_length), int(config.sampling.max_new_tokens)
  vocab_limit = build.vocab_limit(model, tok)  # a padded model vocabulary: sample real ids only
  evaluate = online_setup.make_evaluator(model, tok, task.eval, task.score, prompt_length=plen,
                                         max_new_tokens=alen, vocab_limit=vocab_limit)
  sampling_cfg = SamplingConfig(
      max_new_tokens=alen, temperature=float(config.sampling.temperature),
      top_k=config.sampling.get("top_k"), top_p=config.sampling.get("top_p"),
      eos_ids=(tok.eos_id,), pad_id=tok.pad_id, num_samples=settings.group_size,
      vocab_limit=vocab_limit)
  return tok, model, params, settings, task, rewards, weights, batches, evaluate, sampling_cfg


def _named_rewards(metrics, rewards) -> None:
  """Adds `reward/<name>_mean|std` next to the positional `reward_<i>_mean|std`."""
  for i, r in enumerate(rewards):
    for stat in ("mean", "std"):
      if f"reward_{i}_{stat}" in metrics:
        metrics[f"reward/{r.name}_{stat}"] = metrics[f"reward_{i}_{stat}"]


def train(config) -> Dict[str, Any]:
  """Runs the configured online experiment; returns a summary dict.

  Every config, data and reward error is raised before anything is written to
  `config.workdir`.
  """
  config_schema.check(config, "online")
  sharding_lib.init_distributed(config.get("distributed"))
  t_start = time.time()
  (tok, model, params, settings, task, rewards, weights, batches, evaluate,
   sampling_cfg) = _build(config)
  steps = int(config.train.steps)
  optimizer = optim.make_optimizer(config.optim)
  rng = jax.random.PRNGKey(int(config.seed))
  unroll_layers = config_utils.get_key(config, "model.unroll_layers", True)

  def init_state(params):
    value_model, value_params, value_opt = value_setup(config, model, params, rng)
    return value_model, value_opt, online.init_state(
        params, optimizer, jax.random.fold_in(rng, 1), settings, value_params=value_params,
        value_optimizer=value_opt, unroll_layers=unroll_layers)
  value_model, value_opt, state = init_state(params)
  online_setup.log_once(task.message)
  os.makedirs(config.workdir, exist_ok=True)
  writer = MetricsWriter(config.workdir, total_steps=steps, desc="rl",
                         progress=config.get("progress", True))
  summary: Dict[str, Any] = {"dropped_prompts": task.message} if task.message else {}
  run = Runner(config, state, batches)
  if run.start_step == 0:
    if config.get("sft") and int(config.sft.steps) > 0:
      t0 = time.time()
      params = online_setup.sft_warmup(config, model, params, tok, task.train, writer=writer)
      summary["sft_seconds"] = time.time() - t0
      _, _, state = init_state(params)
    summary["accuracy_before"] = evaluate(state.params)
    writer.write(0, {"accuracy": summary["accuracy_before"]}, prefix="eval/")
    logging.info("held-out accuracy before RL: %.3f", summary["accuracy_before"])
  else:
    state = run.state
    summary["resumed_from"] = run.start_step
  put_state, put_batch, out_shardings = placement(config, model, state)
  state = put_state(state)
  update = online.make_update(model, [r.fn for r in rewards], optimizer, settings, sampling_cfg,
                              reward_weights=weights, value_model=value_model,
                              value_optimizer=value_opt, out_shardings=out_shardings)
  eval_every = int(config.train.get("eval_every", 0) or 0)
  step_times = []

  def on_step(step, state, metrics, seconds) -> bool:
    if step == run.start_step + 1:
      summary["first_step_seconds"] = seconds
    else:
      step_times.append(seconds)
    metrics["tokens_per_second"] = metrics["num_tokens"] / seconds
    _named_rewards(metrics, rewards)
    writer.write(step, metrics)
    if eval_every and step % eval_every == 0 and step < steps:
      writer.write(step, {"accuracy": evaluate(state.params)}, prefix="eval/")
    return run.after_step(step, state, metrics)

  state, done = loop.run_steps(update, state, batches, rng, start=run.start_step, stop=steps,
                               put_batch=put_batch, on_step=on_step)
  if run.stopped_by_signal:
    writer.close()
    return dict(summary, stopped_at=done, state=state)
  summary["accuracy_after"] = evaluate(state.params)
  writer.write(steps, {"accuracy": summary["accuracy_after"]}, prefix="eval/")
  if config.get("export_hf"):
    summary["hf_model"] = build.export_hf(config, model, state.params)
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
