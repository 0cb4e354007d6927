"""The built-in rewards of the registry (`rlhf_jax.rewards.registry`); keys in `docs/rewards.md`.

In jit: `exact_match`, `terminated`, `length_penalty`, `overlong`, `reward_model`.
On the host (one `jax.pure_callback` per step): `math_answer`, `regex`, `format`,
`code_tests`, `python` (any `fn(prompts, completions, **fields) -> list[float]` by
import path).
"""

from __future__ import annotations

import concurrent.futures
import math
import numbers
import os
import re
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import config_utils
from rlhf_jax.rewards import base, callback, shaping, verifiers
from rlhf_jax.rewards.registry import (HostBatch, RewardContext, RewardError, host_reward,
                                       prompt_text, register, register_text_scorer,
                                       score_rows, with_needs)

# A reasoning-format check: a <think> block, then an <answer> block, nothing else.
FORMAT_PATTERN = r"^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$"


def _lengths(completion_mask: jax.Array) -> jax.Array:
  """Generated tokens per row (the EOS included), float32 [N]."""
  return jnp.sum(completion_mask.astype(jnp.float32), axis=1)


def _answer(record: Mapping[str, Any], who: str) -> str:
  answer = record.get("answer")
  if answer is None:
    raise ValueError(f"{who} needs the record's 'answer'; this record has none "
                     f"(keys: {sorted(record)})")
  return str(answer)


# ----------------------------------------------------------------------------- in jit

def _ignored_ids(tok, ignore: str):
  if not isinstance(ignore, str):
    raise ValueError(f"reward 'exact_match': ignore must be a string of characters, got "
                     f"{ignore!r}")
  ids = []
  for ch in ignore:
    try:
      enc = list(tok.encode(ch))
    except ValueError as e:
      raise ValueError(f"reward 'exact_match': ignore={ignore!r} has {ch!r}, which the "
                       f"tokenizer cannot encode ({e})") from e
    if len(enc) != 1:
      raise ValueError(f"reward 'exact_match': ignore={ignore!r} has {ch!r}, which is "
                       f"{len(enc)} tokens; list characters that are one token each")
    ids.append(int(enc[0]))
  return ids


@register("exact_match", needs=("answer_ids",), verifier=True)
def exact_match(ctx: RewardContext, ignore: str = "") -> base.RewardFn:
  """1 iff the completion's tokens before EOS equal `answer_ids` (in jit).

  `ignore`: characters (one token each) removed from the completion before comparing,
  e.g. "." for filler tokens whose count is free (graded by the answer alone)."""
  tok = ctx.tokenizer
  return verifiers.exact_match(pad_id=tok.pad_id, eos_id=tok.eos_id,
                               ignore_ids=_ignored_ids(tok, ignore))


@register_text_scorer("exact_match")
def _exact_match_text(ctx: RewardContext, ignore: str = ""):
  _ignored_ids(ctx.tokenizer, ignore)  # the same check as the in-jit reward
  drop = str.maketrans("", "", ignore)
  return lambda record, text: float(
      text.translate(drop).strip() == _answer(record, "exact_match").strip())


@register("terminated")
def terminated(ctx: RewardContext) -> base.RewardFn:
  """1 iff the completion contains EOS (was not cut off by max_new_tokens)."""
  return verifiers.terminated(ctx.tokenizer.eos_id)


@register("length_penalty")
def length_penalty(ctx: RewardContext, *, coef: float,
                   max_length: Optional[int] = None) -> base.RewardFn:
  """−coef·L, or −coef·L/max_length; L = generated tokens (EOS included)."""
  del ctx
  if not isinstance(coef, (int, float)) or coef < 0:
    raise ValueError(f"reward 'length_penalty': coef must be a number >= 0, got {coef!r}")
  if max_length is not None and (not isinstance(max_length, int) or max_length <= 0):
    raise ValueError(f"reward 'length_penalty': max_length must be a positive int or None, "
                     f"got {max_length!r}")

  def fn(prompt_ids, completion_ids, completion_mask, batch_extras):
    del batch_extras
    base.check_reward_inputs(prompt_ids, completion_ids, completion_mask)
    return shaping.length_penalty(_lengths(completion_mask), coef=coef, max_length=max_length)
  return fn


