"""Reward-function interface: jnp verifiers, Python callbacks, LM judge, combinators."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.rewards import base, callback, judge, verifiers

DECODE = callback.char_decode()


@pytest.fixture(autouse=True)
def _strict_ranks():
  with jax.numpy_rank_promotion("raise"):
    yield


def _pad(texts, width):
  ids = np.zeros((len(texts), width), np.int32)
  mask = np.zeros((len(texts), width), bool)
  for i, t in enumerate(texts):
    ids[i, :len(t)] = [ord(c) for c in t]
    mask[i, :len(t)] = True
  return jnp.asarray(ids), jnp.asarray(mask)


PROMPTS, PROMPT_MASK = _pad(["q1", "q2", "q3", "q4"], 3)


def test_exact_match_and_format_checks_in_jit():
  comp, cmask = _pad(["42", "41", "42!", "4"], 5)
  ans, amask = _pad(["42", "41", "42", "42"], 3)
  extras = {"answer_ids": ans, "answer_mask": amask}
  em = jax.jit(verifiers.exact_match())
  np.testing.assert_array_equal(em(PROMPTS, comp, cmask, extras), [1, 1, 0, 0])
  # With "!" as eos the third completion matches (tokens after eos are ignored).
  em_eos = jax.jit(verifiers.exact_match(eos_id=ord("!")))
  np.testing.assert_array_equal(em_eos(PROMPTS, comp, cmask, extras), [1, 1, 1, 0])
  # Padding invariance: garbage under the mask changes nothing.
  noisy = jnp.where(cmask, comp, 7)
  np.testing.assert_array_equal(em(PROMPTS, noisy, cmask, extras), [1, 1, 0, 0])
  ln = jax.jit(verifiers.length_in_range(min_len=2, max_len=2))
  np.testing.assert_array_equal(ln(PROMPTS, comp, cmask, {}), [1, 1, 0, 0])
  ct = jax.jit(verifiers.contains_tokens([ord("4"), ord("!")]))
  np.testing.assert_array_equal(ct(PROMPTS, comp, cmask, {}), [0, 0, 1, 0])
  with pytest.raises(KeyError, match="answer_ids"):
    verifiers.exact_match()(PROMPTS, comp, cmask, {})
  with pytest.raises(ValueError, match="completion_mask"):
    verifiers.exact_match()(PROMPTS, comp, cmask[:, :2], extras)


def test_exact_match_ignoring_filler_tokens_against_python():
  texts = ["..42", "4.2!..", "42...", "..41", "....", "42", ".4.2.x", "42!4", ".", "24."]
  answers = ["42"] * len(texts)
  comp, cmask = _pad(texts, 7)
  ans, amask = _pad(answers, 3)
  extras = {"answer_ids": ans, "answer_mask": amask}
  em = jax.jit(verifiers.exact_match(eos_id=ord("!"), ignore_ids=[ord(".")]))
  # Reference: cut at the first "!", delete every ".", compare the strings.
  ref = [float(t.split("!")[0].replace(".", "") == a) for t, a in zip(texts, answers)]
  np.testing.assert_array_equal(em(PROMPTS[:1].repeat(len(texts), 0), comp, cmask, extras), ref)
  assert ref == [1, 1, 1, 0, 0, 1, 0, 1, 0, 0]
  # Garbage (even filler ids) under the mask changes nothing.
  noisy = jnp.where(cmask, comp, ord("."))
  np.testing.assert_array_equal(em(PROMPTS[:1].repeat(len(texts), 0), noisy, cmask, extras), ref)
  # Without ignore_ids the same inputs are plain exact match.
  plain = jax.jit(verifiers.exact_match(eos_id=ord("!")))
  np.testing.assert_array_equal(plain(PROMPTS[:1].repeat(len(texts), 0), comp, cmask, extras),
                                [float(t.split("!")[0] == a) for t, a in zip(texts, answers)])
  ids, keep = verifiers.drop_tokens(comp, cmask, [ord(".")])
  for row, k, t in zip(np.asarray(ids), np.asarray(keep), texts):
    assert "".join(chr(c) for c in row[k]) == t.replace(".", "")
  with pytest.raises(ValueError, match="eos_id"):
    verifiers.exact_match(eos_id=ord("!"), ignore_ids=[ord("!")])


def test_math_answer_checker_batch_in_jit():
  comp, cmask = _pad(["so the answer is \\boxed{\\frac{1}{2}}", "x = 3, answer: 0.5",
                      "I think 7", "\\boxed{12}", "no idea"], 40)
  ans, amask = _pad(["1/2", "1/2", "8", "12.0", "3"], 5)
  prompts = jnp.zeros((5, 2), jnp.int32)
  fn = callback.python_verifier(callback.math_answer_check, decode=DECODE)

  @jax.jit
  def step(c, m, a, am):
    return fn(prompts, c, m, {"answer_ids": a, "answer_mask": am}) * 2.0
  np.testing.assert_array_equal(step(comp, cmask, ans, amask), [2, 2, 0, 2, 0])
  assert callback.extract_answer("#### 1,234") == "1,234"
  assert callback.math_answer_check("\\boxed{1,234}", "1234") == 1.0


def _raises(c, a):
  raise RuntimeError("boom")


def _sleeps(c, a):
  time.sleep(30)
  return 1.0


def test_failing_and_hanging_verifiers_error_or_fallback():
  comp, cmask = _pad(["a", "b"], 2)
  p = jnp.zeros((2, 1), jnp.int32)
  bad = jax.jit(callback.python_verifier(_raises, decode=DECODE, answer_key=None))
  with pytest.raises(Exception, match="raised RuntimeError: boom.*fallback"):
    jax.block_until_ready(bad(p, comp, cmask, {}))
  ok = jax.jit(callback.python_verifier(_raises, decode=DECODE, answer_key=None, fallback=-1.0))
  np.testing.assert_array_equal(ok(p, comp, cmask, {}), [-1, -1])
  t0 = time.time()
  slow = jax.jit(callback.python_verifier(_sleeps, decode=DECODE, answer_key=None,
                                          timeout_s=0.2, fallback=0.5))
  np.testing.assert_array_equal(slow(p, comp, cmask, {}), [0.5, 0.5])
  hang = jax.jit(callback.python_verifier(_sleeps, decode=DECODE, answer_key=None,
                                          timeout_s=0.2))
  with pytest.raises(Exception, match="timeout_s=0.2"):
    jax.block_until_ready(hang(p, comp, cmask, {}))
  assert time.time() - t0 < 25  # the check sleeps 30 s per row: no row waited it out


def test_regex_and_code_tests():
  comp, cmask = _pad(["<think>x</think>42", "42"], 20)
  p = jnp.zeros((2, 1), jnp.int32)
  fmt = jax.jit(callback.python_verifier(callback.regex_check(r"<think>.*</think>\d+", full=True),
                                         decode=DECODE, answer_key=None))
  np.testing.assert_array_equal(fmt(p, comp, cmask, {}), [1, 0])
  good = "```python\ndef f(x):\n  return 2 * x\n```"
  tests = "assert f(2) == 4"
  assert callback.code_tests_check(timeout_s=10)(good, tests) == 1.0
  assert callback.run_code_tests("def f(x): return x", tests, timeout_s=10) == 0.0
  # The fraction of tests that pass; code that does not finish loading passes none.
  assert callback.code_tests_check(timeout_s=10)(good, tests + "\nassert f(3) == 7") == 0.5
  assert callback.run_code_tests("while True: pass", "assert True", timeout_s=1) == 0.0
  net = "import socket\nsocket.create_connection(('127.0.0.1', 9))"
  assert callback.run_code_tests(net, "assert True", timeout_s=10) == 0.0


def test_lm_judge_matches_manual_packing():
  vocab, yes, no = 16, 3, 4
  table = jnp.asarray(np.random.default_rng(0).normal(size=(vocab, vocab)), jnp.float32)

  def logits_fn(ids, mask):  # a "bigram LM": next-token logits depend on the current token
    return table[ids] * mask[..., None]

  prompts = jnp.array([[0, 5, 6], [7, 8, 9]], jnp.int32)   # left-padded prompt (pad 0)
  comp = jnp.array([[10, 11, 0], [12, 0, 0]], jnp.int32)
  cmask = comp != 0
  fn = jax.jit(judge.lm_judge(logits_fn, prefix_ids=[1], middle_ids=[2], suffix_ids=[13, 14],
                              yes_id=yes, no_id=no))
  got = fn(prompts, comp, cmask, {})
  # Packed rows end in suffix token 14 for both; the score reads logits after it.
  lp = jax.nn.log_softmax(table[14])
  np.testing.assert_allclose(got, [lp[yes] - lp[no]] * 2, rtol=1e-5)
  ids, mask, n = judge.pack_segments([prompts, comp], [prompts != 0, cmask])
  np.testing.assert_array_equal(ids, [[5, 6, 10, 11, 0, 0], [7, 8, 9, 12, 0, 0]])
  np.testing.assert_array_equal(n, [4, 4])
  prob = judge.lm_judge(logits_fn, prefix_ids=[1], middle_ids=[], suffix_ids=[14], yes_id=yes,
                        no_id=no, probability=True)(prompts, comp, cmask, {})
  np.testing.assert_allclose(prob, jax.nn.sigmoid(lp[yes] - lp[no]), rtol=1e-5)


def test_combine_and_from_model():
  comp, cmask = _pad(["42", "41"], 3)
  ans, amask = _pad(["42", "42"], 2)
  extras = {"answer_ids": ans, "answer_mask": amask}
  rm = base.from_model(lambda prm, p, c, m, e: prm["w"] * jnp.sum(m, 1), {"w": 0.5})
  both = jax.jit(base.combine([verifiers.exact_match(), rm], [2.0, 1.0]))
  np.testing.assert_allclose(both(PROMPTS[:2], comp, cmask, extras), [3.0, 1.0])
  stacked = base.combine([verifiers.exact_match(), rm], stack=True)(PROMPTS[:2], comp, cmask,
                                                                    extras)
  assert stacked.shape == (2, 2)
  with pytest.raises(ValueError, match="weights"):
    base.combine([rm], [1.0, 2.0])
  # No gradient flows into the wrapped reward model's params.
  g = jax.grad(lambda w: base.from_model(lambda prm, p, c, m, e: prm * jnp.sum(m, 1), w)(
      PROMPTS[:2], comp, cmask, {}).sum())(1.0)
  assert float(g) == 0.0


def test_truncate_at_eos_and_terminated_padding_invariance():
  comp, cmask = _pad(["ab!c", "abc", "!x", "a!!"], 5)
  eos = ord("!")
  want = np.array([[1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0]], bool)
  tr = jax.jit(lambda c, m: verifiers.truncate_at_eos(c, m, eos))
  np.testing.assert_array_equal(tr(comp, cmask), want)
  # an eos hidden under the mask (padding) is ignored
  np.testing.assert_array_equal(tr(jnp.where(cmask, comp, eos), cmask), want)
  np.testing.assert_array_equal(verifiers.truncate_at_eos(comp, cmask, None), cmask)
  term = jax.jit(verifiers.terminated(eos))
  np.testing.assert_array_equal(term(PROMPTS, comp, cmask, {}), [1, 0, 1, 1])
  np.testing.assert_array_equal(term(PROMPTS, jnp.where(cmask, comp, eos), cmask, {}),
                                [1, 0, 1, 1])
