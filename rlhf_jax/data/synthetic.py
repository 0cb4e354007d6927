"""Built-in synthetic tasks with exact verifiers and deterministic, seeded generators.

* `ArithmeticTask`: "123+456=" -> "579"; reward 1.0 iff the completion is the exact result.
* `CountdownTask`: "make 24 from 3 4 6 1:" -> "(6-3+1)*...": reward 1.0 iff the expression
  uses exactly the given numbers (each once) with + - * / and parentheses and equals the target.
* `PreferenceTask`: strings over a small alphabet with the known reward
  r(y) = count(y, target) - length_penalty * len(y); pairs (chosen, rejected) are labelled
  by r, with an optional label-flip rate epsilon.

Every generator is deterministic in (seed, split). Train and held-out ("test") examples
are disjoint: an example's split is a stable hash (crc32) of its prompt, not a draw.
All texts use only characters of `CharTokenizer`.
"""

from __future__ import annotations

import ast
import fractions
import re
import zlib
from collections import Counter
from typing import Any

import numpy as np

SPLITS = ("train", "test")
_SPLIT_IDS = {"train": 0, "test": 1}


def split_of(prompt: str, test_fraction: float) -> str:
  """Stable split assignment from the prompt text."""
  return "test" if (zlib.crc32(prompt.encode()) % 10_000) < test_fraction * 10_000 else "train"


class _Task:
  """Rejection-samples `_sample(rng)` until the prompt falls in the requested split."""

  name = "task"
  test_fraction = 0.1

  def _sample(self, rng: np.random.Generator) -> dict[str, Any]:
    raise NotImplementedError

  def score(self, prompt: str, completion: str) -> float:
    raise NotImplementedError

  def generate(self, n: int, *, seed: int = 0, split: str = "train") -> list[dict[str, Any]]:
    """n examples of `split` ("train" or "test"), identical for identical (seed, split)."""
    if split not in SPLITS:
      raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if n < 0:
      raise ValueError(f"n must be >= 0, got {n}")
    if not 0.0 < self.test_fraction < 1.0:
      raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction}")
    rng = np.random.default_rng([seed, _SPLIT_IDS[split], zlib.crc32(self.name.encode())])
    out, tries = [], 0
    while len(out) < n:
      tries += 1
      if tries > 1000 * (n + 10):
        raise RuntimeError(f"{self.name}: could not generate {n} {split} examples; the task "
                           "space is too small (increase digits/alphabet/lengths)")
      ex = self._sample(rng)
      if split_of(ex["prompt"], self.test_fraction) == split:
        out.append(ex)
    return out


_INT = re.compile(r"^\s*(-?\d+)\s*$")


class ArithmeticTask(_Task):
  """Multi-digit arithmetic: prompt "a<op>b=", answer the exact integer result.

  Args:
    num_digits: operands have exactly this many digits (1 allows 0..9).
    op: "+", "-" or "*".
  """

  def __init__(self, *, num_digits: int = 3, op: str = "+", test_fraction: float = 0.1):
    if op not in ("+", "-", "*"):
      raise ValueError(f"op must be '+', '-' or '*', got {op!r}")
    if num_digits < 1:
      raise ValueError(f"num_digits must be >= 1, got {num_digits}")
    self.num_digits, self.op, self.test_fraction = num_digits, op, test_fraction
    self.name = f"arithmetic{op}{num_digits}"
    self._prompt_re = re.compile(r"^(\d+)([+\-*])(\d+)=$")

  def _sample(self, rng):
    lo = 0 if self.num_digits == 1 else 10 ** (self.num_digits - 1)
    a, b = (int(x) for x in rng.integers(lo, 10 ** self.num_digits, size=2))
    prompt = f"{a}{self.op}{b}="
    answer = str(self._solve(prompt))
    return {"prompt": prompt, "answer": answer, "completion": answer}

  def _solve(self, prompt: str) -> int:
    m = self._prompt_re.match(prompt)
    if m is None:
      raise ValueError(f"not an arithmetic prompt (expected 'a+b='): {prompt!r}")
    a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
    return {"+": a + b, "-": a - b, "*": a * b}[op]

  def score(self, prompt: str, completion: str) -> float:
    """1.0 iff `completion` (whitespace-stripped) is exactly the integer result, else 0.0."""
    m = _INT.match(completion)
    return float(m is not None and int(m.group(1)) == self._solve(prompt))


_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b,
        ast.Mult: lambda a, b: a * b, ast.Div: lambda a, b: a / b}


def eval_arithmetic(expr: str) -> tuple[fractions.Fraction, list[int]]:
  """Evaluates + - * / ( ) over non-negative integer literals exactly.

  Returns (value, literals used). Raises ValueError on anything else (names, unary minus,
  powers, floats) and ZeroDivisionError on division by zero.
  """
  if not re.fullmatch(r"[\d+\-*/() ]+", expr):
    raise ValueError(f"expression has characters other than digits, + - * / ( ): {expr!r}")
  tree = ast.parse(expr, mode="eval").body
  nums: list[int] = []

  def ev(node):
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
      return _OPS[type(node.op)](ev(node.left), ev(node.right))
    if isinstance(node, ast.Constant) and type(node.value) is int:
      nums.append(node.value)
      return fractions.Fraction(node.value)
    raise ValueError(f"unsupported syntax in {expr!r}: {type(node).__name__}")

  return ev(tree), nums