@register("overlong")
def overlong(ctx: RewardContext, *, cache_length: int,
             max_length: Optional[int] = None) -> base.RewardFn:
  """DAPO soft overlong punishment over L = generated tokens (EOS included)."""
  max_length = ctx.max_new_tokens if max_length is None else max_length
  if not (isinstance(cache_length, int) and isinstance(max_length, int)
          and 0 < cache_length <= max_length):
    raise ValueError(f"reward 'overlong' needs integers 0 < cache_length <= max_length, got "
                     f"cache_length={cache_length!r}, max_length={max_length!r} (max_length "
                     "defaults to sampling.max_new_tokens)")

  def fn(prompt_ids, completion_ids, completion_mask, batch_extras):
    del batch_extras
    base.check_reward_inputs(prompt_ids, completion_ids, completion_mask)
    return shaping.overlong_penalty(_lengths(completion_mask), max_length=max_length,
                                    cache_length=cache_length)
  return fn


@register("reward_model")
def reward_model(ctx: RewardContext, *, path: str) -> base.RewardFn:
  """A trained reward model (transformers *ForSequenceClassification safetensors, e.g. the
  offline loop's `export_hf`) scoring prompt + completion inside the step."""
  from rlhf_jax import models  # pylint: disable=import-outside-toplevel
  if not isinstance(path, str) or not path:
    raise ValueError(f"reward 'reward_model' needs 'path', a safetensors directory; got {path!r}")
  model, params = models.load_hf(path, head="reward", require_score=True)
  vocab = ctx.tokenizer.vocab_size
  if model.config.vocab_size < vocab:
    raise ValueError(f"reward model {path} has vocab_size={model.config.vocab_size} but the "
                     f"run's tokenizer has {vocab} ids; score with a reward model trained "
                     "with the same tokenizer")
  return base.reward_model(model, params)


# ----------------------------------------------------------------------------- host: text checks

@register("math_answer", needs=("records",), host=True, verifier=True)
def math_answer(ctx: RewardContext) -> base.RewardFn:
  """1 iff the completion's final answer (`\\boxed{}`, `#### n`, "answer is", last number)
  equals the record's "answer" numerically (else as normalised text). Without a record
  table the answer is the decoded `answer_ids`."""
  who = "math_answer"

  def score(batch: HostBatch):
    answers = batch.answers
    for i, a in enumerate(answers):
      if a is None:
        raise RewardError(f"{who} needs an answer; {batch.where(i)} has none")
    return score_rows(batch, callback.math_answer_check, [str(a) for a in answers], who=who)
  fn = host_reward(ctx, score, who=who, answers="required")
  return fn if ctx.records is not None else with_needs(fn, ("answer_ids",))


@register_text_scorer("math_answer")
def _math_answer_text(ctx: RewardContext):
  del ctx
  return lambda record, text: callback.math_answer_check(text, _answer(record, "math_answer"))


def _regex(who: str, pattern: Any, full: bool):
  if not isinstance(pattern, str):
    raise ValueError(f"reward {who!r}: pattern must be a regular expression string, "
                     f"got {pattern!r}")
  try:
    return callback.regex_check(pattern, full=bool(full))
  except re.error as e:
    raise ValueError(f"reward {who!r}: pattern {pattern!r} does not compile: {e}") from None


@register("regex", host=True, verifier=True)
def regex(ctx: RewardContext, *, pattern: str, full: bool = False) -> base.RewardFn:
  """1 iff `pattern` matches the completion text (re.search, or re.fullmatch with full;
  DOTALL)."""
  check = _regex("regex", pattern, full)
  return host_reward(ctx, lambda b: score_rows(b, check, [None] * b.size, who="regex"),
                     who="regex", use_records=False)


