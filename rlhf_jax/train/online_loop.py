"""The online RL loop: optional SFT warm-up, then fused RL steps on a prompt task.

`train(config) -> summary` builds everything from the config, runs, evaluates
held-out accuracy with greedy decoding before and after RL, and writes
metrics (JSONL, TensorBoard) and a PNG of the reward curve into
`config.workdir`. The per-step work is the single jitted `online.make_update`.
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
from rlhf_jax import sampling as sampling_lib
from rlhf_jax import sharding as sharding_lib
from rlhf_jax.train.placement import fetch as _fetch, host_arrays, placement
from rlhf_jax.sampling.config import SamplingConfig
from rlhf_jax.train import config_schema
from rlhf_jax.train import build, offline, online, optim
from rlhf_jax.train.metrics_io import MetricsWriter
from rlhf_jax.train.rl_config import RLSettings
from rlhf_jax.train.runner import Runner


def prompt_iterator(tokenizer, examples: Sequence[dict], *, batch_size: int, prompt_length: int,
                    answer_length: int, seed: int) -> data_lib.DataIterator:
  """Resumable, shuffled batches of RL prompts with their answer ids."""
  collate = lambda exs: build.prompt_batch(tokenizer, exs, prompt_length=prompt_length,  # noqa: E731
                                           answer_length=answer_length)
  return data_lib.DataIterator(list(examples), example_fn=lambda rec, i: rec,
                               make_batcher=lambda: data_lib.Batcher(batch_size, collate),
                               seed=seed)


def make_evaluator(model, tokenizer, task, examples: Sequence[dict], *, prompt_length: int,
                   max_new_tokens: int, batch_size: int = 256):
  """Returns `accuracy(params) -> float`: greedy decoding scored by the task's verifier."""
  cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0,
                       eos_ids=(tokenizer.eos_id,), pad_id=tokenizer.pad_id, num_samples=1)
  sample = jax.jit(lambda p, ids, m: sampling_lib.sample(model, p, ids, m, jax.random.PRNGKey(0),
                                                         cfg))
  prompts = [e["prompt"] for e in examples]
  chunks = []
  for i in range(0, len(prompts), batch_size):
    part = prompts[i:i + batch_size]
    part = part + [part[-1]] * (batch_size - len(part)) if len(prompts) > batch_size else part
    chunks.append((i, build.encode_prompts(tokenizer, part, length=prompt_length)))

  def accuracy(params) -> float:
    scores = []
    for start, (ids, mask) in chunks:
      out = _fetch(sample(params, ids, mask))
      for j in range(min(len(ids), len(prompts) - start)):
        n = int(out.lengths[j])
        text = tokenizer.decode([int(t) for t in out.completion_ids[j, :n]])
        scores.append(task.score(prompts[start + j], text))
    return float(np.mean(scores))
  return accuracy


