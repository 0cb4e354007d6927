"""Top-level config schemas of the training loops (checked before anything is built).

`check(config, loop)` rejects an unknown top-level key (naming the closest known
one) and checks the types of the run-management keys shared by both loops
(`workdir`, `seed`, `resume`, `max_bad_steps`, `checkpoint.*`, `train.*`).
Sections such as `model`, `data`, `rl` are validated by their own builders.
"""

from __future__ import annotations

from typing import Any, Mapping

from rlhf_jax import config_utils
from rlhf_jax.train.runner import RESUME_MODES

_NONE = type(None)

CHECKPOINT = {"every_steps": (int, _NONE), "every_minutes": (int, float, _NONE),
              "max_to_keep": (int, _NONE), "async_save": bool}

_COMMON = {"paradigm": str, "seed": int, "workdir": str, "resume": str, "progress": bool,
           "tokenizer": str, "max_bad_steps": int, "checkpoint": CHECKPOINT,
           "model": None, "task": None, "data": None, "optim": None, "export_hf": bool}

SCHEMAS: Mapping[str, Mapping[str, Any]] = {
    "online": dict(_COMMON, sft=None, sampling=None, rewards=None, rl=None, value=None, mesh=None,
                   distributed=None,
                   train={"steps": int, "prompts_per_step": int, "eval_every": (int, _NONE)}),
    "offline": dict(_COMMON, mesh=None, distributed=None, loss=str, loss_kwargs=None, precompute_ref=bool,
                    reference_free=bool, rm_head=None,
                    train={"steps": int, "batch_size": int, "eval_every": (int, _NONE)}),
}


def check(config, loop: str) -> None:
  """Raises KeyError (unknown key, closest known suggested) or TypeError (wrong type)."""
  if loop not in SCHEMAS:
    raise ValueError(f"loop={loop!r} is unknown; use one of {sorted(SCHEMAS)}")
  config_utils.validate_config(config, SCHEMAS[loop])
  if config_utils.get_key(config, "resume", None) is not None:
    config_utils.require_in(config, "resume", RESUME_MODES)
  for key in ("train.steps", "checkpoint.every_steps", "max_bad_steps",
              "train.prompts_per_step", "train.batch_size"):
    if config_utils.get_key(config, key, None) is not None:
      config_utils.require_positive(config, key,
                                    allow_zero=key in ("train.steps", "checkpoint.every_steps"))
