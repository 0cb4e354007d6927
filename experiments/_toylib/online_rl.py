"""Shared pieces of the online-RL toy experiments (small LM on a synthetic task).

An experiment config carries `online`, an online-loop config (built from
`rlhf_jax.demo.get_config()`), and `methods`, a mapping name -> overrides of its
`rl` block. Per seed, one SFT warm-up is shared by every method (a paired
comparison); the jitted RL step of each method is compiled once and reused
across seeds (seeds change data, initialisation and sampling keys only).
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Dict, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.sampling.config import SamplingConfig
from rlhf_jax import sampling as sampling_lib
from rlhf_jax.train import build, loop, online, online_loop, optim
from rlhf_jax.train.rl_config import RLSettings


class _NullWriter:
  def write(self, *args, **kwargs):
    del args, kwargs


class Env(NamedTuple):
  """What every seed and method shares: tokenizer, task, model, reward functions."""
  config: Any
  tok: Any
  task: Any
  model: Any
  reward_fns: Any


def with_seed(config, seed: int):
  """A copy of the online config with data order, model init and sampling keyed by `seed`."""
  c = copy.deepcopy(config)
  c.seed = int(seed)
  c.model.init_seed = int(seed)
  return c


def make_env(config) -> Env:
  tok = build.build_tokenizer(config)
  model, _ = build.build_model(config.model, tok)
  return Env(config, tok, build.build_task(config.task), model,
             build.build_reward_fns(list(config.rewards), tok))


def warm_start(env: Env, seed: int, sft_examples: Optional[Callable] = None):
  """Random init + the online loop's SFT warm-up; returns (params, train_ex, eval_ex).

  `sft_examples(train_ex, rng) -> examples` optionally rewrites the SFT targets
  (RL and evaluation always use the task's own examples)."""
  c = with_seed(env.config, seed)
  _, params = build.build_model(c.model, env.tok)
  train_ex = env.task.generate(int(c.data.train_size), seed=c.seed, split="train")
  eval_ex = env.task.generate(int(c.data.eval_size), seed=c.seed, split="test")
  if int(c.sft.steps) > 0:
    sft_ex = train_ex if sft_examples is None else sft_examples(
        train_ex, np.random.default_rng(seed))
    params = online_loop.sft_warmup(c, env.model, params, env.tok, sft_ex, writer=_NullWriter())
  return params, train_ex, eval_ex


def _sampling(env: Env, num_samples: int, temperature: float) -> SamplingConfig:
  c = env.config
  return SamplingConfig(max_new_tokens=int(c.sampling.max_new_tokens), temperature=temperature,
                        eos_ids=(env.tok.eos_id,), pad_id=env.tok.pad_id,
                        num_samples=num_samples)


def rl_settings(env: Env, overrides: Mapping[str, Any]) -> RLSettings:
  rl = dict(env.config.rl.to_dict() if hasattr(env.config.rl, "to_dict") else env.config.rl)
  rl.update(dict(overrides))
  return RLSettings.from_config(rl)


def make_method(env: Env, overrides: Mapping[str, Any]):
  """Returns (settings, optimizer, jitted update) for one method's `rl` overrides."""
  settings = rl_settings(env, overrides)
  opt = optim.make_optimizer(env.config.optim)
  upd = online.make_update(env.model, env.reward_fns, opt, settings,
                           _sampling(env, settings.group_size,
                                     float(env.config.sampling.temperature)))
  return settings, opt, upd


def run_rl(env: Env, method, params, train_ex, seed: int,
           on_step: Optional[Callable[[int, Any, Dict[str, float]], None]] = None):
  """`train.steps` fused RL steps from `params`; returns (final params, per-step metrics)."""
  settings, opt, upd = method
  c = env.config
  nprompts = int(c.train.prompts_per_step)
  batches = online_loop.prompt_iterator(
      env.tok, train_ex, batch_size=nprompts, prompt_length=int(c.data.max_prompt_length),
      answer_length=int(c.sampling.max_new_tokens), seed=seed)
  rng = jax.random.PRNGKey(seed)
  state = online.init_state(jax.tree.map(jnp.copy, params), opt, jax.random.fold_in(rng, 1),
                            settings)
  history = []

  def record(step, new_state, metrics, seconds):
    del seconds
    history.append(metrics)
    if on_step is not None:
      on_step(step, new_state.params, metrics)
    return False  # never stops early: every method runs `train.steps` steps

  state, _ = loop.run_steps(upd, state, batches, rng, start=0, stop=int(c.train.steps),
                            on_step=record)
  return state.params, history


def make_sampler_eval(env: Env, *, num_samples: int, temperature: float = 1.0):
  """Returns `evaluate(params, eval_ex, seed) -> (correct [P, n] bool, ids [P, n, T])`:
  n samples per held-out prompt, scored by the config's rewards (> 0.5 is correct);
  `ids` are the completions with pad after EOS.
  Compiled once; reused for every seed's held-out set of the same size."""
  c = env.config
  scfg = _sampling(env, num_samples, temperature)
  ones = (1.0,) * len(env.reward_fns)

  @jax.jit
  def go(params, batch, rng):
    out = sampling_lib.sample(env.model, params, batch["prompt_ids"], batch["prompt_mask"], rng,
                              scfg)
    extras = {k: jnp.repeat(v, num_samples, axis=0) for k, v in batch.items()
              if k not in ("prompt_ids", "prompt_mask")}
    r, _ = online.score(env.reward_fns, ones, out.prompt_ids, out.completion_ids,
                        out.completion_mask, extras)
    ids = jnp.where(out.completion_mask, out.completion_ids, env.tok.pad_id)
    return (r > 0.5).reshape(-1, num_samples), ids.reshape(-1, num_samples, ids.shape[-1])

  def evaluate(params, eval_ex, seed: int):
    batch = build.prompt_batch(env.tok, eval_ex, prompt_length=int(c.data.max_prompt_length),
                               answer_length=int(c.sampling.max_new_tokens))
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    correct, ids = jax.device_get(go(params, batch, jax.random.PRNGKey(seed)))
    return np.asarray(correct), np.asarray(ids)
  return evaluate