class CountdownTask(_Task):
  """Countdown: combine the given numbers (each exactly once) with + - * / to hit the target.

  Prompt "make T from n1 n2 n3:"; the stored `completion` is one valid solution.
  """

  def __init__(self, *, num_numbers: int = 3, max_number: int = 9, max_target: int = 100,
               test_fraction: float = 0.1):
    if num_numbers < 2:
      raise ValueError(f"num_numbers must be >= 2, got {num_numbers}")
    self.num_numbers, self.max_number, self.max_target = num_numbers, max_number, max_target
    self.test_fraction = test_fraction
    self.name = f"countdown{num_numbers}"
    self._prompt_re = re.compile(r"^make (\d+) from (\d+(?: \d+)*):$")

  def _sample(self, rng):
    while True:
      nums = [int(x) for x in rng.integers(1, self.max_number + 1, size=self.num_numbers)]
      items = [str(x) for x in nums]
      while len(items) > 1:  # random binary tree over a random order
        i, j = sorted(rng.choice(len(items), size=2, replace=False))
        right, left = items.pop(j), items.pop(i)
        op = "+-*/"[int(rng.integers(4))]
        items.append(f"({left}{op}{right})")
      expr = items[0][1:-1]
      try:
        value, _ = eval_arithmetic(expr)
      except ZeroDivisionError:
        continue
      if value.denominator == 1 and 1 <= value <= self.max_target:
        target = int(value)
        prompt = f"make {target} from {' '.join(map(str, nums))}:"
        return {"prompt": prompt, "answer": str(target), "numbers": nums, "completion": expr}

  def parse_prompt(self, prompt: str) -> tuple[int, list[int]]:
    m = self._prompt_re.match(prompt)
    if m is None:
      raise ValueError(f"not a countdown prompt (expected 'make T from a b c:'): {prompt!r}")
    return int(m.group(1)), [int(x) for x in m.group(2).split()]

  def score(self, prompt: str, completion: str) -> float:
    """1.0 iff the completion (text before any '=') uses exactly the prompt's numbers and
    evaluates exactly to the target; 0.0 for any other or unparsable completion."""
    target, nums = self.parse_prompt(prompt)
    expr = completion.split("=")[0].strip()
    try:
      value, used = eval_arithmetic(expr)
    except (ValueError, SyntaxError, ZeroDivisionError, RecursionError):
      return 0.0
    return float(Counter(used) == Counter(nums) and value == target)


class PreferenceTask(_Task):
  """Preference pairs with a known reward r(y) = count(y, target) - length_penalty * len(y).

  Prompts are random strings over `alphabet` ending in ">"; completions are random strings
  of length in [min_len, max_len]. Each pair has distinct true rewards; chosen has the
  higher one, except that with probability `flip_rate` the labels are swapped
  (`flipped=True`), modelling label noise epsilon.

  `user_targets` (e.g. "ab"): a population of users with different preferences. Each
  record gets a uniformly drawn `user_id` u and is labelled by user u's reward, which
  counts `user_targets[u]` instead of `target` (latent-user reward models such as VPL).
  """

  def __init__(self, *, alphabet: str = "abcd", target: str = "a", length_penalty: float = 0.25,
               min_len: int = 1, max_len: int = 8, prompt_len: int = 6,
               flip_rate: float = 0.0, test_fraction: float = 0.1, user_targets: str = ""):
    if target not in alphabet or len(target) != 1:
      raise ValueError(f"target must be one letter of alphabet={alphabet!r}, got {target!r}")
    bad = [u for u in user_targets if u not in alphabet]
    if bad or len(set(user_targets)) != len(user_targets):
      raise ValueError(f"user_targets must be distinct letters of alphabet={alphabet!r}, got "
                       f"{user_targets!r}")
    self.user_targets = "".join(user_targets)
    if not 0.0 <= flip_rate <= 1.0:
      raise ValueError(f"flip_rate must be in [0, 1], got {flip_rate}")
    if not 1 <= min_len <= max_len:
      raise ValueError(f"need 1 <= min_len <= max_len, got {min_len}, {max_len}")
    self.alphabet, self.target, self.length_penalty = alphabet, target, length_penalty
    self.min_len, self.max_len, self.prompt_len = min_len, max_len, prompt_len
    self.flip_rate, self.test_fraction = flip_rate, test_fraction
    self.name = f"preference_{alphabet}_{target}"

  def reward(self, completion: str, user: int | None = None) -> float:
    """The ground-truth reward of a completion (for `user`, with `user_targets`)."""
    target = self.target if user is None else self.user_targets[user]
    return completion.count(target) - self.length_penalty * len(completion)

  def score(self, prompt: str, completion: str) -> float:
    del prompt  # the reward depends on the completion only
    return self.reward(completion.strip())

  def _string(self, rng, n):
    return "".join(self.alphabet[int(i)] for i in rng.integers(len(self.alphabet), size=n))

  def _sample(self, rng):
    prompt = self._string(rng, self.prompt_len) + ">"
    user = int(rng.integers(len(self.user_targets))) if self.user_targets else None
    while True:
      a, b = (self._string(rng, int(rng.integers(self.min_len, self.max_len + 1)))
              for _ in range(2))
      ra, rb = self.reward(a, user), self.reward(b, user)
      if abs(ra - rb) > 1e-9:
        break
    if ra < rb:
      a, b, ra, rb = b, a, rb, ra
    flipped = bool(rng.random() < self.flip_rate)
    if flipped:
      a, b, ra, rb = b, a, rb, ra
    rec = {"prompt": prompt, "chosen": a, "rejected": b, "chosen_reward": ra,
           "rejected_reward": rb, "flipped": flipped}
    if user is not None:
      rec["user_id"] = user
    return rec


TASKS = {"arithmetic": ArithmeticTask, "countdown": CountdownTask, "preference": PreferenceTask}


def make_task(name: str, **kwargs) -> _Task:
  """Builds a synthetic task by name ("arithmetic", "countdown", "preference")."""
  if name not in TASKS:
    raise ValueError(f"unknown synthetic task {name!r}; choose one of {sorted(TASKS)}")
  return TASKS[name](**kwargs)