def sft_warmup(config, model, params, tokenizer, examples, *, writer: MetricsWriter):
  """A short supervised warm-up on the task's reference completions."""
  sft = config.sft
  opt = optim.make_optimizer(sft.optim)
  step = offline.make_step("sft", model, None, opt)
  state = offline.init_state(params, opt)
  it = data_lib.sft_batches(list(examples), tokenizer, batch_size=sft.batch_size,
                            max_length=config.data.max_prompt_length +
                            config.sampling.max_new_tokens, seed=config.seed)
  for i in range(sft.steps):
    batch = next(it)
    state, m = step(state, {k: jnp.asarray(v) for k, v in host_arrays(batch).items()})
    if (i + 1) % max(1, sft.steps // 10) == 0:
      writer.write(i + 1, {"loss": m["loss"]}, prefix="sft/")
  return state.params


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


def train(config) -> Dict[str, Any]:
  """Runs the configured online experiment; returns a summary dict."""
  config_schema.check(config, "online")
  sharding_lib.init_distributed(config.get("distributed"))
  t_start = time.time()
  workdir = config.workdir
  os.makedirs(workdir, exist_ok=True)
  tok = build.build_tokenizer(config)
  task = build.build_task(config.task)
  model, params = build.build_model(config.model, tok)
  settings = RLSettings.from_config(config.rl)
  steps, nprompts = int(config.train.steps), int(config.train.prompts_per_step)
  settings.check_batch(nprompts)
  optimizer = optim.make_optimizer(config.optim)
  reward_fns = build.build_reward_fns(list(config.rewards), tok)
  plen, alen = int(config.data.max_prompt_length), int(config.sampling.max_new_tokens)
  train_ex = task.generate(int(config.data.train_size), seed=config.seed, split="train")
  eval_ex = task.generate(int(config.data.eval_size), seed=config.seed, split="test")
  writer = MetricsWriter(workdir, total_steps=steps, desc="rl",
                         progress=config.get("progress", True))
  evaluate = make_evaluator(model, tok, task, eval_ex, prompt_length=plen, max_new_tokens=alen)
  summary: Dict[str, Any] = {}
  sampling_cfg = SamplingConfig(
      max_new_tokens=alen, temperature=float(config.sampling.temperature),
      top_k=config.sampling.get("top_k"), top_p=config.sampling.get("top_p"),
      eos_ids=(tok.eos_id,), pad_id=tok.pad_id, num_samples=settings.group_size)
  rng = jax.random.PRNGKey(int(config.seed))
  if "values" in settings.estimator_inputs() and not config.get("value"):
    raise ValueError(f"rl.advantage={settings.advantage!r} needs a value model: add "
                     "config.value = dict(optim=dict(learning_rate=...)) (or optim=None to "
                     "reuse config.optim)")

  unroll_layers = config_utils.get_key(config, "model.unroll_layers", True)

  def init_state(params):
    value_model, value_params, value_opt = value_setup(config, model, params, rng)
    return value_model, value_opt, online.init_state(
        params, optimizer, jax.random.fold_in(rng, 1), settings, value_params=value_params,
        value_optimizer=value_opt, unroll_layers=unroll_layers)
  value_model, value_opt, state = init_state(params)
  batches = prompt_iterator(tok, train_ex, batch_size=nprompts, prompt_length=plen,
                            answer_length=alen, seed=int(config.seed))
  run = Runner(config, state, batches)
  if run.start_step == 0:
    if config.get("sft") and int(config.sft.steps) > 0:
      t0 = time.time()
      params = sft_warmup(config, model, params, tok, train_ex, writer=writer)
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
  update = online.make_update(model, reward_fns, optimizer, settings, sampling_cfg,
                              value_model=value_model, value_optimizer=value_opt,
                              out_shardings=out_shardings)
  eval_every = int(config.train.get("eval_every", 0) or 0)
  step_times = []
  for i in range(run.start_step, steps):
    batch = put_batch(host_arrays(next(batches)))
    t0 = time.time()
    state, metrics = update(state, batch, rng)
    metrics = _fetch(metrics)
    dt = time.time() - t0
    if i == run.start_step:
      summary["first_step_seconds"] = dt
    else:
      step_times.append(dt)
    metrics["tokens_per_second"] = float(metrics["num_tokens"]) / dt
    writer.write(i + 1, metrics)
    if eval_every and (i + 1) % eval_every == 0 and i + 1 < steps:
      writer.write(i + 1, {"accuracy": evaluate(state.params)}, prefix="eval/")
    if run.after_step(i + 1, state, metrics):
      writer.close()
      return dict(summary, stopped_at=i + 1, state=state)
  summary["accuracy_after"] = evaluate(state.params)
  writer.write(steps, {"accuracy": summary["accuracy_after"]}, prefix="eval/")
  if config.get("export_hf"):
    summary["hf_model"] = build.export_hf(config, model, state.params)
  summary["steady_step_seconds"] = float(np.median(step_times)) if step_times else None
  summary["plot"] = writer.plot(["reward_mean", "eval/accuracy", "kl", "response_length"],
                                name="reward_curve")
  run.finish(steps, state)
  summary["total_seconds"] = time.time() - t_start
  summary["state"] = state
  writer.close()
  return summary
