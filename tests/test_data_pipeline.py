"""Batching, truncation policies, packing, and exact resumption of the data iterator."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rlhf_jax.data import batching, pipeline, synthetic
from rlhf_jax.data.tokenizer import CharTokenizer

TOK = CharTokenizer(chat_template=(
    "{% for m in messages %}{{ '<bos>' + m['role'] + '\n' + m['content'] + '<eos>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<bos>assistant\n' }}{% endif %}"))


def _all_equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    if isinstance(a[k], np.ndarray):
      np.testing.assert_array_equal(a[k], b[k])
    else:
      assert a[k] == b[k]


def test_prompt_batches_left_padded():
  recs = synthetic.ArithmeticTask(num_digits=2).generate(6, seed=0)
  it = pipeline.prompt_batches(recs, TOK, batch_size=3, max_prompt_length=8, shuffle=False)
  b = next(it)
  assert b["prompt_ids"].shape == (3, 8) and b["prompt_ids"].dtype == np.int32
  for i in range(3):
    n = len(recs[i]["prompt"])
    np.testing.assert_array_equal(b["prompt_mask"][i], [0] * (8 - n) + [1] * n)
    assert TOK.decode(b["prompt_ids"][i]) == recs[i]["prompt"] == b["prompt"][i]
    assert (b["prompt_ids"][i, :8 - n] == TOK.pad_id).all()
  assert b["answer"] == [r["answer"] for r in recs[:3]]


def test_sft_text_and_chat_loss_masks():
  fn = batching.make_sft_example_fn(TOK, max_length=16)
  ex = fn({"prompt": "1+2=", "completion": "3"}, 0)
  assert ex["input_ids"] == TOK.encode("1+2=3") + [TOK.eos_id]
  assert ex["loss_mask"] == [0, 0, 0, 0, 1, 1]
  b = batching.collate_sft([ex, fn({"prompt": "9=", "completion": "10"}, 1)], pad_id=0,
                           max_length=8)
  np.testing.assert_array_equal(b["loss_mask"], [[0, 0, 0, 0, 1, 1, 0, 0],
                                                 [0, 0, 1, 1, 1, 0, 0, 0]])
  np.testing.assert_array_equal(b["attention_mask"][1], [1, 1, 1, 1, 1, 0, 0, 0])
  np.testing.assert_array_equal(b["positions"][1], [0, 1, 2, 3, 4, 0, 0, 0])
  msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
          {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
  ex = batching.make_sft_example_fn(TOK, max_length=64)({"messages": msgs}, 0)
  masked = TOK.decode([t for t, m in zip(ex["input_ids"], ex["loss_mask"]) if m],
                      skip_special_tokens=False)
  assert masked == "b<eos>\nd<eos>\n"


def test_preference_batch_concatenates_prompt_and_response():
  recs = [{"prompt": "ab>", "chosen": "aa", "rejected": "cbd"},
          {"prompt": [{"role": "user", "content": "x"}], "chosen": "y", "rejected": "zz"}]
  it = pipeline.preference_batches(recs, TOK, batch_size=2, max_prompt_length=24,
                                   max_length=32, shuffle=False)
  b = next(it)
  for k in ("chosen_ids", "chosen_mask", "chosen_loss_mask", "rejected_ids", "rejected_mask",
            "rejected_loss_mask"):
    assert b[k].shape == (2, 32), k
  # Text record: ids = prompt + response + eos; loss on response + eos only.
  np.testing.assert_array_equal(b["rejected_ids"][0, :7], TOK.encode("ab>cbd") + [TOK.eos_id])
  np.testing.assert_array_equal(b["rejected_loss_mask"][0, :8], [0, 0, 0, 1, 1, 1, 1, 0])
  np.testing.assert_array_equal(b["chosen_mask"][0], [1] * 6 + [0] * 26)
  # Chat record: the prompt part is the render with the generation prompt.
  prompt_ids = TOK.encode(TOK.apply_chat_template(recs[1]["prompt"], add_generation_prompt=True))
  n = len(prompt_ids)
  np.testing.assert_array_equal(b["chosen_ids"][1, :n], prompt_ids)
  assert b["chosen_loss_mask"][1, :n].sum() == 0
  resp = b["chosen_ids"][1][b["chosen_loss_mask"][1] == 1]
  assert TOK.decode(resp, skip_special_tokens=False) == "y<eos>\n"
  assert (b["chosen_loss_mask"] <= b["chosen_mask"]).all()


def test_truncation_policies():
  rec = {"prompt": "abcdefgh", "chosen": "xy", "rejected": "z"}
  kw = dict(max_prompt_length=4, max_length=8)
  with pytest.raises(ValueError, match=r"example 7 \(prompt 'abcdefgh'\): prompt has 8 tokens > "
                     r"max_prompt_length=4.*truncation="):
    batching.make_preference_example_fn(TOK, **kw)(rec, 7)
  with pytest.raises(batching.SkipExample):
    batching.make_preference_example_fn(TOK, truncation="skip", **kw)(rec, 7)
  ex = batching.make_preference_example_fn(TOK, truncation="truncate_left", **kw)(rec, 7)
  assert TOK.decode(ex["chosen_ids"]) == "efghxy"
  ex = batching.make_preference_example_fn(TOK, truncation="truncate_right", max_prompt_length=4,
                                           max_length=6)(rec, 7)
  assert TOK.decode(ex["chosen_ids"], skip_special_tokens=False) == "abcdxy"
  assert ex["chosen_loss_mask"] == [0, 0, 0, 0, 1, 1]
  with pytest.raises(ValueError, match="chosen response has 3 tokens"):
    batching.make_preference_example_fn(TOK, max_prompt_length=4, max_length=6)(
        {**rec, "prompt": "abcd"}, 0)
  with pytest.raises(ValueError, match="sequence has 6 tokens > max_length=4"):
    batching.make_sft_example_fn(TOK, max_length=4)({"prompt": "abc", "completion": "de"}, 0)
  with pytest.raises(ValueError, match="truncation must be one of"):
    batching.make_sft_example_fn(TOK, max_length=4, truncation="cut")
  with pytest.raises(ValueError, match="max_prompt_length=8 must be < max_length=8"):
    batching.make_preference_example_fn(TOK, max_prompt_length=8, max_length=8)


def test_skip_counts_and_all_skipped_error():
  recs = [{"prompt": "a" * n, "answer": "1"} for n in (2, 9, 3, 10, 1, 2)]
  it = pipeline.prompt_batches(recs, TOK, batch_size=2, max_prompt_length=4, truncation="skip",
                               shuffle=False, num_epochs=1)
  batches = list(it)
  assert [b["prompt"] for b in batches] == [["aa", "aaa"], ["a", "aa"]]
  assert it.get_state()["skipped"] == 2
  it = pipeline.prompt_batches(recs[1:2], TOK, batch_size=1, max_prompt_length=4,
                               truncation="skip")
  with pytest.raises(ValueError, match="every one of the 1 records was skipped"):
    next(it)
  with pytest.raises(ValueError, match="source is empty"):
    pipeline.prompt_batches([], TOK, batch_size=1, max_prompt_length=4)


def test_packing_segments():
  recs = [{"prompt": "p" * n, "completion": "c"} for n in (3, 1, 5, 2, 6, 1, 4)]
  it = pipeline.sft_batches(recs, TOK, batch_size=2, max_length=8, pack=True, shuffle=False,
                            num_epochs=1)
  seen = []
  for b in it:
    assert b["input_ids"].shape == (2, 8)
    for row in range(2):
      seg = b["segment_ids"][row]
      assert (b["attention_mask"][row] == (seg > 0)).all()
      for s in range(1, seg.max() + 1):
        idx = np.nonzero(seg == s)[0]
        assert (np.diff(idx) == 1).all()  # contiguous
        np.testing.assert_array_equal(b["positions"][row, idx], np.arange(len(idx)))
        text = TOK.decode(b["input_ids"][row, idx])
        seen.append(text)
        lm = b["loss_mask"][row, idx]
        np.testing.assert_array_equal(lm, [0] * (len(idx) - 2) + [1, 1])
  # Lengths 5 3 7 4 8 3 6. Batch 1: [5+3] [7]; batch 2: [4] [8]; the last two records
  # form an incomplete batch, dropped at the end of the only epoch.
  assert seen == ["pppc", "pc", "pppppc", "ppc", "ppppppc"]


@pytest.mark.parametrize("pack", [False, True])
def test_resume_matches_uninterrupted(pack):
  task = synthetic.ArithmeticTask(num_digits=2)
  recs = task.generate(11, seed=0)
  recs[4] = {"prompt": "123456789+1=", "completion": "123456790"}  # skipped: too long
  make = lambda: pipeline.sft_batches(recs, TOK, batch_size=3, max_length=12, pack=pack,  # noqa
                                      truncation="skip", seed=5)
  ref = make()
  full = [next(ref) for _ in range(9)]  # crosses several epoch boundaries
  for k in (0, 2, 4, 7):
    it = make()
    for _ in range(k):
      next(it)
    state = json.loads(json.dumps(it.get_state()))
    resumed = make()
    resumed.set_state(state)
    for j in range(k, 9):
      _all_equal(next(resumed), full[j])
  assert ref.get_state()["epoch"] >= 2 and ref.get_state()["skipped"] >= 2


def test_shuffle_is_seeded_permutation():
  recs = [{"prompt": str(i), "answer": str(i)} for i in range(10)]
  order = lambda seed: [a for b in pipeline.prompt_batches(  # noqa: E731
      recs, TOK, batch_size=5, max_prompt_length=2, seed=seed, num_epochs=2)
      for a in b["answer"]]
  o = order(1)
  assert o == order(1) and o != order(2)
  assert sorted(o[:10]) == sorted(o[10:]) == sorted(str(i) for i in range(10))
  assert o[:10] != o[10:]  # a fresh permutation each epoch


def test_set_state_validation():
  it = pipeline.prompt_batches([{"prompt": "a"}], TOK, batch_size=1, max_prompt_length=2, seed=0)
  with pytest.raises(KeyError, match="missing"):
    it.set_state({"epoch": 0})
  with pytest.raises(ValueError, match="seed"):
    it.set_state({"seed": 1, "epoch": 0, "index": 0, "skipped": 0})
  with pytest.raises(ValueError, match="different dataset"):
    it.set_state({"seed": 0, "epoch": 0, "index": 5, "skipped": 0})


def test_grain_batches_resume():
  recs = synthetic.ArithmeticTask(num_digits=2).generate(7, seed=0)
  recs[2] = {"prompt": "1234567+1=", "answer": "x"}  # skipped
  fn = batching.make_prompt_example_fn(TOK, max_prompt_length=6, truncation="skip")
  collate = lambda exs: batching.collate_prompts(exs, pad_id=0, max_prompt_length=6)  # noqa
  ds = pipeline.grain_batches(recs, example_fn=fn, collate=collate, batch_size=4, seed=3)
  it = iter(ds)
  full = [next(it) for _ in range(5)]
  assert full[0]["prompt_ids"].shape == (4, 6)
  assert "x" not in [a for b in full for a in b["answer"]]
  it = iter(ds)
  next(it), next(it)
  state = json.loads(json.dumps(it.get_state()))
  it2 = iter(ds)
  it2.set_state(state)
  for j in range(2, 5):
    _all_equal(next(it2), full[j])


def test_segment_attention_mask_blocks_cross_example():
  seg = np.array([[1, 1, 2, 2, 2, 0]])
  m = batching.segment_attention_mask(seg)
  expected = np.zeros((6, 6), bool)
  for i in range(6):
    for j in range(i + 1):
      expected[i, j] = seg[0, i] == seg[0, j] != 0
  np.testing.assert_array_equal(m[0], expected)
  assert not batching.segment_attention_mask(seg, causal=False)[0, 0, 2]


def test_bucketing():
  recs = [{"prompt": "p" * n, "completion": "c"} for n in (1, 2, 9, 10)]
  it = pipeline.sft_batches(recs, TOK, batch_size=2, max_length=16, buckets=(4, 8, 16),
                            shuffle=False)
  assert next(it)["input_ids"].shape == (2, 4)
  assert next(it)["input_ids"].shape == (2, 16)
  with pytest.raises(ValueError, match="largest bucket 8"):
    batching.bucket_length(9, (4, 8))
  with pytest.raises(ValueError, match="exclusive"):
    pipeline.sft_batches(recs, TOK, batch_size=2, max_length=16, buckets=(4,), pack=True)


def test_precheck_finds_bad_record_before_iteration():
  recs = [{"prompt": "a" * n, "answer": "1"} for n in (2, 9, 3)]
  it = pipeline.prompt_batches(recs, TOK, batch_size=1, max_prompt_length=4)
  with pytest.raises(ValueError, match=r"example 1 .*prompt has 9 tokens > max_prompt_length=4"):
    it.precheck()
  it = pipeline.prompt_batches(recs, TOK, batch_size=1, max_prompt_length=4, truncation="skip")
  assert it.precheck() == {"records": 3, "skipped": 1}
  assert it.get_state()["index"] == 0  # precheck does not move the iterator


def test_kto_labels_pass_through():
  recs = [{"prompt": "1+1=", "completion": "2", "label": True},
          {"prompt": "1+1=", "completion": "3", "label": False}]
  b = next(pipeline.sft_batches(recs, TOK, batch_size=2, max_length=8, shuffle=False,
                                passthrough=("label",)))
  np.testing.assert_array_equal(b["label"], np.array([1.0, 0.0], np.float32))
  assert b["label"].dtype == np.float32 and b["input_ids"].shape == (2, 8)


@pytest.mark.parametrize("kind", ["sft", "preference", "unpaired", "list"])
def test_missing_passthrough_field_names_the_example_and_the_setting(kind):
  from rlhf_jax.train import offline_data as od  # pylint: disable=g-import-not-at-top
  record = {"prompt": "1+1=", "completion": "2", "label": True, "chosen": "2",
            "rejected": "3", "responses": ["2", "3"], "kl_completion": "4"}
  data = {"max_length": 12, "max_prompt_length": 6, "num_responses": 2}
  fn, _ = od.batch_fns(kind, TOK, data, passthrough=("weight",))
  fn(dict(record, weight=1.0), 0)
  with pytest.raises(KeyError, match=r"example 3 .* no field 'weight'.*config\.data\.passthrough"):
    fn(record, 3)
