"""The reward registry: built-ins against hand-computed values under jit, weights, metric
names, Python functions by import path, the named errors, and the text scorers."""

from __future__ import annotations

import importlib
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import data as data_lib
from rlhf_jax import models
from rlhf_jax.rewards import base, registry
from rlhf_jax.rewards.registry import RewardContext, build_rewards, text_scorer

TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")
TOK = data_lib.CharTokenizer(chat_template=TEMPLATE)


@pytest.fixture(autouse=True)
def _strict_ranks():
  with jax.numpy_rank_promotion("raise"):
    yield


def _pad(texts, width, side="right"):
  """Texts ("<eos>" marks EOS) -> ids int32 [N, width], mask bool [N, width]."""
  ids, mask = data_lib.pad_sequences([TOK.encode(t) for t in texts], length=width,
                                     pad_id=TOK.pad_id, padding_side=side)
  return jnp.asarray(ids), jnp.asarray(mask.astype(bool))


def _batch(completions, *, prompts=None, answers=None, record_index=None, width=40):
  """Arrays and batch_extras for one call of a reward function."""
  n = len(completions)
  pids, pmask = _pad(prompts or ["q"] * n, 12, side="left")
  cids, cmask = _pad(completions, width)
  extras = {"prompt_mask": pmask}
  if answers is not None:
    extras["answer_ids"], extras["answer_mask"] = _pad(answers, 12)
  if record_index is not None:
    extras["record_index"] = jnp.asarray(record_index, jnp.int32)
  return pids, cids, cmask, extras


def _score(spec, completions, ctx=None, **batch):
  (reward,) = build_rewards([spec], ctx or RewardContext(TOK, max_new_tokens=40))
  return np.asarray(jax.jit(reward.fn)(*_batch(completions, **batch)))


