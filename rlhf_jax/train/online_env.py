"""Multi-turn runs of the online loop: `config.env` picks an environment.

    config.env = {"name": "calculator", "max_turns": 2, "turn_tokens": 20, "obs_tokens": 8}
    config.rewards = ("env",)               # the environment's trajectory reward
    config.sft.tool_demonstrations = True   # warm up on tool-use demonstrations

The rollout phase becomes `multiturn.rollout_multiturn` (the environment steps inside the
compiled program); `"env"` in `config.rewards` is the environment's reward; held-out
accuracy is the mean environment reward of greedy episodes (for the calculator: the
exact final answer, with the tool). A host tool is `config.env.tool`, a callable or
"module:function". Before anything is written, `check_env` traces one episode on the
first prompts (observation widths, the context the first observation leaves) and, for a
host tool, calls it once. See docs/agentic.md.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import config_utils, envs
from rlhf_jax.data import prompt_data
from rlhf_jax.rewards import registry as rewards_lib
from rlhf_jax.sampling.config import SamplingConfig
from rlhf_jax.train import multiturn
from rlhf_jax.train.placement import fetch

ENV_REWARD = "env"


def _dict(x) -> dict:
  return dict(x.to_dict() if hasattr(x, "to_dict") else (x or {}))


def build_env(config, tokenizer) -> Tuple[Any, Any]:
  """(env, EnvSpec) of `config.env`, or (None, None) without one."""
  cfg = _dict(config.get("env"))
  if not cfg:
    return None, None
  if "name" not in cfg:
    raise ValueError(f"config.env needs a 'name' (one of {', '.join(envs.names())})")
  if "tool" in cfg:
    cfg["tool"] = load_tool(cfg["tool"])
  try:
    env, spec = envs.make(tokenizer=tokenizer, **cfg)
  except (KeyError, TypeError) as e:
    raise ValueError(f"config.env={cfg}: {e}") from None
  budget = int(config.sampling.max_new_tokens)
  if budget < spec.completion_tokens:
    raise ValueError(f"sampling.max_new_tokens={budget} is less than an episode's "
                     f"{spec.completion_tokens} tokens (config.env: max_turns x turn_tokens + "
                     "(max_turns - 1) x obs_tokens); set sampling.max_new_tokens="
                     f"{spec.completion_tokens} (it bounds the SFT sequences and the model's "
                     "positions)")
  return env, spec


def load_tool(tool: Any) -> Callable:
  """`config.env.tool`: a callable, or "pkg.module:function" imported here."""
  if callable(tool):
    return tool
  return config_utils.import_function(tool, "config.env.tool", "; give it as 'module:function'")


def check_env(config, tokenizer, model, params, env, env_spec, records: Sequence[dict],
              sampling_config) -> None:
  """Raises before anything is written what the first step would raise later.

  Traces one episode of the first prompts (`jax.eval_shape`, nothing runs): an
  observation of the wrong width (`EnvSpecError`) or a first observation that leaves too
  little context for the episode (`ContextLengthError`). A host tool (`envs.HostEnv`) is
  then called once on those prompts with an empty finished turn (EOS alone): under
  `on_error="raise"` a tool that raises is a `HostToolError` naming `config.env`; under
  `on_error="observe"` its error text becomes the observation and the run goes on.
  """
  name = _dict(config.env).get("name")
  n = min(2, len(records))
  arrays = prompt_data.prompt_arrays(list(records[:n]), tokenizer,
                                     prompt_length=int(config.data.max_prompt_length))
  batch = {k: v for k, v in arrays.items() if k in ("prompt_ids", "prompt_mask")}
  try:
    jax.eval_shape(lambda p, b: multiturn.rollout_multiturn(
        model, p, b, jax.random.PRNGKey(0), sampling_config, env, env_spec),
        params, batch)
  except envs.EnvSpecError as e:
    raise type(e)(f"config.env (name={name!r}): {e}") from None
  if isinstance(env, envs.HostEnv):
    eos = getattr(tokenizer, "eos_id", None)
    if eos is None:
      return
    state, _, _ = env.reset(jax.random.PRNGKey(0), {k: jnp.asarray(v) for k, v in batch.items()})
    action = np.full((n, 1), int(eos), np.int32)
    extras = [np.asarray(state.extras[k]) for k in sorted(state.extras)]
    try:
      env.host_step(tuple(sorted(state.extras)), np.asarray(state.prompt_ids),
                    np.asarray(state.prompt_mask), action, np.ones((n, 1), bool),
                    np.zeros((n,), np.int32), *extras)
    except envs.HostToolError as e:
      raise envs.HostToolError(
          f"config.env (name={name!r}): the tool fails when called on the first {n} prompts "
          f"with an empty turn: {str(e).removeprefix('HostToolError: ')}; fix the tool, or set "
          "config.env.on_error='observe' to make its error text the observation") from None


def env_reward_entry(weight: float = 1.0) -> rewards_lib.Reward:
  """`"env"` in config.rewards: the environment's trajectory reward (in the program)."""
  return rewards_lib.Reward(ENV_REWARD, multiturn.env_reward(), float(weight),
                            rewards_lib.RewardDecl(ENV_REWARD))


