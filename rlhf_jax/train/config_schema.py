"""Top-level config schemas of the training loops (checked before anything is built).

`check(config, loop)` rejects an unknown key (naming the closest known one) at the
top level and in the sections listed here (`checkpoint`, `train`, `model`, `mesh`,
`distributed`, `data`; for the online loop also `sft`, `sampling`, `value`), and checks
their types. Sections such as `rl`, `optim` and `task` are validated by their own
builders.
"""

from __future__ import annotations

from typing import Any, Mapping

from rlhf_jax import config_utils
from rlhf_jax.train.runner import RESUME_MODES

_NONE = type(None)

CHECKPOINT = {"every_steps": (int, _NONE), "every_minutes": (int, float, _NONE),
              "max_to_keep": (int, _NONE), "async_save": bool}

# `hf_config` is a Hugging Face config dict: keys it does not use are ignored, as there.
MODEL = {"hf_config": None, "path": str, "gguf": str, "dtype": str, "init_seed": int}

MESH = {"data": int, "fsdp": int, "tensor": int}
DISTRIBUTED = {"coordinator_address": str, "num_processes": int, "process_id": int}
OPTIONAL_SECTIONS = ("mesh", "distributed", "value")  # None (or absent): not used

_COMMON = {"paradigm": str, "seed": int, "workdir": str, "resume": str, "progress": bool,
           "tokenizer": str, "max_bad_steps": int, "checkpoint": CHECKPOINT,
           "model": MODEL, "task": None, "data": None, "optim": None, "export_hf": bool,
           "mesh": MESH, "distributed": DISTRIBUTED}

OFFLINE_DATA = {  # docs/training.md; which keys apply depends on `source` and the paradigm
    "source": str, "train_size": int, "eval_size": int, "eval_batch_size": int,
    "max_length": int, "max_prompt_length": int, "truncation": str, "skip_invalid": bool,
    "packing": bool, "num_responses": int, "passthrough": None, "precheck": bool,
    "path": str, "eval_path": (str, _NONE), "format": str,
    "name": str, "split": str, "eval_split": str, "fields": None, "data_dir": (str, _NONE)}

SCHEMAS: Mapping[str, Mapping[str, Any]] = {
    "online": dict(_COMMON, rewards=None, rl=None, value={"optim": None},
                   model=dict(MODEL, unroll_layers=bool),
                   data={"max_prompt_length": int, "train_size": int, "eval_size": int},
                   sft={"steps": int, "batch_size": int, "optim": None},
                   sampling={"max_new_tokens": int, "temperature": float,
                             "top_k": (int, _NONE), "top_p": (float, _NONE)},
                   train={"steps": int, "prompts_per_step": int, "eval_every": (int, _NONE)}),
    "offline": dict(_COMMON, data=OFFLINE_DATA, loss=str, loss_kwargs=None, precompute_ref=bool,
                    reference_free=bool, rm_head=None,
                    train={"steps": int, "batch_size": int, "eval_every": (int, _NONE)}),
}


def check(config, loop: str) -> None:
  """Raises KeyError (unknown key, closest known suggested) or TypeError (wrong type)."""
  if loop not in SCHEMAS:
    raise ValueError(f"loop={loop!r} is unknown; use one of {sorted(SCHEMAS)}")
  config_utils.validate_config(
      {k: v for k, v in config.items() if not (k in OPTIONAL_SECTIONS and v is None)},
      SCHEMAS[loop])
  if config_utils.get_key(config, "resume", None) is not None:
    config_utils.require_in(config, "resume", RESUME_MODES)
  for key in ("train.steps", "checkpoint.every_steps", "max_bad_steps",
              "train.prompts_per_step", "train.batch_size"):
    if config_utils.get_key(config, key, None) is not None:
      config_utils.require_positive(config, key,
                                    allow_zero=key in ("train.steps", "checkpoint.every_steps"))
