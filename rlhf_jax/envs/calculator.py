"""`calculator`: arithmetic prompts answered with the help of an in-program calculator tool.

The prompt holds a binary expression such as `"23*45="`. In a turn the model may call
the tool with `<calc>A op B</calc>` (A, B decimal numbers of at most `max_digits`
digits, op one of `+ - *`); the turn ends at `</calc>` and the observation is the
result's digits (`"1035"`), or `"error"` when the call is malformed. Any other turn is
the final answer: the episode ends, with reward 1 iff the turn is exactly the result's
digits followed by EOS (0 otherwise, including a prompt without an expression). Parsing
and evaluation run over token ids inside the jitted program (no host round trip).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Mapping, Tuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.envs import base

OPS = "+-*"


@flax.struct.dataclass
class CalculatorState:
  """target [B] int32 the prompt's value; valid [B] bool the prompt parsed; turn [B] int32."""
  target: jax.Array
  valid: jax.Array
  turn: jax.Array


def _last_expression(ids, mask, digits, op_ids, max_digits):
  """(value, ok) of the last `A op B` among each row's real tokens (ids [N, L])."""
  _, is_digit = base.digit_values(ids, digits)
  is_digit = is_digit & mask
  is_op = jnp.any(ids[..., None] == op_ids, axis=-1) & mask
  pos = jnp.arange(ids.shape[1])[None, :]
  op_pos = jnp.max(jnp.where(is_op, pos, -1), axis=1)
  left_start = 1 + jnp.max(jnp.where(~is_digit & (pos < op_pos[:, None]), pos, -1), axis=1)
  right_end = jnp.min(jnp.where(~is_digit & (pos > op_pos[:, None]), pos, ids.shape[1]), axis=1)
  a, ok_a = base.number_in_span(ids, digits, left_start, op_pos, max_digits)
  b, ok_b = base.number_in_span(ids, digits, op_pos + 1, right_end, max_digits)
  op = jnp.argmax(jnp.take_along_axis(ids, jnp.maximum(op_pos, 0)[:, None], axis=1)
                  == op_ids[None, :], axis=1)
  return _apply(op, a, b), (op_pos >= 0) & ok_a & ok_b