def split_env_specs(specs: Sequence[Any]) -> Tuple[List[Any], Dict[int, float]]:
  """(the registry's specs, {position: weight} of the "env" entries)."""
  rest, env_at = [], {}
  for i, spec in enumerate(specs):
    name = spec.get("name") if isinstance(spec, Mapping) else spec
    if name == ENV_REWARD:
      env_at[i] = float(spec.get("weight", 1.0)) if isinstance(spec, Mapping) else 1.0
    else:
      rest.append(spec)
  return rest, env_at


def demonstration(env_name: str, record: Mapping[str, Any]) -> str:
  """A tool-use completion for the SFT warm-up (the calculator: call, result, answer)."""
  if env_name not in ("calculator", "host_calculator"):
    raise ValueError(f"sft.tool_demonstrations: no demonstrations for env {env_name!r}; "
                     "use the calculator or give the records a 'completion'")
  expr = record["prompt"].rstrip("=").strip()
  return f"<calc>{expr}</calc>{record['answer']}{record['answer']}"


def with_demonstrations(config, records: Sequence[dict]) -> List[dict]:
  """The records with tool-use completions when `sft.tool_demonstrations` is set."""
  if not (config.get("env") and config.sft.get("tool_demonstrations")):
    return list(records)
  name = _dict(config.env)["name"]
  return [dict(r, completion=demonstration(name, r)) for r in records]


def make_env_evaluator(model, tokenizer, records: Sequence[dict], env, env_spec, *,
                       prompt_length: int, vocab_limit: Optional[int] = None,
                       batch_size: int = 256) -> Callable[[Any], float]:
  """`accuracy(params)`: the mean environment reward of one greedy episode per prompt."""
  cfg = SamplingConfig(max_new_tokens=1, temperature=0.0, eos_ids=(tokenizer.eos_id,),
                       pad_id=tokenizer.pad_id, num_samples=1, vocab_limit=vocab_limit)
  episode = jax.jit(lambda p, b: multiturn.rollout_multiturn(
      model, p, b, jax.random.PRNGKey(0), cfg, env, env_spec)[1].reward)
  arrays = prompt_data.prompt_arrays(list(records), tokenizer, prompt_length=prompt_length)
  arrays = {k: v for k, v in arrays.items() if k in ("prompt_ids", "prompt_mask")}
  n = len(records)
  chunks = []
  for i in range(0, n, batch_size):
    idx = np.arange(i, min(i + batch_size, n))
    if n > batch_size:
      idx = np.concatenate([idx, np.full(batch_size - len(idx), idx[-1])])
    chunks.append((min(batch_size, n - i), {k: v[idx] for k, v in arrays.items()}))

  def accuracy(params) -> float:
    scores = [np.asarray(fetch(episode(params, b)))[:k] for k, b in chunks]
    return float(np.mean(np.concatenate(scores)))
  return accuracy
