"""The helpers for writing host rewards, and small shared pieces they rely on."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from rlhf_jax.advantages import turn as turn_lib
from rlhf_jax.data import CharTokenizer
from rlhf_jax.losses import reward_model_base
from rlhf_jax.rewards import builtin, registry

TOK = CharTokenizer()


def _ids(texts, length):
  rows = [TOK.encode(t) + [TOK.eos_id] for t in texts]
  ids = np.full((len(rows), length), TOK.pad_id, np.int32)
  for i, r in enumerate(rows):
    ids[i, :len(r)] = r
  return jnp.asarray(ids), jnp.asarray(ids != TOK.pad_id)


def test_host_reward_with_score_rows_reads_records_and_names_errors():
  records = [{"prompt": "say hi", "answer": "hi"}, {"prompt": [{"role": "user", "content": "x"}],
                                                  "answer": "yo"}]
  ctx = registry.RewardContext(TOK, 8, records)
  assert registry.prompt_text(ctx, "say hi") == "say hi"
  fn = registry.host_reward(
      ctx, lambda b: registry.score_rows(b, lambda c, t: float(c == t), b.answers, who="eq"),
      who="eq")
  comp, mask = _ids(["hi", "no"], 6)
  prompt = jnp.zeros((2, 3), jnp.int32)
  out = fn(prompt, comp, mask, {"record_index": jnp.asarray([0, 1])})
  np.testing.assert_array_equal(np.asarray(out), [1.0, 0.0])
  bad = registry.host_reward(
      ctx, lambda b: registry.score_rows(b, lambda c, t: 1 / 0, b.answers, who="div"),
      who="div")
  try:
    bad(prompt, comp, mask, {"record_index": jnp.asarray([0, 1])})
    raise AssertionError("expected an error")
  except Exception as e:  # pylint: disable=broad-except
    assert "div: ZeroDivisionError" in str(e) and "row 0" in str(e)


def test_with_needs_and_register_text_scorer():
  fn = registry.with_needs(lambda *a: None, ("answer_ids",))
  assert fn.reward_needs == ("answer_ids",)
  scorer_builder = registry.register_text_scorer("scorer_written_by_a_test")(
      lambda ctx, **kw: (lambda record, text: float(text.startswith("<think>"))))
  assert scorer_builder(None)({}, "<think>x") == 1.0


def test_format_reward_default_pattern():
  fn = builtin.format_(registry.RewardContext(TOK, 8))
  comp, mask = _ids(["<think>a</think><answer>b</answer>", "b"], 40)
  out = fn(jnp.zeros((2, 2), jnp.int32), comp, mask, {})
  np.testing.assert_array_equal(np.asarray(out), [1.0, 0.0])


def test_pairwise_extras_and_turn_residual():
  ex = reward_model_base.pairwise_extras(jnp.asarray([0.5, -1.0, 0.0]))
  np.testing.assert_array_equal(np.asarray(ex.accuracy), [1.0, 0.0, 0.0])
  r = turn_lib.with_residual(jnp.asarray([3.0, 1.0]), jnp.asarray([[1.0, 1.0], [0.5, 9.0]]),
                             jnp.asarray([[1, 1], [1, 0]]))
  np.testing.assert_allclose(np.asarray(r), [[1.0, 2.0], [1.0, 0.0]])