def _apply(op, a, b):
  return jnp.select([op == 0, op == 1], [a + b, a - b], a * b).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class CalculatorEnv:
  """The calculator environment over token ids (see the module docstring).

  Build it with `rlhf_jax.envs.make("calculator", tokenizer, ...)`; the fields are the
  token ids it reads and writes.
  """
  obs_tokens: int
  digits: Tuple[int, ...]
  op_ids: Tuple[int, ...]
  open_ids: Tuple[int, ...]
  close_ids: Tuple[int, ...]
  error_ids: Tuple[int, ...]
  eos_id: int
  pad_id: int
  max_digits: int = 4

  @classmethod
  def build(cls, tokenizer, *, obs_tokens: int, max_digits: int = 4) -> "CalculatorEnv":
    what = "calculator environment"
    if not 1 <= max_digits <= 4:
      raise base.EnvSpecError(f"{what}: max_digits must be in 1..4 (results must fit int32), "
                              f"got {max_digits}")
    need = max(2 * max_digits, max_digits + 1, len("error"))
    if obs_tokens < need:
      raise base.EnvSpecError(f"{what}: obs_tokens={obs_tokens} cannot hold a result of "
                              f"{max_digits}-digit operands ({need} tokens); raise obs_tokens")
    digits = base.digit_ids(tokenizer, what)
    for c in OPS:
      if base.char_ids(tokenizer, c, what).shape != (1,):
        raise base.EnvSpecError(f"{what} needs {c!r} to be one token")
    ops = tuple(int(base.char_ids(tokenizer, c, what)[0]) for c in OPS)
    return cls(obs_tokens=obs_tokens, digits=tuple(int(d) for d in digits), op_ids=ops,
               open_ids=tuple(base.char_ids(tokenizer, "<calc>", what).tolist()),
               close_ids=tuple(base.char_ids(tokenizer, "</calc>", what).tolist()),
               error_ids=tuple(base.char_ids(tokenizer, "error", what).tolist()),
               eos_id=int(tokenizer.eos_id), pad_id=int(tokenizer.pad_id),
               max_digits=max_digits)

  def reset(self, rng: jax.Array, prompt_batch: Mapping[str, jax.Array]):
    """Reads each prompt's last `A op B`; no first observation ([B, 0])."""
    del rng
    ids = jnp.asarray(prompt_batch["prompt_ids"], jnp.int32)
    mask = jnp.asarray(prompt_batch["prompt_mask"]).astype(bool)
    target, ok = _last_expression(ids, mask, jnp.asarray(self.digits), jnp.asarray(self.op_ids),
                                  self.max_digits)
    b = ids.shape[0]
    state = CalculatorState(target=target, valid=ok, turn=jnp.zeros((b,), jnp.int32))
    return state, jnp.zeros((b, 0), jnp.int32), jnp.zeros((b, 0), bool)

  def step(self, state: CalculatorState, action_ids: jax.Array, action_mask: jax.Array):
    """A `<calc>..</calc>` turn gets the result (or "error"); any other turn is the answer."""
    ids = action_ids.astype(jnp.int32)
    mask = action_mask.astype(bool)
    width = ids.shape[1]
    length = jnp.sum(mask, axis=1, dtype=jnp.int32)
    digits, op_ids = jnp.asarray(self.digits), jnp.asarray(self.op_ids)
    close, opn = np.asarray(self.close_ids), np.asarray(self.open_ids)
    call_end = length - len(close)
    start = base.last_match_start(ids, call_end, opn)
    is_call = base.ends_with(ids, length, close) & (start >= 0)
    # The expression fills [start + len(<calc>), call_end): exactly one operator.
    lo = start + len(opn)
    pos = jnp.arange(width)[None, :]
    inside = (pos >= lo[:, None]) & (pos < call_end[:, None])
    is_op = jnp.any(ids[..., None] == op_ids, axis=-1) & inside
    op_pos = jnp.argmax(is_op, axis=1).astype(jnp.int32)
    a, ok_a = base.number_in_span(ids, digits, lo, op_pos, self.max_digits)
    b, ok_b = base.number_in_span(ids, digits, op_pos + 1, call_end, self.max_digits)
    op = jnp.argmax(jnp.take_along_axis(ids, op_pos[:, None], axis=1) == op_ids[None, :], axis=1)
    expr_ok = (jnp.sum(is_op, axis=1) == 1) & ok_a & ok_b
    result = _apply(op, a, b)
    minus = self.op_ids[1]
    res_ids, res_mask = base.number_tokens(result, digits, minus, self.obs_tokens, self.pad_id)
    err_ids, err_mask = base.pad_rows([self.error_ids], self.obs_tokens, self.pad_id)
    obs_ids = jnp.where(expr_ok[:, None], res_ids, jnp.asarray(err_ids))
    obs_mask = jnp.where(expr_ok[:, None], res_mask, jnp.asarray(err_mask)) & is_call[:, None]
    obs_ids = jnp.where(obs_mask, obs_ids, self.pad_id)
    # Final answer: the target's digits, then EOS, and nothing else.
    ans_ids, ans_mask = base.number_tokens(state.target, digits, minus, width, self.pad_id)
    n_ans = jnp.sum(ans_mask, axis=1, dtype=jnp.int32)
    expect = jnp.where(pos < n_ans[:, None], ans_ids, self.eos_id)
    correct = (state.valid & (length == n_ans + 1)
               & jnp.all(~(pos <= n_ans[:, None]) | (ids == expect), axis=1))
    done = ~is_call
    reward = jnp.where(done & correct, 1.0, 0.0).astype(jnp.float32)
    return (state.replace(turn=state.turn + 1), obs_ids.astype(jnp.int32),
            obs_mask, reward, done)


def prompts(n: int, *, seed: int = 0, digits_a: Tuple[int, int] = (2, 3),
            digits_b: Tuple[int, int] = (1, 2), ops: str = "*+") -> List[Dict[str, Any]]:
  """`n` prompt records {"prompt": "23*45=", "answer": "1035"} for the calculator env.

  Operand A has between digits_a[0] and digits_a[1] digits, B between digits_b[0] and
  digits_b[1]; the operator is drawn from `ops`.
  """
  for op in ops:
    if op not in OPS:
      raise ValueError(f"calculator prompts: operator {op!r} is not one of {OPS!r}")
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    na, nb = (int(rng.integers(d[0], d[1] + 1)) for d in (digits_a, digits_b))
    a = int(rng.integers(10 ** (na - 1) if na > 1 else 0, 10 ** na))
    b = int(rng.integers(10 ** (nb - 1) if nb > 1 else 0, 10 ** nb))
    op = ops[int(rng.integers(len(ops)))]
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    out.append({"prompt": f"{a}{op}{b}=", "answer": str(value)})
  return out