@register_text_scorer("regex")
def _regex_text(ctx: RewardContext, *, pattern: str, full: bool = False):
  del ctx
  check = _regex("regex", pattern, full)
  return lambda record, text: check(text, None)


@register("format", host=True)
def format_(ctx: RewardContext, *, pattern: str = FORMAT_PATTERN,
            full: bool = False) -> base.RewardFn:
  """`regex` with a default pattern: `<think>...</think>` then `<answer>...</answer>`."""
  check = _regex("format", pattern, full)
  return host_reward(ctx, lambda b: score_rows(b, check, [None] * b.size, who="format"),
                     who="format", use_records=False)


# ----------------------------------------------------------------------------- host: code tests

def _tests(record: Mapping[str, Any], key: str) -> str:
  if record.get(key) is None:
    raise ValueError(f"code_tests reads the tests from the record field {key!r} (tests_key); "
                     f"this record has none (keys: {sorted(record)})")
  tests = record[key]
  return tests if isinstance(tests, str) else "\n".join(str(t) for t in tests)


@register("code_tests", needs=("records",), host=True, verifier=True)
def code_tests(ctx: RewardContext, *, tests_key: str = "tests", timeout_s: float = 5.0,
               workers: Optional[int] = None) -> base.RewardFn:
  """The fraction of the record's tests (asserts) that the completion's last ```python block
  (or its whole text) passes in the code sandbox (`rewards/sandbox.py`); `workers` rows run
  at once."""
  if ctx.records is None:
    raise ValueError("reward 'code_tests' reads its tests from the record table; build it "
                     "with RewardContext(records=...)")
  if not isinstance(timeout_s, (int, float)) or timeout_s <= 0:
    raise ValueError(f"reward 'code_tests': timeout_s must be > 0, got {timeout_s!r}")
  workers = workers or min(8, os.cpu_count() or 1)
  check = callback.code_tests_check(timeout_s=float(timeout_s))

  def score(batch: HostBatch):
    tests = []
    for i, r in enumerate(batch.records):
      try:
        tests.append(_tests(r, tests_key))
      except ValueError as e:
        raise RewardError(f"{e} on {batch.where(i)}") from None
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
      futures = [pool.submit(check, c, t) for c, t in zip(batch.completions, tests)]
    out = np.zeros(batch.size, np.float32)
    for i, f in enumerate(futures):
      try:
        out[i] = float(f.result())
      except Exception as e:  # pylint: disable=broad-except
        raise RewardError(f"code_tests: {type(e).__name__}: {e} on {batch.where(i)}") from e
    return out
  return host_reward(ctx, score, who="code_tests")


@register_text_scorer("code_tests")
def _code_tests_text(ctx: RewardContext, *, tests_key: str = "tests", timeout_s: float = 5.0,
                     workers: Optional[int] = None):
  del ctx, workers
  check = callback.code_tests_check(timeout_s=float(timeout_s))
  return lambda record, text: check(text, _tests(record, tests_key))


# ----------------------------------------------------------------------------- host: python

def _load_function(path: Any, who: str = "python") -> Callable:
  """"pkg.module:function" (or "pkg.module.function") -> the function; ValueError naming
  the path and the import error when it does not import."""
  return config_utils.import_function(path, f"reward {who!r}: fn")


def _is_number(v) -> bool:
  return (isinstance(v, (numbers.Real, np.number, np.bool_))
          and not isinstance(v, np.complexfloating))


