"""Host environments: a Python tool behind the environment interface, via a host callback.

`HostEnv(tool, tokenizer, obs_tokens=...)` keeps each row's prompt (and any prompt-batch
fields named in `extras_keys`) in its JAX state. Its `step` calls the host once per turn
with `jax.experimental.io_callback(..., ordered=True)` (`ordered=False` allows the
program to reorder calls): the host decodes every live row's prompt
and turn, calls `tool(ToolCall) -> ToolResult` with a time limit, encodes the
observation and hands back `(obs_ids [N, O], obs_mask [N, O], reward [N], done [N])`.

Cost: one device -> host -> device round trip per turn of the whole batch (the decode
loop waits for it), plus the tool's own time; the JAX environments (`calculator`,
`guess_number`) stay inside the program. A host observation longer than `obs_tokens`
keeps its first `obs_tokens` tokens and warns (`ObservationTruncatedWarning`).

A tool that raises or exceeds `timeout_s` raises `HostToolError` under
`on_error="raise"` (it surfaces from the jitted call as a runtime error whose message
names `HostToolError`, the tool, the row and the cause), or, under `on_error="observe"`,
the turn's observation is the error text (`"error: ValueError: ..."`), reward 0, and the
episode goes on.

Built-in tools: `python_calculator` (the calculator task, evaluated in Python) and
`code_runner` (runs the turn's code against the row's tests in
`rlhf_jax.rewards.sandbox`).
"""

from __future__ import annotations

import dataclasses
import functools
import re
import warnings
from typing import Any, Callable, ClassVar, Dict, Mapping, Optional, Sequence, Tuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from rlhf_jax.data import synthetic
from rlhf_jax.envs import base
from rlhf_jax.rewards import callback as callback_lib
from rlhf_jax.rewards import sandbox

ON_ERROR = ("raise", "observe")


@dataclasses.dataclass(frozen=True)
class ToolCall:
  """What a host tool sees for one row and turn.

  prompt: the decoded prompt; action: the decoded model turn (special tokens dropped);
  action_ids: its token ids; finished: whether the turn ended with the tokenizer's EOS;
  turn: the 0-based turn index; row: the batch row; extras: the `extras_keys` fields of
  the prompt batch, decoded.
  """
  prompt: str
  action: str
  action_ids: Tuple[int, ...]
  finished: bool
  turn: int
  row: int
  extras: Mapping[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class ToolResult:
  """A host tool's answer: the observation text, the turn's reward, whether it ends."""
  observation: str = ""
  reward: float = 0.0
  done: bool = False


@flax.struct.dataclass
class HostState:
  """prompt_ids, prompt_mask [B, P]; turn [B] int32; extras: {key: ids [B, E]}."""
  prompt_ids: jax.Array
  prompt_mask: jax.Array
  turn: jax.Array
  extras: Dict[str, jax.Array]


def _decode(tokenizer, ids, mask) -> str:
  return tokenizer.decode([int(i) for i in np.asarray(ids)[np.asarray(mask, bool)]])


def encode_lenient(tokenizer, text: str) -> list:
  """Encodes `text`, dropping characters the tokenizer refuses (error texts are free-form)."""
  try:
    return list(tokenizer.encode(text))
  except Exception:  # pylint: disable=broad-except
    out = []
    for ch in text:
      try:
        out.extend(tokenizer.encode(ch))
      except Exception:  # pylint: disable=broad-except
        continue
    return out


_MARKS = ("@@user@@", "@@assistant@@", "@@tool@@")
CHAT_ROLES = ("auto", "off")


def tool_turn_frame(tokenizer) -> Optional[Tuple[str, str, str]]:
  """How the tokenizer's chat template frames a tool result after an assistant turn:
  `(end_of_assistant, before_result, after_result)`, or None without a chat template.

  Rendering [user, assistant A, tool R] with the generation prompt gives
  `... A <end_of_assistant> <before_result> R <after_result>`, where `after_result` ends
  with the header that opens the next assistant turn. `end_of_assistant` is the
  template's end of the assistant turn (e.g. `<|im_end|>\n`): it is dropped when the
  model ended its turn with EOS itself (`tool_observation_text`). Raises EnvSpecError when
  the template has no `tool` role or does not render the turns in order.
  """
  template = getattr(tokenizer, "chat_template", None)
  if not template:
    return None
  user, assistant, tool = _MARKS
  msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": assistant},
          {"role": "tool", "content": tool}]
  try:
    full = tokenizer.apply_chat_template(msgs, add_generation_prompt=True)
  except Exception as e:  # pylint: disable=broad-except
    raise base.EnvSpecError(
        f"the tokenizer's chat template cannot render a 'tool' message ({type(e).__name__}: "
        f"{e}); set the environment's chat_roles='off' for plain observations") from None
  a, t = full.find(assistant), full.find(tool)
  if not 0 <= a < t:
    raise base.EnvSpecError("the tokenizer's chat template does not render [user, assistant, "
                            "tool] in order; set the environment's chat_roles='off'")
  between = full[a + len(assistant):t]
  eos = (tokenizer.special_tokens_map() or {}).get("eos_token") if hasattr(
      tokenizer, "special_tokens_map") else None
  end = between[:between.index(eos) + len(eos)] if eos and eos in between else ""
  if end and between[len(end):].startswith("\n"):
    end += "\n"
  return end, between[len(end):], full[t + len(tool):]


