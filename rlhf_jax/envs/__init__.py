"""Environments for multi-turn rollouts: JAX-native ones run inside the jitted step, host
tools through a host callback. `make(name, tokenizer, **kwargs) -> (env, env_spec)`.

    env, spec = envs.make("calculator", tokenizer, max_turns=4, turn_tokens=20)
    ro, info = multiturn.rollout_multiturn(model, params, batch, rng, sampling, env, spec)

See `rlhf_jax.envs.base` for the interface and docs/agentic.md for the whole picture.
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any, Callable, Dict, Sequence, Tuple

import numpy as np

from rlhf_jax.envs import calculator, guess_number, host
from rlhf_jax.envs.base import (
    ContextLengthError,
    Env,
    EnvSpec,
    EnvSpecError,
    HostToolError,
    ObservationTruncatedWarning,
    StopStringError,
    stop_ids,
)
from rlhf_jax.envs.calculator import CalculatorEnv
from rlhf_jax.envs.guess_number import GuessNumberEnv
from rlhf_jax.envs.host import HostEnv, ToolCall, ToolResult, code_runner, python_calculator

_BUILDERS: Dict[str, Callable[..., Tuple[Any, EnvSpec]]] = {}


def register_env(name: str):
  """Registers `builder(tokenizer, **kwargs) -> (env, EnvSpec)` under `name`."""
  def deco(fn):
    if name in _BUILDERS and _BUILDERS[name] is not fn:
      raise ValueError(f"environment {name!r} is registered twice")
    _BUILDERS[name] = fn
    return fn
  return deco


def names() -> Sequence[str]:
  return sorted(_BUILDERS)


def make(name: str, tokenizer, **kwargs) -> Tuple[Any, EnvSpec]:
  """Builds the registered environment `name` and its `EnvSpec`.

  Raises KeyError for an unknown name (listing the known ones) and EnvSpecError for a
  keyword the environment does not take or a setting that cannot work.
  """
  if name not in _BUILDERS:
    close = difflib.get_close_matches(str(name), list(_BUILDERS), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise KeyError(f"unknown environment {name!r}{hint}; known environments: "
                   f"{', '.join(names())}")
  fn = _BUILDERS[name]
  params = inspect.signature(fn).parameters
  takes = [k for k, p in params.items() if p.kind == p.KEYWORD_ONLY]
  for k in kwargs:
    if k not in takes:
      close = difflib.get_close_matches(k, takes, n=1)
      hint = f" (did you mean {close[0]!r}?)" if close else ""
      raise EnvSpecError(f"environment {name!r} does not take {k!r}{hint}; it takes {takes}")
  missing = [k for k in takes if params[k].default is inspect.Parameter.empty and k not in kwargs]
  if missing:
    raise EnvSpecError(f"environment {name!r} needs {missing}")
  return fn(tokenizer, **kwargs)


def _eos(tokenizer) -> Tuple[Tuple[int, ...], ...]:
  eos = getattr(tokenizer, "eos_id", None)
  return () if eos is None else ((int(eos),),)


@register_env("calculator")
def _calculator(tokenizer, *, max_turns: int = 4, turn_tokens: int = 20, obs_tokens: int = 8,
                max_digits: int = 4):
  spec = EnvSpec(max_turns=max_turns, turn_tokens=turn_tokens, obs_tokens=obs_tokens,
                 stop_sequences=stop_ids(tokenizer, ["</calc>"]) + _eos(tokenizer))
  return CalculatorEnv.build(tokenizer, obs_tokens=obs_tokens, max_digits=max_digits), spec


@register_env("guess_number")
def _guess_number(tokenizer, *, max_turns: int = 6, turn_tokens: int = 4, obs_tokens: int = 8,
                  max_value: int = 16, turn_penalty: float = 0.1, target_key: str = "target"):
  spec = EnvSpec(max_turns=max_turns, turn_tokens=turn_tokens, obs_tokens=obs_tokens,
                 stop_sequences=stop_ids(tokenizer, ["\n"]) + _eos(tokenizer))
  env = GuessNumberEnv.build(tokenizer, obs_tokens=obs_tokens, max_value=max_value,
                             turn_penalty=turn_penalty, target_key=target_key)
  return env, spec


def _host_spec(tokenizer, max_turns, turn_tokens, obs_tokens, stop_strings):
  return EnvSpec(max_turns=max_turns, turn_tokens=turn_tokens, obs_tokens=obs_tokens,
                 stop_sequences=stop_ids(tokenizer, list(stop_strings)) + _eos(tokenizer))


@register_env("host")
def _host(tokenizer, *, tool: Callable, max_turns: int = 4, turn_tokens: int = 32,
          obs_tokens: int = 16, stop_strings: Sequence[str] = (), on_error: str = "raise",
          timeout_s: float = 10.0, extras_keys: Sequence[str] = (), ordered: bool = True,
          chat_roles: str = "auto"):
  env = host.make_host_env(tool, tokenizer, obs_tokens=obs_tokens, on_error=on_error,
                           timeout_s=timeout_s, extras_keys=extras_keys, ordered=ordered,
                           chat_roles=chat_roles)
  return env, _host_spec(tokenizer, max_turns, turn_tokens, obs_tokens, stop_strings)


@register_env("host_calculator")
def _host_calculator(tokenizer, *, max_turns: int = 4, turn_tokens: int = 20,
                     obs_tokens: int = 8, on_error: str = "observe", timeout_s: float = 5.0,
                     ordered: bool = True, chat_roles: str = "auto"):
  env = host.make_host_env(python_calculator, tokenizer, obs_tokens=obs_tokens,
                           on_error=on_error, timeout_s=timeout_s, ordered=ordered,
                           chat_roles=chat_roles)
  return env, _host_spec(tokenizer, max_turns, turn_tokens, obs_tokens, ["</calc>"])


@register_env("code_runner")
def _code_runner(tokenizer, *, max_turns: int = 3, turn_tokens: int = 256, obs_tokens: int = 32,
                 tests_key: str = "tests", stop_strings: Sequence[str] = (),
                 on_error: str = "observe", timeout_s: float = 5.0, memory_mb: int = 1024,
                 ordered: bool = True, chat_roles: str = "auto"):
  tool = code_runner(tests_key, timeout_s=timeout_s, memory_mb=memory_mb)
  env = host.make_host_env(tool, tokenizer, obs_tokens=obs_tokens, on_error=on_error,
                           timeout_s=timeout_s + 10.0, extras_keys=(tests_key,),
                           ordered=ordered, chat_roles=chat_roles)
  return env, _host_spec(tokenizer, max_turns, turn_tokens, obs_tokens, stop_strings)


def prompt_batch(tokenizer, records: Sequence[dict], *, prompt_len: int | None = None,
                 int_keys: Sequence[str] = ()) -> Dict[str, np.ndarray]:
  """Left-padded {"prompt_ids", "prompt_mask"} [B, P] (plus int fields `int_keys` [B])
  from records with a "prompt" text, e.g. `calculator.prompts(n)`."""
  seqs = [tokenizer.encode(r["prompt"]) for r in records]
  length = prompt_len or max(len(s) for s in seqs)
  pad = int(tokenizer.pad_id)
  ids = np.full((len(seqs), length), pad, np.int32)
  mask = np.zeros((len(seqs), length), bool)
  for i, s in enumerate(seqs):
    if len(s) > length:
      raise ValueError(f"prompt {i} has {len(s)} tokens > prompt_len={length}")
    if s:
      ids[i, length - len(s):] = s
      mask[i, length - len(s):] = True
  out = {"prompt_ids": ids, "prompt_mask": mask}
  for k in int_keys:
    out[k] = np.asarray([int(r[k]) for r in records], np.int32)
  return out


__all__ = [
    "ContextLengthError", "Env", "EnvSpec", "EnvSpecError", "HostToolError",
    "ObservationTruncatedWarning", "StopStringError", "stop_ids", "CalculatorEnv",
    "GuessNumberEnv", "HostEnv", "ToolCall", "ToolResult", "code_runner", "python_calculator",
    "make", "names", "register_env", "prompt_batch", "calculator", "guess_number", "host",
]
