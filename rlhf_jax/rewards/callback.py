"""Python verifiers over decoded text, run from inside `jit` via `jax.pure_callback`.

`python_verifier(check, decode=...)` builds a reward function: on the host, each
row's valid completion tokens (and the answer tokens, when `answer_key` is set)
are decoded with `decode(list[int]) -> str`, then `check(completion_text,
answer_text) -> float` scores it. Every call has a time limit (a daemon thread,
so a stuck check never blocks the step or interpreter exit); a check that
raises or times out yields `fallback` when one is configured, otherwise a
`VerifierError` naming the row and the cause.

Checks provided: `math_answer_check`, `regex_check`, `code_tests_check`.
`code_tests_check` / `run_code_tests` score generated code by the fraction of
its tests that pass in `rlhf_jax.rewards.sandbox` (the code runs alone in a
process without network, capabilities or a writable file system, with
resource limits; the tests run in another process that sees only the data the
code returns, so exiting early or patching the interpreter passes nothing);
`sandbox.run_tests` also says which limit was hit.
"""

from __future__ import annotations

import queue
import re
import threading
from fractions import Fraction
from typing import Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.losses.common import check_positive
from rlhf_jax.rewards import sandbox
from rlhf_jax.rewards.base import RewardFn, check_reward_inputs, get_extra


class VerifierError(RuntimeError):
  """A Python verifier raised or exceeded its time limit and no fallback was set."""


def run_with_timeout(fn: Callable, args: tuple, timeout_s: float):
  """Run `fn(*args)` in a daemon thread; return ("ok", value) / ("error", exc) / ("timeout", None)."""
  out: queue.Queue = queue.Queue(maxsize=1)

  def target():
    try:
      out.put(("ok", fn(*args)))
    except BaseException as e:  # pylint: disable=broad-except
      out.put(("error", e))

  threading.Thread(target=target, daemon=True).start()
  try:
    return out.get(timeout=timeout_s)
  except queue.Empty:
    return ("timeout", None)


def _rows(ids: np.ndarray, mask: Optional[np.ndarray]) -> list:
  ids = np.asarray(ids)
  mask = np.ones(ids.shape, bool) if mask is None else np.asarray(mask).astype(bool)
  return [ids[i][mask[i]].tolist() for i in range(ids.shape[0])]


def score_texts(check: Callable[[str, Optional[str]], float], completions: Sequence[str],
                answers: Sequence[Optional[str]], *, timeout_s: float,
                fallback: Optional[float]) -> np.ndarray:
  """Host-side scoring loop shared by the callback (also usable outside jit)."""
  out = np.zeros(len(completions), np.float32)
  for i, (c, a) in enumerate(zip(completions, answers)):
    status, value = run_with_timeout(check, (c, a), timeout_s)
    if status == "ok":
      try:
        out[i] = float(value)
        continue
      except (TypeError, ValueError) as e:
        status, value = "error", e
    if fallback is None:
      why = (f"exceeded timeout_s={timeout_s}" if status == "timeout"
             else f"raised {type(value).__name__}: {value}")
      raise VerifierError(f"verifier {getattr(check, '__name__', check)!r} {why} on row {i}; "
                          "pass fallback=<reward> to score such rows instead of failing")
    out[i] = fallback
  return out


def python_verifier(check: Callable[[str, Optional[str]], float], *,
                    decode: Callable[[list], str], answer_key: Optional[str] = "answer_ids",
                    answer_mask_key: str = "answer_mask", pad_id: int = 0,
                    timeout_s: float = 5.0, fallback: Optional[float] = None) -> RewardFn:
  """Reward function scoring decoded text with a Python `check` via `jax.pure_callback`.

  Args:
    check: `check(completion_text, answer_text_or_None) -> float`.
    decode: token ids (list[int]) -> str, e.g. a tokenizer's decode.
    answer_key: batch_extras key of the answer ids [N, A] (None: no answer).
    answer_mask_key: key of the answer mask (else `ids != pad_id`).
    timeout_s: per-row time limit.
    fallback: reward for rows whose check raises or times out; None = raise
      `VerifierError` (surfaces from the jitted call as a runtime error).

  Returns:
    fn(prompt_ids, completion_ids, completion_mask, batch_extras) -> [N] float32.
  """
  check_positive("python_verifier", timeout_s=timeout_s)

  def host(completion_ids, completion_mask, *answer):
    comps = [decode(r) for r in _rows(completion_ids, completion_mask)]
    if answer:
      answers = [decode(r) for r in _rows(*answer)]
    else:
      answers = [None] * len(comps)
    return score_texts(check, comps, answers, timeout_s=timeout_s, fallback=fallback)

  def fn(prompt_ids, completion_ids, completion_mask, batch_extras):
    check_reward_inputs(prompt_ids, completion_ids, completion_mask)
    args = [completion_ids, completion_mask.astype(bool)]
    if answer_key is not None:
      ans = get_extra(batch_extras, answer_key, "python_verifier")
      m = batch_extras.get(answer_mask_key) if batch_extras else None
      args += [ans, (ans != pad_id) if m is None else m.astype(bool)]
    out = jax.ShapeDtypeStruct((completion_ids.shape[0],), jnp.float32)
    return jax.pure_callback(host, out, *args, vmap_method="sequential")
  return fn