def _check_output(out: Any, n: int, path: str, where: Callable[[int], str]) -> np.ndarray:
  """A python reward's return value -> float32 [n]; errors name the function and the row."""
  expect = f"expected a list of N={n} finite floats, shape [N]"
  head = f"python reward {path!r}"
  if isinstance(out, (np.ndarray, jax.Array)):
    if np.ndim(out) != 1:
      raise RewardError(f"{head} returned an array of shape {np.shape(out)}; {expect}")
    values = list(np.asarray(out))
  elif isinstance(out, (list, tuple)):
    values = list(out)
  else:
    kind = "a scalar" if _is_number(out) else f"a {type(out).__name__}"
    raise RewardError(f"{head} returned {kind} ({out!r:.80}); {expect}")
  if len(values) != n:
    raise RewardError(f"{head} returned {len(values)} values for {n} completions; {expect}")
  result = np.zeros(n, np.float32)
  for i, v in enumerate(values):
    if not _is_number(v):
      raise RewardError(f"{head} returned {v!r:.80} ({type(v).__name__}) on {where(i)}, not a "
                        f"number; {expect}")
    if not math.isfinite(float(v)):
      raise RewardError(f"{head} returned {float(v)} on {where(i)}; {expect}")
    result[i] = float(v)
  return result


def _call_python(fn: Callable, path: str, prompts: List[str], completions: List[str],
                fields: Mapping[str, List[Any]], where: Callable[[int], str]) -> np.ndarray:
  """fn(prompts, completions, **fields), checked; when the batch call raises, the rows are
  tried one by one to name the first that raises on its own."""
  n = len(completions)
  try:
    out = fn(prompts, completions, **fields)
  except Exception as e:  # pylint: disable=broad-except
    msg = (f"python reward {path!r} raised {type(e).__name__}: {e} on a batch of N={n} rows "
           "(expected a list of N finite floats, shape [N]); ")
    for i in range(n):
      try:
        fn(prompts[i:i + 1], completions[i:i + 1], **{k: v[i:i + 1] for k, v in fields.items()})
      except Exception as e_i:  # pylint: disable=broad-except
        raise RewardError(msg + f"{where(i)} raises on its own ({type(e_i).__name__}: {e_i}); "
                          f"prompt {prompts[i]!r:.80}, completion {completions[i]!r:.80}") from e
    raise RewardError(msg + "no single row raises on its own") from e
  return _check_output(out, n, path, where)


# Keys of a loaded record that are not dataset fields (the prompt is passed on its own).
_INTERNAL_KEYS = ("prompt", "prompt_ids", "_origin")


def _record_fields(records: Sequence[Mapping[str, Any]]) -> Dict[str, List[Any]]:
  keys: Dict[str, None] = {}
  for r in records:
    keys.update(dict.fromkeys(k for k in r if k not in _INTERNAL_KEYS))
  return {k: [r.get(k) for r in records] for k in keys}


@register("python", needs=("records",), host=True, verifier=True)
def python(ctx: RewardContext, *, fn: str) -> base.RewardFn:
  """Any `fn(prompts: list[str], completions: list[str], **fields) -> list[float]`, given
  as "module:function"; fields are the record's other keys ("answer", ...), one value per
  row. Without a record table, prompts are the decoded prompt_ids and the only field is
  "answer" (the decoded answer_ids, when the batch has them)."""
  path, user_fn = fn, _load_function(fn)

  def score(batch: HostBatch):
    if batch.records is not None:
      fields = _record_fields(batch.records)
    else:
      fields = {"answer": batch.answers} if batch.has_answers else {}
    return _call_python(user_fn, path, batch.prompts, batch.completions, fields, batch.where)
  out = host_reward(ctx, score, who=f"python reward {path!r}", answers="optional")
  return out if ctx.records is not None else with_needs(out, ())


@register_text_scorer("python")
def _python_text(ctx: RewardContext, *, fn: str):
  path, user_fn = fn, _load_function(fn)

  def score(record: Mapping[str, Any], text: str) -> float:
    fields = {k: [v] for k, v in record.items() if k not in _INTERNAL_KEYS}
    prompt = prompt_text(ctx, record.get("prompt", ""))
    return float(_call_python(user_fn, path, [prompt], [text], fields, lambda i: "the record")[0])
  return score