def tool_observation_text(frame: Optional[Tuple[str, str, str]], text: str, *,
                          ended_with_eos: bool) -> str:
  """The observation text of a tool result: `text` itself without a chat template, else
  the template's tool message around it (`tool_turn_frame`), preceded by the template's
  end of the assistant turn unless the model's turn ended with EOS.

  With an EOS-ended turn the newline that the template puts after the EOS token is kept,
  so the token stream equals the template's rendering of the conversation."""
  if frame is None:
    return text
  end, before, after = frame
  eos_tail = end[end.rfind("\n"):] if end.endswith("\n") else ""
  return (eos_tail if ended_with_eos else end) + before + text + after


@dataclasses.dataclass(frozen=True, eq=False)
class HostEnv:
  """A Python tool as an environment (see the module docstring). Hashed by identity.

  Attributes:
    tool: `tool(ToolCall) -> ToolResult` (a `(observation, reward, done)` tuple is
      accepted too).
    tokenizer: decodes prompts and turns, encodes observations.
    obs_tokens: O, the observation width.
    on_error: "raise" (HostToolError) or "observe" (the error text is the observation).
    timeout_s: per-call time limit of the tool (an overrun is an error).
    extras_keys: prompt-batch fields handed to the tool decoded (ids != pad, or the
      field `<key>_mask` when the batch has it).
    ordered: use an ordered host callback (calls run in program order).
    name: the tool's name in messages.
    chat_roles: "auto": when the tokenizer has a chat template, each observation is the
      template's `tool` message around the result, with the header of the next assistant
      turn (`tool_observation_text`); "off" (and tokenizers without a template): the
      result text alone.
  """
  tool: Callable[[ToolCall], Any]
  tokenizer: Any
  obs_tokens: int
  on_error: str = "raise"
  timeout_s: float = 10.0
  extras_keys: Tuple[str, ...] = ()
  ordered: bool = True
  name: str = "host tool"
  chat_roles: str = "auto"
  # Declared for the online step: its rollout calls the host from inside the decode loop,
  # which JAX cannot vmap (over seeds), so the step maps the seeds one after another.
  host_callbacks: ClassVar[bool] = True

  def __post_init__(self):
    if self.on_error not in ON_ERROR:
      raise base.EnvSpecError(f"{self.name}: on_error must be one of {ON_ERROR}, got "
                              f"{self.on_error!r}")
    if not self.timeout_s > 0:
      raise base.EnvSpecError(f"{self.name}: timeout_s must be > 0, got {self.timeout_s}")
    if not isinstance(self.obs_tokens, int) or self.obs_tokens < 1:
      raise base.EnvSpecError(f"{self.name}: obs_tokens must be a positive int, got "
                              f"{self.obs_tokens!r}")
    object.__setattr__(self, "extras_keys", tuple(self.extras_keys))
    if self.chat_roles not in CHAT_ROLES:
      raise base.EnvSpecError(f"{self.name}: chat_roles must be one of {CHAT_ROLES}, got "
                              f"{self.chat_roles!r}")
    object.__setattr__(self, "_frame", None if self.chat_roles == "off"
                       else tool_turn_frame(self.tokenizer))

  def reset(self, rng: jax.Array, prompt_batch: Mapping[str, jax.Array]):
    del rng
    ids = jnp.asarray(prompt_batch["prompt_ids"], jnp.int32)
    b = ids.shape[0]
    extras = {}
    pad = int(self.tokenizer.pad_id)
    for k in self.extras_keys:
      if k not in prompt_batch:
        raise base.EnvSpecError(f"{self.name} reads prompt_batch[{k!r}] (extras_keys), which "
                                f"the batch lacks; it has {sorted(prompt_batch)}")
      extras[k] = jnp.asarray(prompt_batch[k], jnp.int32).reshape(b, -1)
      m = prompt_batch.get(f"{k}_mask")
      extras[f"{k}_mask"] = (extras[k] != pad) if m is None else jnp.asarray(m).astype(
          bool).reshape(b, -1)
    state = HostState(prompt_ids=ids, prompt_mask=jnp.asarray(prompt_batch["prompt_mask"]).astype(
        bool), turn=jnp.zeros((b,), jnp.int32), extras=extras)
    return state, jnp.zeros((b, 0), jnp.int32), jnp.zeros((b, 0), bool)

  def step(self, state: HostState, action_ids: jax.Array, action_mask: jax.Array):
    n = action_ids.shape[0]
    o = self.obs_tokens
    shapes = (jax.ShapeDtypeStruct((n, o), jnp.int32), jax.ShapeDtypeStruct((n, o), jnp.bool_),
              jax.ShapeDtypeStruct((n,), jnp.float32), jax.ShapeDtypeStruct((n,), jnp.bool_))
    keys = tuple(sorted(state.extras))
    obs, obs_mask, reward, done = io_callback(
        functools.partial(self.host_step, keys), shapes, state.prompt_ids, state.prompt_mask,
        action_ids.astype(jnp.int32), action_mask.astype(bool), state.turn,
        *[state.extras[k] for k in keys], ordered=self.ordered)
    return state.replace(turn=state.turn + 1), obs, obs_mask, reward, done

  # -- host side ----------------------------------------------------------------------
  def host_step(self, extra_keys, prompt_ids, prompt_mask, action_ids, action_mask, turn,
                *extras):
    """Runs the tool for every row with a non-empty turn (numpy in, numpy out)."""
    tok, o = self.tokenizer, self.obs_tokens
    pad = int(tok.pad_id)
    ex = dict(zip(extra_keys, extras))
    n = action_ids.shape[0]
    obs = np.full((n, o), pad, np.int32)
    obs_mask = np.zeros((n, o), bool)
    reward = np.zeros((n,), np.float32)
    done = np.zeros((n,), bool)
    eos = getattr(tok, "eos_id", None)
    for r in range(n):
      am = np.asarray(action_mask[r], bool)
      if not am.any():
        continue
      act = [int(i) for i in np.asarray(action_ids[r])[am]]
      call = ToolCall(
          prompt=_decode(tok, prompt_ids[r], prompt_mask[r]), action=tok.decode(act),
          action_ids=tuple(act), finished=eos is not None and act[-1] == eos,
          turn=int(turn[r]), row=r,
          extras={k: _decode(tok, ex[k][r], ex[f"{k}_mask"][r]) for k in extra_keys
                  if not k.endswith("_mask")})
      status, value = callback_lib.run_with_timeout(self.tool, (call,), self.timeout_s)
      if status == "ok":
        try:
          res = value if isinstance(value, ToolResult) else ToolResult(*value)
          text, rew, dn = str(res.observation), float(res.reward), bool(res.done)
        except (TypeError, ValueError) as e:
          status, value = "error", e
      if status != "ok":
        why = (f"exceeded timeout_s={self.timeout_s}" if status == "timeout"
               else f"raised {type(value).__name__}: {value}")
        if self.on_error == "raise":
          raise base.HostToolError(
              f"HostToolError: {self.name} {why} on row {r} (turn {int(turn[r])}); set "
              "on_error='observe' to return the error text as the observation instead")
        text, rew, dn = f"error: {why.replace('raised ', '')}", 0.0, False
      ids = encode_lenient(tok, tool_observation_text(self._frame, text,  # pylint: disable=no-member
                                                      ended_with_eos=call.finished))
      if len(ids) > o:
        warnings.warn(f"{self.name}: observation of {len(ids)} tokens on row {r} is longer "
                      f"than obs_tokens={o}; keeping its first {o} tokens",
                      base.ObservationTruncatedWarning, stacklevel=2)
        ids = ids[:o]
      obs[r, :len(ids)] = ids
      obs_mask[r, :len(ids)] = True
      reward[r], done[r] = rew, dn
    return obs, obs_mask, reward, done


