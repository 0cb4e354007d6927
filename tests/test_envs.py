"""Environments: reset/step of the JAX envs (calculator, guess_number), the EnvSpec and
`make` errors, stop strings, and host tools (agreement with the JAX calculator, both
`on_error` modes through the jitted host callback, observation clipping)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import envs
from rlhf_jax.data.tokenizer import CharTokenizer
from rlhf_jax.envs import base

TOK = CharTokenizer()
EOS = TOK.eos_id


def _actions(texts, width, eos_rows=()):
  seqs = [TOK.encode(t) + ([EOS] if i in eos_rows else []) for i, t in enumerate(texts)]
  return base.pad_rows(seqs, width, TOK.pad_id)


def _text(ids, mask):
  return TOK.decode(np.asarray(ids)[np.asarray(mask, bool)], skip_special_tokens=False)


def _rows(state, n):
  """The first row of `state` repeated n times."""
  return jax.tree.map(lambda x: jnp.repeat(x[:1], n, axis=0), state)


# ----------------------------------------------------------------------------- calculator


def test_calculator_reset_parses_prompts():
  env, spec = envs.make("calculator", TOK)
  assert spec.stop_sequences == (tuple(TOK.encode("</calc>")), (EOS,))
  batch = envs.prompt_batch(TOK, [{"prompt": "23*45="}, {"prompt": "What is 7+8?"},
                                  {"prompt": "hello"}, {"prompt": "120-7="}])
  state, obs, obs_mask = jax.jit(env.reset)(jax.random.key(0), batch)
  np.testing.assert_array_equal(np.asarray(state.target)[[0, 1, 3]], [1035, 15, 113])
  np.testing.assert_array_equal(state.valid, [True, True, False, True])
  assert obs.shape == obs_mask.shape == (4, 0)


def test_calculator_step_answers_tool_calls_and_scores_answers():
  env, spec = envs.make("calculator", TOK)
  batch = envs.prompt_batch(TOK, [{"prompt": "23*45="}])
  state, _, _ = jax.jit(env.reset)(jax.random.key(0), batch)
  acts = ["<calc>23*45</calc>", "<calc>999*9999</calc>", "<calc>3-45</calc>",
          "<calc>12+3</calc>", "<calc>2x3</calc>", "<calc>2*3*4</calc>", "<calc></calc>",
          "1035", "1035", "1036", "<calc>23*45"]
  ids, mask = _actions(acts, spec.turn_tokens + 4, eos_rows=(7, 9))
  new, obs, obs_mask, reward, done = jax.jit(env.step)(_rows(state, len(acts)), ids, mask)
  texts = [_text(obs[i], obs_mask[i]) for i in range(len(acts))]
  assert texts == ["1035", "9989001", "-42", "15", "error", "error", "error", "", "", "", ""]
  # Tool calls go on; anything else is the final answer: exact digits then EOS.
  np.testing.assert_array_equal(done, [False] * 7 + [True] * 4)
  np.testing.assert_array_equal(reward, [0.0] * 7 + [1.0, 0.0, 0.0, 0.0])
  np.testing.assert_array_equal(new.turn, 1)
  assert obs.shape == (len(acts), spec.obs_tokens) and obs.dtype == jnp.int32


def test_calculator_prompts_are_solved_by_the_env():
  recs = envs.calculator.prompts(16, seed=3)
  env, spec = envs.make("calculator", TOK)
  state, _, _ = jax.jit(env.reset)(jax.random.key(0), envs.prompt_batch(TOK, recs))
  np.testing.assert_array_equal(state.target, [int(r["answer"]) for r in recs])
  ids, mask = _actions([r["answer"] for r in recs], spec.turn_tokens,
                       eos_rows=range(len(recs)))
  _, _, _, reward, done = jax.jit(env.step)(state, ids, mask)
  assert bool(jnp.all(done)) and bool(jnp.all(reward == 1.0))


# ----------------------------------------------------------------------------- guess_number


def test_guess_number_answers_higher_lower_correct():
  env, spec = envs.make("guess_number", TOK, max_value=16, turn_penalty=0.1)
  batch = envs.prompt_batch(TOK, [{"prompt": "guess 1-16:\n", "target": 7}], int_keys=["target"])
  state, _, _ = jax.jit(env.reset)(jax.random.key(0), batch)
  state = _rows(state, 5)
  ids, mask = _actions(["3\n", "9\n", "7", "x\n", "07\n"], spec.turn_tokens, eos_rows=(2,))
  state, obs, obs_mask, reward, done = jax.jit(env.step)(state, ids, mask)
  assert [_text(obs[i], obs_mask[i]) for i in range(5)] == [
      "higher\n", "lower\n", "correct\n", "invalid\n", "correct\n"]
  np.testing.assert_array_equal(done, [False, False, True, False, True])
  np.testing.assert_allclose(reward, [0, 0, 1, 0, 1])
  # Later turns are worth less: 1 - 0.1 * turn index.
  state = state.replace(turn=jnp.full((5,), 3, jnp.int32))
  _, _, _, reward, _ = jax.jit(env.step)(state, ids, mask)
  np.testing.assert_allclose(reward, [0, 0, 0.7, 0, 0.7], rtol=1e-6)


def test_guess_number_draws_targets_in_range_without_a_target_field():
  env, _ = envs.make("guess_number", TOK, max_value=5)
  batch = envs.prompt_batch(TOK, envs.guess_number.prompts(64, max_value=5))
  state, _, _ = jax.jit(env.reset)(jax.random.key(1), batch)
  t = np.asarray(state.target)
  assert t.min() >= 1 and t.max() <= 5 and len(set(t.tolist())) > 1


# ----------------------------------------------------------------------------- specs and make


def test_spec_and_make_errors():
  with pytest.raises(envs.EnvSpecError, match="max_turns must be a positive int.*at least one"):
    envs.EnvSpec(max_turns=0, turn_tokens=4, obs_tokens=4)
  with pytest.raises(envs.EnvSpecError, match="max_turns"):
    envs.make("calculator", TOK, max_turns=0)
  with pytest.raises(envs.EnvSpecError, match="turn_tokens"):
    envs.EnvSpec(max_turns=2, turn_tokens=0, obs_tokens=4)
  with pytest.raises(KeyError, match="unknown environment 'calculater'.*did you mean 'calculator'"):
    envs.make("calculater", TOK)
  with pytest.raises(envs.EnvSpecError, match="does not take 'max_turn'.*did you mean 'max_turns'"):
    envs.make("calculator", TOK, max_turn=3)
  with pytest.raises(envs.EnvSpecError, match="obs_tokens=4 cannot hold"):
    envs.make("calculator", TOK, obs_tokens=4)
  with pytest.raises(envs.EnvSpecError, match="'host' needs \\['tool'\\]"):
    envs.make("host", TOK)
  spec = envs.EnvSpec(max_turns=3, turn_tokens=5, obs_tokens=2, stop_sequences=[[4, 5], (7,)])
  assert spec.stop_sequences == ((4, 5), (7,)) and spec.completion_tokens == 3 * 5 + 2 * 2
  table, width = spec.stop_table()
  np.testing.assert_array_equal(table, [[4, 5], [-1, 7]])
  assert width == 2


class _MergingTokenizer:
  """Encodes "ab" as one token, so "b" alone has no fixed id sequence."""
  pad_id, eos_id = 0, 1

  def encode(self, text):
    out, i = [], 0
    while i < len(text):
      if text.startswith("ab", i):
        out.append(99)
        i += 2
      else:
        out.append(ord(text[i]))
        i += 1
    return out


def test_stop_strings():
  assert envs.stop_ids(TOK, ["</calc>", "\n"]) == (tuple(TOK.encode("</calc>")),
                                                    tuple(TOK.encode("\n")))
  with pytest.raises(envs.StopStringError, match="'`' .*cannot be encoded by CharTokenizer"):
    envs.stop_ids(TOK, ["`"])
  with pytest.raises(envs.StopStringError, match="non-empty"):
    envs.stop_ids(TOK, [""])
  with pytest.raises(envs.StopStringError, match="'b' has no fixed token sequence"):
    envs.stop_ids(_MergingTokenizer(), ["b"])
  with pytest.raises(envs.StopStringError):
    envs.make("host", TOK, tool=envs.python_calculator, stop_strings=["```"])


def test_number_helpers_round_trip():
  digits = jnp.asarray(base.digit_ids(TOK, "test"))
  values = jnp.asarray([0, 7, 10, 1035, -42, 99999999], jnp.int32)
  ids, mask = jax.jit(base.number_tokens, static_argnums=(2, 3, 4))(
      values, digits, TOK.encode("-")[0], 9, TOK.pad_id)
  assert [_text(ids[i], mask[i]) for i in range(6)] == ["0", "7", "10", "1035", "-42",
                                                          "99999999"]
  start = jnp.zeros(6, jnp.int32)
  got, ok = jax.jit(base.number_in_span, static_argnums=4)(ids, digits, start, jnp.sum(mask, 1),
                                                           8)
  np.testing.assert_array_equal(got[ok], [0, 7, 10, 1035, 99999999])
  np.testing.assert_array_equal(ok, [True, True, True, True, False, True])


# ----------------------------------------------------------------------------- host tools


def test_python_calculator_agrees_with_the_jax_calculator():
  jenv, spec = envs.make("calculator", TOK)
  henv, hspec = envs.make("host_calculator", TOK)
  assert hspec == spec
  recs = [{"prompt": "23*45="}, {"prompt": "7+8="}, {"prompt": "120-7="}]
  acts = ["<calc>23*45</calc>", "15", "<calc>3-45</calc>", "1035", "113", "<calc>999*9999</calc>"]
  batch = envs.prompt_batch(TOK, [recs[i % 3] for i in range(len(acts))])
  ids, mask = _actions(acts, spec.turn_tokens + 4, eos_rows=(1, 3))
  js, _, _ = jax.jit(jenv.reset)(jax.random.key(0), batch)
  hs, _, _ = jax.jit(henv.reset)(jax.random.key(0), batch)
  jout = jax.jit(jenv.step)(js, ids, mask)[1:]
  hout = jax.jit(henv.step)(hs, ids, mask)[1:]
  for a, b in zip(jout, hout):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(hout[2], [0, 1, 0, 1, 0, 0])  # row 4: wrong; 5: no EOS


def _failing_tool(call):
  if "boom" in call.action:
    raise ValueError("no 'boom' allowed")
  return envs.ToolResult(observation=f"ok{call.turn}", reward=0.5, done=call.turn >= 1)


@pytest.mark.parametrize("on_error", ["raise", "observe"])
def test_raising_host_tool(on_error):
  env, spec = envs.make("host", TOK, tool=_failing_tool, obs_tokens=40, on_error=on_error)
  batch = envs.prompt_batch(TOK, [{"prompt": "hi"}] * 3)
  state, _, _ = env.reset(jax.random.key(0), batch)
  ids, mask = _actions(["fine", "boom", ""], 8)
  step = jax.jit(env.step)
  if on_error == "raise":
    with pytest.raises(Exception, match=r"HostToolError: _failing_tool raised ValueError: no "
                                        r"'boom' allowed on row 1 \(turn 0\); set on_error="):
      jax.block_until_ready(step(state, ids, mask))
    return
  state, obs, obs_mask, reward, done = step(state, ids, mask)
  assert [_text(obs[i], obs_mask[i]) for i in range(3)] == [
      "ok0", "error: ValueError: no boom allowed", ""]   # quotes are not in the vocabulary
  np.testing.assert_array_equal(reward, [0.5, 0.0, 0.0])
  np.testing.assert_array_equal(done, [False, False, False])
  # A second turn: the tool sees turn 1 and ends the episode.
  _, obs, obs_mask, _, done = step(state, ids, mask)
  assert _text(obs[0], obs_mask[0]) == "ok1" and bool(done[0])


def test_host_tool_timeout_and_bad_result():
  import time

  def slow(call):
    time.sleep(2.0)
    return envs.ToolResult("late")
  env = envs.HostEnv(tool=slow, tokenizer=TOK, obs_tokens=40, on_error="observe", timeout_s=0.2)
  ids, mask = _actions(["x"], 4)
  out = env.host_step((), np.ones((1, 2), np.int32) * 5, np.ones((1, 2), bool), ids, mask,
                      np.zeros(1, np.int32))
  assert _text(out[0][0], out[1][0]) == "error: exceeded timeout_s=0.2"
  bad = envs.HostEnv(tool=lambda call: 3, tokenizer=TOK, obs_tokens=40, on_error="raise")
  with pytest.raises(envs.HostToolError, match="raised TypeError"):
    bad.host_step((), np.ones((1, 2), np.int32) * 5, np.ones((1, 2), bool), ids, mask,
                  np.zeros(1, np.int32))
  with pytest.raises(envs.EnvSpecError, match="on_error must be one of"):
    envs.HostEnv(tool=slow, tokenizer=TOK, obs_tokens=4, on_error="ignore")


def test_long_host_observation_is_clipped_with_a_warning():
  env = envs.HostEnv(tool=lambda call: envs.ToolResult("0123456789"), tokenizer=TOK,
                     obs_tokens=4)
  ids, mask = _actions(["x"], 4)
  with pytest.warns(envs.ObservationTruncatedWarning, match="10 tokens on row 0 is longer than "
                                                           "obs_tokens=4"):
    obs, obs_mask, _, _ = env.host_step((), np.ones((1, 2), np.int32) * 5, np.ones((1, 2), bool),
                                        ids, mask, np.zeros(1, np.int32))
  assert _text(obs[0], obs_mask[0]) == "0123"


def test_code_runner_tool_runs_the_turn_against_the_tests():
  tool = envs.code_runner("tests", timeout_s=5.0)
  call = envs.ToolCall(prompt="p", action="def f(x):\n  return x+1\n", action_ids=(),
                       finished=True, turn=0, row=0,
                       extras={"tests": "assert f(1) == 2\nassert f(2) == 4"})
  res = tool(call)
  assert res.observation.startswith("passed 1/2") and not res.done and res.reward == 0.0
  res = tool(dataclasses.replace(call, extras={"tests": "assert f(1) == 2"}))
  assert res == envs.ToolResult("passed 1/1", 1.0, True)
  env, spec = envs.make("code_runner", TOK)
  assert env.extras_keys == ("tests",) and spec.stop_sequences == ((EOS,),)
  with pytest.raises(envs.EnvSpecError, match="reads prompt_batch\\['tests'\\]"):
    env.reset(jax.random.key(0), envs.prompt_batch(TOK, [{"prompt": "p"}]))