# ----------------------------------------------------------------------------- checks

_BOXED = re.compile(r"\\boxed\s*\{")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")
_ANSWER_IS = re.compile(r"(?:answer is|answer:|####)\s*([^\n]+)", re.IGNORECASE)


def _boxed(text: str) -> Optional[str]:
  """Content of the last \\boxed{...} (balanced braces), or None."""
  starts = [m.end() for m in _BOXED.finditer(text)]
  if not starts:
    return None
  i, depth = starts[-1], 1
  for j in range(i, len(text)):
    depth += {"{": 1, "}": -1}.get(text[j], 0)
    if depth == 0:
      return text[i:j]
  return None


def extract_answer(text: str) -> Optional[str]:
  """Final answer of a solution: last \\boxed{}, else after "answer is"/"####", else last number."""
  b = _boxed(text)
  if b is not None:
    return b.strip()
  m = _ANSWER_IS.findall(text)
  if m:
    return m[-1].strip().rstrip(".")
  nums = _NUMBER.findall(text)
  return nums[-1] if nums else None


def _to_number(s: str) -> Optional[Fraction]:
  s = s.strip().strip("$ ").replace(",", "").replace("\\!", "")
  s = re.sub(r"\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}", r"(\1)/(\2)", s)
  s = s.replace("(", "").replace(")", "").rstrip(".").rstrip("%")
  try:
    if "/" in s:
      n, d = s.split("/", 1)
      return Fraction(n.strip()) / Fraction(d.strip())
    return Fraction(s)
  except (ValueError, ZeroDivisionError):
    return None


def _normalise(s: str) -> str:
  return re.sub(r"\s+|\\text\{|\}|\{|\$|\\left|\\right|\.$", "", s).lower()


def math_answer_check(completion: str, answer: Optional[str]) -> float:
  """1.0 iff the extracted final answer equals `answer` (numerically, else as text)."""
  if answer is None:
    raise ValueError("math_answer_check needs an answer; set answer_key")
  pred = extract_answer(completion)
  if pred is None:
    return 0.0
  ref = extract_answer(answer) or answer
  a, b = _to_number(pred), _to_number(ref)
  if a is not None and b is not None:
    return float(a == b)
  return float(_normalise(pred) == _normalise(ref))


def regex_check(pattern: str, *, full: bool = False) -> Callable[[str, Optional[str]], float]:
  """Check 1.0 iff `pattern` matches the completion (`re.fullmatch` if full, else search)."""
  rx = re.compile(pattern, re.DOTALL)

  def check(completion: str, answer: Optional[str]) -> float:
    del answer
    return float(bool((rx.fullmatch if full else rx.search)(completion)))
  check.__name__ = f"regex_check({pattern!r})"
  return check


def run_code_tests(code: str, tests: str, *, timeout_s: float = 5.0,
                   memory_mb: int = 1024) -> float:
  """Fraction of `tests` (Python asserts) that pass against `code`, run in the sandbox.

  Each top-level `assert` of `tests` is one test (without any, each top-level
  expression statement such as `check(candidate)` is); a test counts only if
  the judge process sees it pass (`sandbox.run_tests`). Code that does not
  load, crashes, exceeds `timeout_s` or `memory_mb` passes nothing after that
  point; no tests at all scores 0.0.
  """
  return sandbox.run_tests(code, tests, timeout_s=timeout_s, memory_mb=memory_mb).score


def code_tests_check(*, timeout_s: float = 5.0,
                     code_pattern: str = r"```(?:python)?\n(.*?)```"
                     ) -> Callable[[str, Optional[str]], float]:
  """Check: the last code block (or the whole text) scored by `run_code_tests` on the answer.

  Returns the fraction of the answer's tests that pass. Use with
  `python_verifier(..., answer_key=<tests ids>, timeout_s=<this timeout_s + a few seconds>)`
  (the sandbox adds process start-up, about 0.2 s a row).
  """
  rx = re.compile(code_pattern, re.DOTALL)

  def check(completion: str, tests: Optional[str]) -> float:
    if tests is None:
      raise ValueError("code_tests_check needs tests as the answer; set answer_key")
    blocks = rx.findall(completion)
    return run_code_tests(blocks[-1] if blocks else completion, tests, timeout_s=timeout_s)
  check.__name__ = "code_tests_check"
  return check


def char_decode(vocab: Mapping[int, str] | None = None) -> Callable[[list], str]:
  """A trivial decoder (id -> chr(id), or a vocab lookup) for tests and toy tasks."""
  if vocab is None:
    return lambda ids: "".join(chr(i) for i in ids)
  return lambda ids: "".join(vocab[i] for i in ids)