# ----------------------------------------------------------------------------- built-in tools

_CALL = re.compile(r"<calc>(.*)</calc>$", re.DOTALL)
_EXPR = re.compile(r"(\d+)\s*([+\-*])\s*(\d+)")


def python_calculator(call: ToolCall) -> ToolResult:
  """The calculator task in Python: `<calc>expr</calc>` -> the value; else the answer.

  A turn ending in `<calc>expr</calc>` is a tool call: `expr` (digits, + - * / and
  parentheses; `rlhf_jax.data.synthetic.eval_arithmetic`) is evaluated and its value is
  the observation; an expression that does not evaluate raises ValueError (the env's
  `on_error` decides). Any other turn ends the episode with reward 1 iff it is exactly
  the prompt's value followed by EOS.
  """
  m = _CALL.search(call.action)
  if m is not None:
    value, _ = synthetic.eval_arithmetic(m.group(1))
    return ToolResult(observation=str(value))
  found = _EXPR.findall(call.prompt)
  target = None
  if found:
    a, op, b = int(found[-1][0]), found[-1][1], int(found[-1][2])
    target = {"+": a + b, "-": a - b, "*": a * b}[op]
  correct = target is not None and call.finished and call.action == str(target)
  return ToolResult(observation="", reward=float(correct), done=True)


