"""Top-level config schemas of the training loops (checked before anything is built).

`check(config, loop)` rejects an unknown key (naming the closest known one) at the
top level and in the sections listed here (`checkpoint`, `train`, `model`, `mesh`,
`distributed`, `data`; for the online loop also `sft`, `sampling`, `value`), and checks
their types and ranges (`RANGES`) and that `workdir` can be a directory. Sections such
as `rl`, `optim` and `task` are validated by their own builders.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from rlhf_jax import config_utils
from rlhf_jax.train.runner import RESUME_MODES, check_workdir

_NONE = type(None)

CHECKPOINT = {"every_steps": (int, _NONE), "every_minutes": (int, float, _NONE),
              "max_to_keep": (int, _NONE), "async_save": bool}

# `hf_config` is a Hugging Face config dict: keys it does not use are ignored, as there.
MODEL = {"hf_config": None, "path": str, "gguf": str, "dtype": str, "init_seed": int,
         # rlhf_jax.models.Model.with_options (docs/models.md)
         "param_dtype": str, "cache_dtype": str, "remat": (str, bool), "attention": str,
         "attention_chunk": int, "vocab_chunk": (int, _NONE)}

MESH = {"data": int, "fsdp": int, "tensor": int}
# rlhf_jax.sharding.init_distributed; `auto`: jax.distributed.initialize() with no arguments
DISTRIBUTED = {"coordinator_address": str, "num_processes": int, "process_id": int,
               "auto": bool}
OPTIONAL_SECTIONS = ("mesh", "distributed", "value", "env", "lora")  # None (or absent): not used

_COMMON = {"paradigm": str, "seed": int, "workdir": str, "resume": str, "progress": bool,
           "tokenizer": str, "max_bad_steps": int, "checkpoint": CHECKPOINT,
           "model": MODEL, "task": None, "data": None, "optim": None, "export_hf": bool,
           "mesh": MESH, "distributed": DISTRIBUTED}

OFFLINE_DATA = {  # docs/training.md; which keys apply depends on `source` and the paradigm
    "source": str, "train_size": int, "eval_size": int, "eval_batch_size": int,
    "max_length": int, "max_prompt_length": int, "truncation": str, "skip_invalid": bool,
    "packing": bool, "num_responses": int, "passthrough": None, "precheck": bool,
    "path": str, "eval_path": (str, _NONE), "format": str,
    "name": str, "split": str, "eval_split": str, "fields": None, "data_dir": (str, _NONE),
    "relabel": (str, _NONE), "goal_template": str, "degrees": None}

SCHEMAS: Mapping[str, Mapping[str, Any]] = {
    "online": dict(_COMMON, rewards=None, reward_shaping=None, rl=None, seeds=(int, _NONE), value={"optim": None},
                   model=dict(MODEL, unroll_layers=(bool, _NONE)),
                   data={"max_prompt_length": int, "train_size": int, "eval_size": int},
                   sft={"steps": int, "batch_size": int, "optim": None,
                        "tool_demonstrations": bool},
                   env=None,
                   # rlhf_jax.train.adapters (docs/scale.md)
                   lora={"rank": int, "alpha": (int, float), "targets": None,
                         "export": (str, _NONE), "init_seed": int, "sample_merged": bool},
                   sampling={"max_new_tokens": int, "temperature": float,
                             "top_k": (int, _NONE), "top_p": (float, _NONE),
                             "compact_stages": int, "scan_layers": (bool, _NONE)},
                   train={"steps": int, "prompts_per_step": int, "eval_every": (int, _NONE)}),
    "offline": dict(_COMMON, data=OFFLINE_DATA, loss=str, loss_kwargs=None, precompute_ref=bool,
                    reference_free=bool, rm_head=None,
                    train={"steps": int, "batch_size": int, "eval_every": (int, _NONE)}),
}


# key -> (lowest allowed value, whether it is allowed, what the value means / the fix).
# Checked when the key is set (not None); keys a loop does not have are skipped.
RANGES: Mapping[str, tuple] = {
    "sampling.max_new_tokens": (1, True, "the completion length in tokens"),
    "sampling.temperature": (0, True, "0 decodes greedily, > 0 samples"),
    "sampling.top_k": (1, True, "None keeps every token"),
    "sampling.compact_stages": (0, True, "0 never compacts the decode batch"),
    "data.max_prompt_length": (1, True, "prompts are cut or rejected beyond it"),
    "data.max_length": (1, True, "the longest training sequence in tokens"),
    "data.train_size": (0, True, "the number of synthetic training records"),
    "data.eval_batch_size": (0, True, "0: train.batch_size"),
    "data.num_responses": (0, True, "K, the most responses of a ranked record"),
    "sft.steps": (0, True, "0 skips the warm-up"),
    "sft.batch_size": (1, True, "records per warm-up step"),
    "train.eval_every": (0, True, "0 or None: evaluate only before and after training"),
    "checkpoint.max_to_keep": (1, True, "None keeps every checkpoint"),
    "checkpoint.every_minutes": (0, False, "None: no time-based checkpoints"),
}


def _check_ranges(config) -> None:
  for key, (low, inclusive, meaning) in RANGES.items():
    v = config_utils.get_key(config, key, None)
    if v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
      continue  # absent, or a wrong type (named by the schema)
    if math.isnan(v) or (v < low if inclusive else v <= low):
      raise ValueError(f"config key {key!r}={v!r} must be {'>=' if inclusive else '>'} {low} "
                       f"({meaning}); set it to a value in range")
  top_p = config_utils.get_key(config, "sampling.top_p", None)
  if top_p is not None and not 0 < top_p <= 1:
    raise ValueError(f"config key 'sampling.top_p'={top_p!r} must be in (0, 1] (the nucleus "
                     "mass; None or 1.0 keeps every token)")


def schema_of(config) -> Mapping[str, Any]:
  """The schema of the loop `config.paradigm` selects ("online", the default, or an offline
  paradigm): what command-line overrides may add (`config_utils.apply_overrides`)."""
  paradigm = config.get("paradigm", "online") if hasattr(config, "get") else "online"
  return SCHEMAS["online" if paradigm == "online" else "offline"]


def check(config, loop: str) -> None:
  """Raises KeyError (unknown key, closest known suggested), TypeError (wrong type) or
  ValueError (a value out of range, a workdir that cannot be a directory)."""
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
  _check_ranges(config)
  if loop == "offline" and config.get("paradigm") in ("preference", "reward_model"):
    data = config.get("data") or {}
    plen, length = data.get("max_prompt_length"), data.get("max_length")
    if plen is not None and length is not None and plen >= length:
      raise ValueError(f"config key 'data.max_prompt_length'={plen} must be < "
                       f"'data.max_length'={length}: the response needs at least one token; "
                       "lower data.max_prompt_length or raise data.max_length")
  check_workdir(config)
