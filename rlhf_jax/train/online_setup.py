"""What the online loop builds from a config before it writes anything: prompts, rewards,
the held-out evaluator and the SFT warm-up.

`config.task` is a synthetic task (`{"name": "arithmetic" | "countdown", ...}`) or a
prompt dataset (`{"name": "jsonl" | "parquet" | "tfds", ...}`, `rlhf_jax.data.prompt_data`).
Either way the loop sees records `{"prompt", "answer", ...fields}`, batches with
`record_index`, a reward list from the reward registry (`rlhf_jax.rewards.registry`) and
`score(record, completion_text)` for held-out accuracy: the task's own check for synthetic
tasks, else the verifier named by `task.verifier` (default: the first verifier among
`config.rewards`).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, List, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import data as data_lib
from rlhf_jax import sampling as sampling_lib
from rlhf_jax.data import prompt_data
from rlhf_jax.rewards import registry as rewards_lib
from rlhf_jax.sampling.config import SamplingConfig
from rlhf_jax.train import offline, online_env, optim
from rlhf_jax.train.metrics_io import MetricsWriter
from rlhf_jax.train.placement import fetch, host_arrays

Scorer = Callable[[Mapping[str, Any], str], float]


def _dict(x) -> dict:
  return dict(x.to_dict() if hasattr(x, "to_dict") else (x or {}))


class PromptTask(NamedTuple):
  """Training and held-out records, and the held-out scorer."""
  train: List[dict]
  eval: List[dict]
  score: Scorer
  message: str  # e.g. "dropped N of M prompts longer than ..." ("" when none)


def build_prompt_task(config, tokenizer) -> PromptTask:
  """Records of `config.task` (synthetic or a dataset) and how held-out answers are scored."""
  task_cfg = _dict(config.task)
  if "name" not in task_cfg:
    raise ValueError(f"config.task needs a 'name': a synthetic task "
                     f"{sorted(data_lib.TASKS)} or a dataset {list(prompt_data.DATASET_TASKS)}")
  eval_size = int(config.data.eval_size)
  if eval_size < 1:
    raise ValueError(f"data.eval_size={eval_size}: held-out accuracy needs at least one prompt; "
                     "set data.eval_size >= 1")
  plen = int(config.data.max_prompt_length)
  if prompt_data.is_dataset_task(task_cfg):
    verifier = task_cfg.get("verifier")
    loaded = prompt_data.load_prompt_data(task_cfg, tokenizer, max_prompt_length=plen,
                                          seed=int(config.seed), eval_size=eval_size)
    if not loaded.eval:
      raise ValueError(f"task {loaded.source}: no held-out prompts (set task.eval_path / "
                       "task.eval_split, or task.eval_fraction > 0)")
    ctx = rewards_lib.RewardContext(tokenizer, int(config.sampling.max_new_tokens), loaded.eval)
    score = (None if config.get("env") else  # the environment scores held-out episodes
             rewards_lib.text_scorer(verifier or _first_verifier(config.rewards), ctx))
    return PromptTask(loaded.train, loaded.eval, score, loaded.message)
  name = task_cfg.pop("name")
  task = data_lib.make_task(name, **task_cfg)
  train = task.generate(int(config.data.train_size), seed=int(config.seed), split="train")
  held_out = task.generate(eval_size, seed=int(config.seed), split="test")
  return PromptTask(train, held_out, lambda record, text: task.score(record["prompt"], text), "")


def _first_verifier(specs) -> str:
  for spec in specs:
    name = spec.get("name") if hasattr(spec, "get") else spec
    if rewards_lib.decl(name).verifier:  # an unknown name is named here
      return spec
  verifiers = [n for n in rewards_lib.names() if rewards_lib.decl(n).verifier]
  raise ValueError(f"held-out accuracy needs a verifier: none of config.rewards={list(specs)} "
                   f"is one; add one ({', '.join(verifiers)}) or set task.verifier")


def build_rewards(config, tokenizer, records: Sequence[dict]) -> List[rewards_lib.Reward]:
  """`config.rewards` through the reward registry (host rewards look up `records`)."""
  specs = [s.to_dict() if hasattr(s, "to_dict") else s for s in config.rewards]
  if not specs:
    raise ValueError("config.rewards is empty; name at least one reward, e.g. ('exact_match',)")
  specs, env_at = online_env.split_env_specs(specs)
  if env_at and not config.get("env"):
    raise ValueError("config.rewards has 'env' (an environment's reward) but config.env is "
                     "not set; set config.env or remove 'env'")
  ctx = rewards_lib.RewardContext(tokenizer, int(config.sampling.max_new_tokens), records)
  rewards = rewards_lib.build_rewards(specs, ctx) if specs else []
  for i in sorted(env_at):
    rewards.insert(i, online_env.env_reward_entry(env_at[i]))
  return rewards


def reward_weights(rewards: Sequence[rewards_lib.Reward], rl_weights: Sequence[float]):
  """The weights of the rewards: `rl.reward_weights` when set, else each entry's `weight`;
  None when every weight is 1 (the step then weights every column, after
  `config.reward_shaping`, by 1)."""
  if not rl_weights:
    weights = tuple(float(r.weight) for r in rewards)
    return None if all(w == 1.0 for w in weights) else weights
  if any(r.weight != 1.0 for r in rewards):
    raise ValueError("set reward weights either in rl.reward_weights or as 'weight' in "
                     "config.rewards entries, not both")
  return tuple(rl_weights)


def prompt_batches(config, tokenizer, records, rewards, *, batch_size: int,
                   answers: bool = False):
  """Resumable shuffled batches; answer ids only when a reward needs them (or `answers`:
  the estimator does)."""
  needs_answers = answers or any("answer_ids" in r.decl.needs for r in rewards)
  return prompt_data.prompt_batches(
      records, tokenizer, batch_size=batch_size,
      prompt_length=int(config.data.max_prompt_length), seed=int(config.seed),
      answer_length=int(config.sampling.max_new_tokens) if needs_answers else None)


def probe_host_rewards(config, tokenizer, records, rewards) -> None:
  """Calls each host reward (Python code) once on the first records with empty completions,
  so that a function that raises, returns the wrong length or a non-finite value is named
  now, before anything is written, rather than at the first step."""
  host = [(i, r) for i, r in enumerate(rewards) if r.decl.host]
  if not host:
    return
  n = min(2, len(records))
  needs_answers = any("answer_ids" in r.decl.needs for _, r in host)
  alen = int(config.sampling.max_new_tokens)
  batch = prompt_data.prompt_arrays(list(records[:n]), tokenizer,
                                    prompt_length=int(config.data.max_prompt_length),
                                    answer_length=alen if needs_answers else None)
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  completion = jnp.full((n, alen), tokenizer.pad_id, jnp.int32)
  extras = {k: v for k, v in batch.items() if k not in ("prompt_ids", "prompt_mask")}
  extras["prompt_mask"] = batch["prompt_mask"]
  for i, r in host:
    try:
      out = np.asarray(jax.device_get(r.fn(batch["prompt_ids"], completion,
                                           jnp.zeros((n, alen), bool), extras)))
    except Exception as e:  # pylint: disable=broad-except
      # The host's exception arrives inside the runtime error's text: keep its last line.
      lines = [ln for ln in str(e).splitlines() if "Error: " in ln or "Exception: " in ln]
      msg = lines[-1].split(": ", 1)[1].strip() if lines else str(e)
      raise ValueError(f"config.rewards[{i}] ({r.name!r}) failed when called on the first "
                       f"{n} prompts with empty completions: {msg}") from None
    if out.shape != (n,) or not np.all(np.isfinite(out)):
      raise ValueError(f"config.rewards[{i}] ({r.name!r}) returned {out!r} for {n} empty "
                       f"completions; expected {n} finite floats (shape [N])")


def make_evaluator(model, tokenizer, records: Sequence[dict], score: Scorer, *,
                   prompt_length: int, max_new_tokens: int, batch_size: int = 256,
                   vocab_limit: int | None = None):
  """Returns `accuracy(params) -> float`: greedy decoding scored by `score(record, text)`.

  `vocab_limit`: decode only ids < vocab_limit (`SamplingConfig.vocab_limit`; a model
  vocabulary padded beyond the tokenizer's)."""
  cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0,
                       eos_ids=(tokenizer.eos_id,), pad_id=tokenizer.pad_id, num_samples=1,
                       vocab_limit=vocab_limit)
  sample = jax.jit(lambda p, ids, m: sampling_lib.sample(model, p, ids, m, jax.random.PRNGKey(0),
                                                         cfg))
  arrays = prompt_data.prompt_arrays(records, tokenizer, prompt_length=prompt_length)
  n = len(records)
  chunks = []
  for i in range(0, n, batch_size):
    idx = np.arange(i, min(i + batch_size, n))
    if n > batch_size:  # one compiled shape: pad the last chunk with its last prompt
      idx = np.concatenate([idx, np.full(batch_size - len(idx), idx[-1])])
    chunks.append((i, arrays["prompt_ids"][idx], arrays["prompt_mask"][idx]))

  def accuracy(params) -> float:
    scores = []
    for start, ids, mask in chunks:
      out = fetch(sample(params, ids, mask))
      for j in range(min(len(ids), n - start)):
        k = int(out.lengths[j])
        text = tokenizer.decode([int(t) for t in out.completion_ids[j, :k]])
        scores.append(float(score(records[start + j], text)))
    return float(np.mean(scores))
  return accuracy