def code_runner(tests_key: str = "tests", *, timeout_s: float = 5.0,
                memory_mb: int = 1024) -> Callable[[ToolCall], ToolResult]:
  """A tool running each turn's code against the row's tests (`extras[tests_key]`).

  The code is the turn's last ```python block (else the whole turn); it runs in
  `rlhf_jax.rewards.sandbox`. The observation is `"passed k/n"` (plus the first error
  line); the episode ends with reward 1 once every test passes, else the turn's reward is 0.
  """
  rx = re.compile(r"```(?:python)?\n(.*?)```", re.DOTALL)

  def tool(call: ToolCall) -> ToolResult:
    tests = call.extras.get(tests_key)
    if tests is None:
      raise ValueError(f"code_runner needs the tests in extras[{tests_key!r}]; add "
                       f"{tests_key!r} to the environment's extras_keys")
    blocks = rx.findall(call.action)
    res = sandbox.run_tests(blocks[-1] if blocks else call.action, tests, timeout_s=timeout_s,
                            memory_mb=memory_mb)
    solved = res.total > 0 and res.passed == res.total
    text = f"passed {res.passed}/{res.total}"
    if res.error and not solved:
      text += f" {res.error.splitlines()[0] if res.error.splitlines() else ''}"
    return ToolResult(observation=text, reward=float(solved), done=solved)
  tool.__name__ = "code_runner"
  return tool


def tool_name(tool: Callable) -> str:
  return getattr(tool, "__name__", type(tool).__name__)


def make_host_env(tool: Callable[[ToolCall], Any], tokenizer, *, obs_tokens: int,
                  on_error: str = "raise", timeout_s: float = 10.0,
                  extras_keys: Sequence[str] = (), ordered: bool = True,
                  name: Optional[str] = None, chat_roles: str = "auto") -> HostEnv:
  """A `HostEnv` around `tool` (named after the tool unless `name` is given)."""
  return HostEnv(tool=tool, tokenizer=tokenizer, obs_tokens=obs_tokens, on_error=on_error,
                 timeout_s=timeout_s, extras_keys=tuple(extras_keys), ordered=ordered,
                 name=name or tool_name(tool), chat_roles=chat_roles)
