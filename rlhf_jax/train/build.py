"""Builders shared by the training loops: tokenizer, model, task data, rewards.

Each takes a config block and fails with a message naming the config key.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Sequence, Tuple

import jax
import numpy as np

from rlhf_jax import data as data_lib
from rlhf_jax import models as models_lib
from rlhf_jax.rewards import callback as callback_lib
from rlhf_jax.rewards import verifiers


def _dict(x) -> Dict[str, Any]:
  return dict(x.to_dict() if hasattr(x, "to_dict") else (x or {}))


def build_tokenizer(config):
  """config.tokenizer: "char" (built in) or a directory with tokenizer.json."""
  name = config.get("tokenizer", "char")
  if name == "char":
    return data_lib.CharTokenizer()
  return data_lib.HFTokenizer.from_dir(name)


def build_model(model_cfg, tokenizer=None, *, head: str = "lm"):
  """config.model: {"hf_config": {...}} (random init) or {"path": dir} (HF safetensors).

  Returns (model, params). With `hf_config`, `vocab_size` defaults to the tokenizer's.
  """
  cfg = _dict(model_cfg)
  dtype = {"float32": np.float32, "bfloat16": "bfloat16"}[cfg.get("dtype", "float32")]
  if cfg.get("path"):
    model, params = models_lib.load_hf(cfg["path"], dtype=dtype)
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
    raise ValueError("config.model needs either 'hf_config' (a Hugging Face config dict for "
                     "a random-init model) or 'path' (a directory with safetensors weights)")
  if tokenizer is not None:
    data_lib.check_vocab_fits(tokenizer, model.config.vocab_size)
  return model, params


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
  ids = np.full((len(answers), length), tokenizer.pad_id, np.int32)
  mask = np.zeros((len(answers), length), bool)
  for i, a in enumerate(answers):
    toks = list(tokenizer.encode(a))
    if len(toks) + 1 > length:
      raise ValueError(f"answer {a!r} has {len(toks) + 1} tokens with EOS, more than "
                       f"sampling.max_new_tokens={length}; raise max_new_tokens")
    ids[i, :len(toks)] = toks
    mask[i, :len(toks)] = True
  return ids, mask


def encode_prompts(tokenizer, prompts: Sequence[str], *, length: int) -> Tuple[np.ndarray, np.ndarray]:
  """Prompt strings -> left-padded ids and mask [N, length]."""
  ids = np.full((len(prompts), length), tokenizer.pad_id, np.int32)
  mask = np.zeros((len(prompts), length), bool)
  for i, p in enumerate(prompts):
    toks = list(tokenizer.encode(p))
    if len(toks) > length:
      raise ValueError(f"prompt {p!r} has {len(toks)} tokens, more than "
                       f"data.max_prompt_length={length}; raise it")
    ids[i, length - len(toks):] = toks
    mask[i, length - len(toks):] = True
  return ids, mask


def prompt_batch(tokenizer, examples: Sequence[Mapping[str, Any]], *, prompt_length: int,
                 answer_length: int) -> Dict[str, np.ndarray]:
  """Examples with "prompt" and "answer" -> the arrays the RL step reads."""
  pids, pmask = encode_prompts(tokenizer, [e["prompt"] for e in examples], length=prompt_length)
  aids, amask = encode_answers(tokenizer, [e["answer"] for e in examples], length=answer_length)
  return {"prompt_ids": pids, "prompt_mask": pmask, "answer_ids": aids, "answer_mask": amask}


def build_reward_fns(names: Sequence[str], tokenizer) -> List:
  """config.rewards: names of reward functions.

  "exact_match": completion tokens (before EOS) equal the answer tokens (in jit).
  "math_answer": a Python checker of the decoded answer (host callback).
  "terminated": 1 when the completion ends with EOS.
  """
  fns = []
  for name in names:
    if name == "exact_match":
      fns.append(verifiers.exact_match(pad_id=tokenizer.pad_id, eos_id=tokenizer.eos_id))
    elif name == "terminated":
      fns.append(verifiers.terminated(tokenizer.eos_id))
    elif name == "math_answer":
      fns.append(callback_lib.python_verifier(
          callback_lib.math_answer_check, decode=lambda ids: tokenizer.decode(list(ids)),
          pad_id=tokenizer.pad_id, fallback=0.0))
    else:
      raise ValueError(f"config.rewards has unknown reward {name!r}; known: "
                       "'exact_match', 'math_answer', 'terminated'")
  return fns