def sft_records(records: Sequence[dict]) -> List[dict]:
  """Prompt / completion pairs for the warm-up: the records that have an answer."""
  out = [{"prompt": r["prompt"], "completion": r.get("completion", r["answer"])}
         for r in records if r.get("answer") is not None]
  if not out:
    raise ValueError("sft.steps > 0 needs records with answers to imitate; set "
                     "task.answer_key or sft.steps=0")
  return out


def sft_warmup(config, model, params, tokenizer, examples, *, writer: MetricsWriter):
  """A short supervised warm-up on the records' reference completions (their answers)."""
  sft = config.sft
  opt = optim.make_optimizer(sft.optim)
  step = offline.make_step("sft", model, None, opt)
  state = offline.init_state(params, opt)
  examples = online_env.with_demonstrations(config, examples)
  it = data_lib.sft_batches(sft_records(examples), tokenizer, batch_size=sft.batch_size,
                            max_length=config.data.max_prompt_length +
                            config.sampling.max_new_tokens, seed=config.seed)
  for i in range(sft.steps):
    batch = next(it)
    state, m = step(state, {k: jnp.asarray(v) for k, v in host_arrays(batch).items()})
    if (i + 1) % max(1, sft.steps // 10) == 0:
      writer.write(i + 1, {"loss": m["loss"]}, prefix="sft/")
  return state.params


def log_once(message: str) -> None:
  if message:
    logging.warning("%s", message)
    print(message)