def _module(tmp_path, monkeypatch, name, source):
  (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
  monkeypatch.syspath_prepend(str(tmp_path))
  return name


def test_builtins_are_registered_with_their_declarations():
  assert registry.names() == sorted(["exact_match", "math_answer", "regex", "format",
                                     "length_penalty", "overlong", "code_tests",
                                     "reward_model", "terminated", "python"])
  assert registry.decl("exact_match") == registry.RewardDecl("exact_match", ("answer_ids",),
                                                             host=False, verifier=True)
  assert registry.decl("math_answer").needs == ("records",)
  assert registry.decl("python").host and registry.decl("code_tests").host
  assert not registry.decl("overlong").host and not registry.decl("format").verifier


def test_in_jit_builtins_against_hand_computed_values():
  comps = ["42<eos>", "41<eos>", "42xx", "4<eos>"]  # lengths (EOS included) 3, 3, 4, 2
  ans = ["42"] * 4
  np.testing.assert_array_equal(_score("exact_match", comps, answers=ans), [1, 0, 0, 0])
  np.testing.assert_array_equal(_score("terminated", comps), [1, 1, 0, 1])
  np.testing.assert_allclose(_score({"name": "length_penalty", "coef": 0.5}, comps),
                             [-1.5, -1.5, -2.0, -1.0])
  np.testing.assert_allclose(
      _score({"name": "length_penalty", "coef": 1.0, "max_length": 4}, comps),
      [-0.75, -0.75, -1.0, -0.5])
  # max_length defaults to max_new_tokens=4: soft limit 4 - 2 = 2, (2 - L) / 2 above it.
  ctx4 = RewardContext(TOK, max_new_tokens=4)
  np.testing.assert_allclose(_score({"name": "overlong", "cache_length": 2}, comps, ctx4),
                             [-0.5, -0.5, -1.0, 0.0])
  np.testing.assert_allclose(
      _score({"name": "overlong", "cache_length": 1, "max_length": 4}, comps),
      [0.0, 0.0, -1.0, 0.0])


def test_exact_match_ignore_key_removes_filler_characters():
  comps = ["..42<eos>", "4.2..<eos>", "41..<eos>", "42<eos>", "..4x2<eos>"]
  spec = {"name": "exact_match", "ignore": "."}
  np.testing.assert_array_equal(_score(spec, comps, answers=["42"] * 5), [1, 1, 0, 1, 0])
  scorer = text_scorer(spec, RewardContext(TOK, 8))
  assert [scorer({"answer": "42"}, t) for t in ["..42", "4.2.", "41", "x42"]] == [1, 1, 0, 0]
  with pytest.raises(ValueError, match="ignore="):
    build_rewards([{"name": "exact_match", "ignore": "é"}], RewardContext(TOK, 8))
  with pytest.raises(ValueError, match="ignore must be a string"):
    build_rewards([{"name": "exact_match", "ignore": 46}], RewardContext(TOK, 8))


def test_weights_and_metric_names_are_unique():
  specs = ["exact_match", {"name": "exact_match", "weight": 0.5},
           {"name": "terminated", "label": "done"},
           {"name": "terminated", "label": "done", "weight": 2}]
  built = build_rewards(specs, RewardContext(TOK, max_new_tokens=8))
  assert [r.name for r in built] == ["exact_match", "exact_match_1", "done", "done_1"]
  assert [r.weight for r in built] == [1.0, 0.5, 1.0, 2.0]
  assert built[2].decl.name == "terminated"
  comps = ["42<eos>", "4"]
  batch = _batch(comps, answers=["42", "42"])
  total = base.combine([r.fn for r in built], [r.weight for r in built])
  np.testing.assert_allclose(jax.jit(total)(*batch), [1 + 0.5 + 1 + 2, 0.0])
  np.testing.assert_allclose(total(*batch), [1 + 0.5 + 1 + 2, 0.0])
  with pytest.raises(ValueError, match="weight must be a finite number"):
    build_rewards([{"name": "terminated", "weight": float("nan")}], RewardContext(TOK, 8))


def test_math_answer_reads_the_record_answer_and_ignores_text_after_eos():
  records = [{"prompt": "2+2?", "answer": "Two and two.\n#### 4"},
             {"prompt": "big?", "answer": "1000"}]
  ctx = RewardContext(TOK, max_new_tokens=40, records=records)
  (reward,) = build_rewards(["math_answer"], ctx)
  assert reward.decl.needs == ("records",) and reward.decl.host
  comps = ["so it is 4<eos>", "#### 4<eos>#### 5", "#### 1,000<eos>", "answer: 999<eos>"]
  got = _score("math_answer", comps, ctx, record_index=[0, 0, 1, 1])
  np.testing.assert_array_equal(got, [1, 1, 1, 0])
  # Without a record table: the decoded answer_ids, declared as needed.
  no_records = RewardContext(TOK, max_new_tokens=40)
  (fallback,) = build_rewards(["math_answer"], no_records)
  assert fallback.decl.needs == ("answer_ids",)
  got = _score("math_answer", comps, no_records, answers=["4", "4", "1000", "1000"])
  np.testing.assert_array_equal(got, [1, 1, 1, 0])
  bad = RewardContext(TOK, 40, records=[{"prompt": "x", "answer": None}])
  with pytest.raises(Exception, match=r"math_answer needs an answer; row 0 \(record 0\)"):
    _score("math_answer", ["1", "2"], bad, record_index=[0, 0])
  with pytest.raises(Exception, match=r"record_index 3 is outside the record table \(size 2\)"):
    _score("math_answer", ["1"], ctx, record_index=[3])


def test_regex_and_format():
  comps = ["<think>ab</think> <answer>4</answer><eos>", "the answer is 4<eos>",
           "<think>a</think><eos><answer>4</answer>"]
  np.testing.assert_array_equal(_score("format", comps), [1, 0, 0])
  np.testing.assert_array_equal(_score({"name": "regex", "pattern": r"\d"}, comps), [1, 1, 0])
  np.testing.assert_array_equal(
      _score({"name": "regex", "pattern": r"the answer is \d+", "full": True}, comps), [0, 1, 0])
  np.testing.assert_array_equal(_score({"name": "format", "pattern": "answer is"}, comps),
                                [0, 1, 0])
  with pytest.raises(ValueError, match=r"reward 'regex': pattern '\(' does not compile"):
    build_rewards([{"name": "regex", "pattern": "("}], RewardContext(TOK, 8))


def test_code_tests_runs_the_record_tests():
  records = [{"prompt": "double", "tests": ["assert f(2) == 4", "assert f(0) == 0"]},
             {"prompt": "other", "answer": "1"}]
  ctx = RewardContext(TOK, max_new_tokens=40, records=records)
  # x + 2 passes f(2) == 4 only: partial credit, the fraction of tests the sandbox saw pass
  comps = ["def f(x):\n  return 2*x<eos>", "def f(x):\n  return x+2<eos>"]
  spec = {"name": "code_tests", "timeout_s": 10.0}
  np.testing.assert_array_equal(_score(spec, comps, ctx, record_index=[0, 0]), [1, 0.5])
  with pytest.raises(Exception, match=r"record field 'tests'.*row 0 \(record 1\)"):
    _score(spec, comps[:1], ctx, record_index=[1])
  with pytest.raises(ValueError, match="code_tests' reads its tests from the record table"):
    build_rewards(["code_tests"], RewardContext(TOK, 8))


USER_REWARDS = """
    import math
    CALLS = []

    def score(prompts, completions, **fields):
      CALLS.append((list(prompts), list(completions), {k: list(v) for k, v in fields.items()}))
      levels = fields.get("level", [0] * len(completions))
      return [len(c) + 10 * lvl for c, lvl in zip(completions, levels)]

    def raises_on_b(prompts, completions, **fields):
      if any(c.startswith("b") for c in completions):
        raise ValueError("no b please")
      return [0.0] * len(completions)

    def wrong_length(prompts, completions, **fields):
      return [0.0]

    def scalar(prompts, completions, **fields):
      return 1.0

    def nan_on_bad(prompts, completions, **fields):
      return [math.nan if c == "bad" else 1.0 for c in completions]

    def text_on_bad(prompts, completions, **fields):
      return ["high" if c == "bad" else 1.0 for c in completions]
"""


def test_python_reward_gets_records_repeated_per_completion(tmp_path, monkeypatch):
  mod = _module(tmp_path, monkeypatch, "user_rewards_records", USER_REWARDS)
  records = [{"prompt": "hi", "answer": "4", "level": 1},
             {"prompt": [{"role": "user", "content": "yo"}], "answer": None, "level": 2}]
  ctx = RewardContext(TOK, max_new_tokens=40, records=records)
  spec = {"name": "python", "fn": f"{mod}:score", "weight": 0.5}
  (reward,) = build_rewards([spec], ctx)
  assert (reward.name, reward.weight, reward.decl.host) == ("python", 0.5, True)
  comps = ["ab<eos>xyz", "abc<eos>", "a", "<eos>"]  # G = 2 completions per record
  batch = _batch(comps, record_index=[0, 0, 1, 1])
  got = jax.jit(reward.fn)(*batch)
  np.testing.assert_array_equal(got, [12, 13, 21, 20])
  np.testing.assert_array_equal(reward.fn(*batch), got)  # and without jit
  prompts, completions, fields = importlib.import_module(mod).CALLS[-1]
  assert prompts == ["hi", "hi", "user: yo\nassistant:", "user: yo\nassistant:"]
  assert completions == ["ab", "abc", "a", ""]
  assert fields == {"answer": ["4", "4", None, None], "level": [1, 1, 2, 2]}


def test_python_reward_without_records_decodes_prompts_and_answers(tmp_path, monkeypatch):
  mod = _module(tmp_path, monkeypatch, "user_rewards_plain", USER_REWARDS)
  (reward,) = build_rewards([{"name": "python", "fn": f"{mod}.score"}],
                            RewardContext(TOK, max_new_tokens=40))
  assert reward.decl.needs == ()
  batch = _batch(["7<eos>", "77"], prompts=["1+6=", "7*11="], answers=["7", "77"])
  np.testing.assert_array_equal(jax.jit(reward.fn)(*batch), [1, 2])
  assert importlib.import_module(mod).CALLS[-1] == (["1+6=", "7*11="], ["7", "77"],
                                                    {"answer": ["7", "77"]})
  batch[3].pop("answer_ids")  # no answers in the batch: no fields
  jax.jit(reward.fn)(*batch)
  assert importlib.import_module(mod).CALLS[-1][2] == {}


def test_python_reward_errors_name_the_function_and_row(tmp_path, monkeypatch):
  mod = _module(tmp_path, monkeypatch, "user_rewards_errors", USER_REWARDS)
  records = [{"prompt": "p", "answer": "1"}, {"prompt": "q", "answer": "2"}]
  ctx = RewardContext(TOK, max_new_tokens=40, records=records)
  comps, index = ["a", "a", "bad", "a"], [0, 0, 1, 1]

  def run(fn_name):
    return _score({"name": "python", "fn": f"{mod}:{fn_name}"}, comps, ctx, record_index=index)

  with pytest.raises(Exception, match=rf"python reward '{mod}:raises_on_b' raised ValueError: "
                                      r"no b please on a batch of N=4 .*shape \[N\].*"
                                      r"row 2 \(record 1\) raises on its own"):
    run("raises_on_b")
  with pytest.raises(Exception, match=rf"'{mod}:wrong_length' returned 1 values for 4 "
                                      r"completions; expected a list of N=4 .*shape \[N\]"):
    run("wrong_length")
  with pytest.raises(Exception, match=rf"'{mod}:scalar' returned a scalar \(1.0\); "
                                      r"expected a list of N=4"):
    run("scalar")
  with pytest.raises(Exception, match=rf"'{mod}:nan_on_bad' returned nan on row 2 \(record 1\)"
                                      r"; expected a list of N=4 finite floats, shape \[N\]"):
    run("nan_on_bad")
  with pytest.raises(Exception, match=rf"'{mod}:text_on_bad' returned 'high' \(str\) on row 2 "
                                      r"\(record 1\), not a number"):
    run("text_on_bad")
  # Paths that do not import are errors when the reward is built.
  with pytest.raises(ValueError, match=r"fn='no_such_module_xyz:score' does not import: "
                                       r"ModuleNotFoundError: No module named "
                                       r"'no_such_module_xyz'"):
    build_rewards([{"name": "python", "fn": "no_such_module_xyz:score"}], ctx)
  with pytest.raises(ValueError, match=rf"fn='{mod}:missing' does not import: AttributeError: "
                                       rf"module '{mod}' has no attribute 'missing'"):
    build_rewards([{"name": "python", "fn": f"{mod}:missing"}], ctx)
  with pytest.raises(ValueError, match=r"reward 'python' needs the key 'fn'"):
    build_rewards(["python"], ctx)


def test_config_errors_name_the_reward_and_the_choices():
  ctx = RewardContext(TOK, max_new_tokens=8)
  with pytest.raises(ValueError, match=r"unknown reward 'exact_mach' \(did you mean "
                                       r"'exact_match'\?\); known rewards: code_tests, exact_match"):
    build_rewards(["exact_mach"], ctx)
  with pytest.raises(ValueError, match=r"unknown reward 'regexp' \(did you mean 'regex'"):
    registry.decl("regexp")
  with pytest.raises(ValueError, match=r"reward 'regex' does not take the key 'ful'; accepted "
                                       r"keys: name, weight, label, pattern, full"):
    build_rewards([{"name": "regex", "pattern": "a", "ful": True}], ctx)
  with pytest.raises(ValueError, match=r"reward 'overlong' needs the key 'cache_length'"):
    build_rewards(["overlong"], ctx)
  with pytest.raises(ValueError, match=r"has no 'name'"):
    build_rewards([{"weight": 1.0}], ctx)
  with pytest.raises(ValueError, match="cache_length <= max_length"):
    build_rewards([{"name": "overlong", "cache_length": 9}], ctx)
  with pytest.raises(ValueError, match="reward 'reward_model' needs the key 'path'"):
    build_rewards([{"name": "reward_model"}], ctx)


def test_reward_model_scores_like_the_model(tmp_path):
  hf = dict(model_type="llama", vocab_size=TOK.vocab_size, hidden_size=16, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1, intermediate_size=32,
            max_position_embeddings=64)
  with jax.numpy_rank_promotion("allow"):  # the decoder broadcasts rotary frequencies
    model = models.from_config(hf, head="reward")
    params = model.init(jax.random.PRNGKey(0))
    models.save_hf(str(tmp_path), model, params)
    (reward,) = build_rewards([{"name": "reward_model", "path": str(tmp_path)}],
                              RewardContext(TOK, max_new_tokens=8))
    assert reward.decl == registry.RewardDecl("reward_model")
    batch = _batch(["12<eos>", "3+4"], width=8)
    np.testing.assert_allclose(jax.jit(reward.fn)(*batch),
                               base.reward_model(model, params)(*batch), rtol=1e-5, atol=1e-6)


def test_text_scorers_for_verifiers(tmp_path, monkeypatch):
  ctx = RewardContext(TOK, max_new_tokens=8)
  em = text_scorer("exact_match", ctx)
  assert em({"prompt": "p", "answer": " 42 "}, "42\n") == 1.0
  assert em({"prompt": "p", "answer": "42"}, "420") == 0.0
  math_ = text_scorer({"name": "math_answer"}, ctx)
  assert math_({"answer": "so\n#### 12"}, "thus \\boxed{12}") == 1.0
  assert math_({"answer": "0.5"}, "the answer is 1/2") == 1.0
  assert math_({"answer": "12"}, "#### 13") == 0.0
  with pytest.raises(ValueError, match="needs the record's 'answer'"):
    em({"prompt": "p"}, "42")
  assert text_scorer({"name": "regex", "pattern": "^a+$"}, ctx)({}, "aaa") == 1.0
  mod = _module(tmp_path, monkeypatch, "user_rewards_text", USER_REWARDS)
  py = text_scorer({"name": "python", "fn": f"{mod}:score", "weight": 2.0}, ctx)
  assert py({"prompt": "hi", "level": 3}, "abcd") == 34.0
  with pytest.raises(ValueError, match="'format' is not a verifier with a text form; "
                                       "verifiers: code_tests, exact_match, math_answer"):
    text_scorer("format", ctx)
