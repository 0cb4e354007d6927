"""Prompt datasets (JSONL, Parquet, TFDS) for the online loop: loading, errors, batches."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from rlhf_jax.data import batching, pipeline, prompt_data, synthetic
from rlhf_jax.data.jsonl import DataFormatError
from rlhf_jax.data.prompt_data import (DATASET_TASKS, is_dataset_task, load_prompt_data,
                                       prompt_arrays, prompt_batches)
from rlhf_jax.data.tokenizer import CharTokenizer

TOK = CharTokenizer()
CHAT_TOK = CharTokenizer(chat_template=(
    "{% for m in messages %}{{ '<bos>' + m['role'] + '\n' + m['content'] + '<eos>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<bos>assistant\n' }}{% endif %}"))
RECORDS = [{"prompt": f"what is {i}+{i}?", "answer": str(2 * i), "level": i % 3}
           for i in range(20)]


def _write_jsonl(path, records, extra_lines=()):
  lines = [json.dumps(r) for r in records] + list(extra_lines)
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")
  return str(path)


def _write_parquet(path, records):
  pa = pytest.importorskip("pyarrow")
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  pq.write_table(pa.Table.from_pylist(records), str(path))
  return str(path)


def _load(task, tok=TOK, max_prompt_length=32, seed=0, **kwargs):
  return load_prompt_data(task, tok, max_prompt_length=max_prompt_length, seed=seed, **kwargs)


def _jsonl_task(tmp_path, records=RECORDS, **kwargs):
  return {"name": "jsonl", "path": _write_jsonl(tmp_path / "train.jsonl", records), **kwargs}


# --- loading ---------------------------------------------------------------------------------


def test_jsonl_records_keep_fields_and_encode(tmp_path):
  test = _write_jsonl(tmp_path / "test.jsonl", [{"q": "1+1?", "a": 2, "id": "x"}])
  train = _write_jsonl(tmp_path / "train.jsonl",
                       [{"q": "2+2?", "a": "4", "id": "y", "meta": {"k": [1]}}])
  data = _load({"name": "jsonl", "path": train, "eval_path": test, "prompt_key": "q",
                "answer_key": "a"})
  assert data.train == [{"prompt": "2+2?", "answer": "4", "id": "y", "meta": {"k": [1]},
                         "prompt_ids": TOK.encode("2+2?"), "_origin": f"{train}:1"}]
  assert data.eval[0]["answer"] == "2" and data.eval[0]["id"] == "x"  # a number kept as str
  assert (data.total, data.dropped, data.message, data.source) == (1, 0, "", train)
  assert data.eval_source == test


def test_answer_optional_unless_configured(tmp_path):
  task = _jsonl_task(tmp_path, [{"prompt": "a"}, {"prompt": "b", "answer": "1"}],
                     eval_fraction=0.0)
  assert [r["answer"] for r in _load(task).train] == [None, "1"]
  with pytest.raises(DataFormatError, match=r"train.jsonl:1: no value for 'answer'"):
    _load(dict(task, answer_key="answer"))


def test_answer_format_final_number(tmp_path):
  task = _jsonl_task(tmp_path, [{"prompt": "a", "answer": "3 * 4 = 12\n#### 1,200"}],
                     eval_fraction=0.0, answer_format="final_number")
  assert _load(task).train[0]["answer"] == "1200"


def test_parquet_equals_jsonl(tmp_path):
  jsonl = _load(_jsonl_task(tmp_path), seed=3)
  path = _write_parquet(tmp_path / "train.parquet", RECORDS)
  parquet = _load({"name": "parquet", "path": path}, seed=3)
  strip = lambda rs: [{k: v for k, v in r.items() if k != "_origin"} for r in rs]  # noqa: E731
  assert strip(parquet.train) == strip(jsonl.train)
  assert strip(parquet.eval) == strip(jsonl.eval)
  assert parquet.train[0]["_origin"].startswith(f"{path} row ")


def test_parquet_chat_message_column(tmp_path):
  recs = [{"prompt": [{"role": "user", "content": "hi"}], "answer": "1"}] * 2
  data = _load({"name": "parquet", "path": _write_parquet(tmp_path / "c.parquet", recs),
                "eval_fraction": 0.0}, tok=CHAT_TOK)
  assert data.train[0]["prompt"] == recs[0]["prompt"]
  assert data.train[0]["prompt_ids"] == CHAT_TOK.encode(
      CHAT_TOK.apply_chat_template(recs[0]["prompt"], add_generation_prompt=True))


def test_chat_template_auto_wraps_strings(tmp_path):
  msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "1+2?"}]
  task = _jsonl_task(tmp_path, [{"prompt": "1+2?"}, {"prompt": msgs}], eval_fraction=0.0)
  wrapped = CHAT_TOK.encode(CHAT_TOK.apply_chat_template(
      [{"role": "user", "content": "1+2?"}], add_generation_prompt=True))
  data = _load(task, tok=CHAT_TOK, max_prompt_length=64)
  assert data.train[0]["prompt"] == "1+2?" and data.train[0]["prompt_ids"] == wrapped
  assert data.train[1]["prompt"] == msgs
  assert data.train[1]["prompt_ids"] == CHAT_TOK.encode(
      CHAT_TOK.apply_chat_template(msgs, add_generation_prompt=True))
  plain = _load(dict(task, chat_template=False), tok=CHAT_TOK, max_prompt_length=64)
  assert plain.train[0]["prompt_ids"] == CHAT_TOK.encode("1+2?")
  assert plain.train[1]["prompt_ids"] == data.train[1]["prompt_ids"]
  # Without a template, strings are text; chat-message prompts cannot be rendered.
  assert _load(dict(task, path=_write_jsonl(tmp_path / "s.jsonl", [{"prompt": "1+2?"}])),
               tok=TOK).train[0]["prompt_ids"] == TOK.encode("1+2?")
  with pytest.raises(ValueError, match=r"train.jsonl:2: the prompt is a list of chat messages "
                     "but the tokenizer .* has no chat template"):
    _load(task, tok=TOK, max_prompt_length=64)
  with pytest.raises(ValueError, match="task.chat_template=True but the tokenizer"):
    _load(dict(task, chat_template=True), tok=TOK)


def test_eval_fraction_is_seeded_and_disjoint(tmp_path):
  task = _jsonl_task(tmp_path)
  a, b, c = _load(task, seed=1), _load(task, seed=1), _load(task, seed=2)
  assert a.train == b.train and a.eval == b.eval
  assert len(a.eval) == 2 and len(a.train) == a.total == 18  # 10% of 20 held out
  prompts = lambda rs: [r["prompt"] for r in rs]  # noqa: E731
  assert not set(prompts(a.train)) & set(prompts(a.eval))
  assert sorted(prompts(a.train) + prompts(a.eval)) == sorted(prompts(RECORDS))
  assert prompts(a.eval) != prompts(c.eval)
  origins = [int(r["_origin"].rsplit(":", 1)[1]) for r in a.train]
  assert origins == sorted(origins)  # file order kept
  assert len(_load(dict(task, eval_fraction=0.25)).eval) == 5
  assert _load(dict(task, eval_fraction=0.0)).eval == []
  assert len(_load(task, eval_size=1).eval) == 1


def test_drop_counting_and_message(tmp_path):
  recs = [{"prompt": "x" * n, "answer": "1"} for n in (3, 9, 4, 12, 5)]
  test = _write_jsonl(tmp_path / "test.jsonl", [{"prompt": "y" * n} for n in (2, 20)])
  data = _load(_jsonl_task(tmp_path, recs, eval_path=test), max_prompt_length=8)
  assert [len(r["prompt"]) for r in data.train] == [3, 4, 5]
  assert [len(r["prompt"]) for r in data.eval] == [2]
  assert (data.total, data.dropped, data.eval_dropped) == (5, 2, 1)
  assert data.message == ("dropped 2 of 5 prompts longer than data.max_prompt_length=8 tokens "
                          "(and 1 of 2 held-out prompts)")
  only_train = _load(_jsonl_task(tmp_path, recs, eval_fraction=0.0), max_prompt_length=8)
  assert only_train.message == "dropped 2 of 5 prompts longer than data.max_prompt_length=8 tokens"


def test_skip_invalid_counts(tmp_path):
  path = tmp_path / "bad.jsonl"
  good = [json.dumps({"prompt": "a", "answer": "1"}).encode()] * 3
  lines = [good[0], b'{"prompt": "\xff\xfe"}', b"{not json", b"[1, 2]", b'{"question": "b"}',
           b'{"prompt": 3}', good[1], b"", good[2]]
  path.write_bytes(b"\n".join(lines) + b"\n")
  task = {"name": "jsonl", "path": str(path), "eval_fraction": 0.0}
  with pytest.raises(DataFormatError, match=r"bad.jsonl:2: not valid UTF-8 .*skip_invalid"):
    _load(task)
  data = _load(dict(task, skip_invalid=True))
  assert data.skipped == 5 and len(data.train) == data.total == 3
  assert [r["_origin"].rsplit(":", 1)[1] for r in data.train] == ["1", "7", "9"]


def test_tfds_mock_gsm8k():
  tfds = pytest.importorskip("tensorflow_datasets")
  task = {"name": "tfds", "dataset": "gsm8k", "split": "train", "eval_split": "test",
          "prompt_key": "question", "answer_key": "answer"}
  with tfds.testing.mock_data(num_examples=6):
    data = _load(task, max_prompt_length=64)
  assert len(data.train) + data.dropped == data.total == 6 and len(data.eval) <= 6
  rec = data.train[0]
  assert isinstance(rec["prompt"], str) and isinstance(rec["answer"], str)
  assert set(rec) == {"prompt", "answer", "prompt_ids", "_origin", "annotation", "short_answer"}
  assert rec["_origin"].startswith("gsm8k:train[") and data.source == "gsm8k:train"
  assert rec["prompt_ids"] == TOK.encode(rec["prompt"])
  with tfds.testing.mock_data(num_examples=10):
    held = _load({k: v for k, v in task.items() if k != "eval_split"}, max_prompt_length=64)
  assert len(held.eval) == 1 and held.total == 9
  with tfds.testing.mock_data(num_examples=2):
    with pytest.raises(ValueError, match=r"gsm8k:train has no column 'prompt' "
                       r"\(task.prompt_key\).*'question'"):
      _load({"name": "tfds", "dataset": "gsm8k"})


def test_tfds_bytes_and_numpy_values(monkeypatch):
  tfds = pytest.importorskip("tensorflow_datasets")
  rows = [{"question": b"2+2?", "answer": np.bytes_(b"4"), "label": np.array(1),
           "scores": np.array([0.5, 1.0], np.float32)}] * 3
  monkeypatch.setattr(tfds, "data_source", lambda *a, **k: rows)
  data = _load({"name": "tfds", "dataset": "gsm8k", "prompt_key": "question",
                "eval_fraction": 0.0})
  assert data.train[0]["prompt"] == "2+2?" and data.train[0]["answer"] == "4"
  assert data.train[0]["label"] == 1 and data.train[0]["scores"] == [0.5, 1.0]


# --- errors ----------------------------------------------------------------------------------


def test_config_errors(tmp_path):
  path = _write_jsonl(tmp_path / "t.jsonl", RECORDS)
  with pytest.raises(ValueError, match=r"task.name='arithmetic' is not a dataset task"):
    _load({"name": "arithmetic"})
  with pytest.raises(ValueError, match=r"task.name='json' .*did you mean 'jsonl'"):
    _load({"name": "json", "path": path})
  with pytest.raises(ValueError, match=r"task.promt_key is not a key of 'jsonl' tasks "
                     r"\(did you mean 'prompt_key'\?\)"):
    _load({"name": "jsonl", "path": path, "promt_key": "q"})
  with pytest.raises(ValueError, match=r"task.split is not a key of 'jsonl'"):
    _load({"name": "jsonl", "path": path, "split": "train"})
  with pytest.raises(ValueError, match=r"task.path is required for task.name='jsonl'"):
    _load({"name": "jsonl"})
  with pytest.raises(ValueError, match=r"task.path is required for task.name='parquet'"):
    _load({"name": "parquet", "prompt_key": "q"})
  with pytest.raises(ValueError, match=r"task.dataset is required for task.name='tfds'"):
    _load({"name": "tfds", "split": "train"})
  with pytest.raises(ValueError, match=r"task.eval_fraction must be in \[0, 1\)"):
    _load({"name": "jsonl", "path": path, "eval_fraction": 1.0})
  with pytest.raises(ValueError, match=r"task.eval_fraction and task.eval_path are exclusive"):
    _load({"name": "jsonl", "path": path, "eval_path": path, "eval_fraction": 0.2})
  with pytest.raises(ValueError, match=r"task.skip_invalid must be True or False"):
    _load({"name": "jsonl", "path": path, "skip_invalid": "yes"})
  with pytest.raises(ValueError, match=r"task.answer_format must be None or one of"):
    _load({"name": "jsonl", "path": path, "answer_format": "number"})


def test_file_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"task.path='.*nope.jsonl': no such file"):
    _load({"name": "jsonl", "path": str(tmp_path / "nope.jsonl")})
  path = _write_jsonl(tmp_path / "t.jsonl", RECORDS)
  with pytest.raises(FileNotFoundError, match=r"task.eval_path='.*gone.jsonl'"):
    _load({"name": "jsonl", "path": path, "eval_path": str(tmp_path / "gone.jsonl")})
  with pytest.raises(IsADirectoryError, match=r"task.path='.*' is a directory"):
    _load({"name": "jsonl", "path": str(tmp_path)})
  with pytest.raises(IsADirectoryError, match=r"task.path="):
    _load({"name": "parquet", "path": str(tmp_path)})
  (tmp_path / "empty.jsonl").write_text("\n\n")
  with pytest.raises(DataFormatError, match=r"empty.jsonl: the dataset has no records"):
    _load({"name": "jsonl", "path": str(tmp_path / "empty.jsonl")})
  with pytest.raises(DataFormatError, match=r"no records \(1 invalid record"):
    _load({"name": "jsonl", "path": _write_jsonl(tmp_path / "b.jsonl", [], ["{"]),
           "skip_invalid": True})
  (tmp_path / "junk.parquet").write_bytes(b"not parquet")
  with pytest.raises(ValueError, match=r"task.path='.*junk.parquet' cannot be read as Parquet"):
    _load({"name": "parquet", "path": str(tmp_path / "junk.parquet")})


@pytest.mark.parametrize("line,match", [
    ('{"question": "a"}', r"x.jsonl:2: no field 'prompt' \(task.prompt_key\); the record has "
     r"fields \['question'\]"),
    ('{"prompt": 3}', r"x.jsonl:2: field 'prompt' \(task.prompt_key\) holds int 3; expected a "
     "string or a list of chat messages"),
    ('{"prompt": null}', r"x.jsonl:2: field 'prompt' .* holds null"),
    ('{"prompt": [{"role": "user"}]}', r"x.jsonl:2: .*missing field 'content'"),
    ('{"prompt": "a", "answer": [1]}', r"x.jsonl:2: field 'answer' \(task.answer_key\) holds "
     "list; expected a string or a number"),
    ('{"prompt": "a",}', r"x.jsonl:2: malformed JSON"),
    ('"a"', r"x.jsonl:2: expected a JSON object, got str"),
    ('{"prompt": "\\u00e9"}', r"x.jsonl:2: cannot encode the prompt .*not in the vocabulary"),
])
def test_record_errors_name_file_and_line(tmp_path, line, match):
  path = _write_jsonl(tmp_path / "x.jsonl", RECORDS[:1], [line])
  with pytest.raises(DataFormatError, match=match):
    _load({"name": "jsonl", "path": path})


def test_every_prompt_too_long(tmp_path):
  task = _jsonl_task(tmp_path, [{"prompt": "x" * n} for n in (9, 15, 11)], eval_fraction=0.0)
  with pytest.raises(ValueError, match=r"every one of the 3 prompts in .*train.jsonl is longer "
                     r"than data.max_prompt_length=8 tokens \(shortest 9, longest 15\)"):
    _load(task, max_prompt_length=8)
  long_eval = _write_jsonl(tmp_path / "e.jsonl", [{"prompt": "y" * 20}])
  with pytest.raises(ValueError, match=r"every one of the 1 prompts in .*e.jsonl"):
    _load(_jsonl_task(tmp_path, [{"prompt": "x"}], eval_path=long_eval), max_prompt_length=8)
  with pytest.raises(ValueError, match=r"task.eval_fraction=0.9 holds out all 2 records"):
    _load(_jsonl_task(tmp_path, [{"prompt": "x"}] * 2, eval_fraction=0.9))


def test_parquet_errors(tmp_path, monkeypatch):
  path = _write_parquet(tmp_path / "t.parquet", [{"question": "a", "answer": "1"}] * 3)
  with pytest.raises(ValueError, match=r"t.parquet has no column 'prompt' \(task.prompt_key\); "
                     r"its columns: \['question', 'answer'\]"):
    _load({"name": "parquet", "path": path})
  with pytest.raises(ValueError, match=r"no column 'solution' \(task.answer_key\)"):
    _load({"name": "parquet", "path": path, "prompt_key": "question", "answer_key": "solution"})
  null_path = _write_parquet(tmp_path / "n.parquet", [{"prompt": "a"}, {"prompt": None}])
  with pytest.raises(DataFormatError, match=r"n.parquet row 1: field 'prompt' .* holds null"):
    _load({"name": "parquet", "path": null_path})
  monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
  with pytest.raises(ImportError, match=r"needs pyarrow: pip install pyarrow"):
    _load({"name": "parquet", "path": path})


def test_tfds_errors(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  with pytest.raises(ValueError, match=r"TFDS has no dataset 'gsm9k' \(did you mean 'gsm8k'"):
    _load({"name": "tfds", "dataset": "gsm9k"})
  with pytest.raises(ValueError, match=r"'gsm8k' split 'train' .*cannot be read from .* without "
                     r"downloading.*tfds build gsm8k"):
    _load({"name": "tfds", "dataset": "gsm8k", "data_dir": str(tmp_path)})
  assert not list(tmp_path.iterdir())  # nothing was downloaded or prepared
  del tfds


def test_is_dataset_task():
  assert DATASET_TASKS == ("jsonl", "parquet", "tfds")
  assert is_dataset_task({"name": "jsonl", "path": "x"}) and is_dataset_task({"name": "tfds"})
  assert not is_dataset_task({"name": "arithmetic"}) and not is_dataset_task({})
  ml_collections = pytest.importorskip("ml_collections")
  assert is_dataset_task(ml_collections.ConfigDict({"name": "parquet"}))


# --- batches ---------------------------------------------------------------------------------


def _build_prompt_iterator(records, *, batch_size, prompt_length, answer_length, seed):
  """The online loop's synthetic-task batches: `build.prompt_batch` under a DataIterator."""
  from rlhf_jax.train import build  # pylint: disable=import-outside-toplevel
  collate = lambda exs: build.prompt_batch(TOK, exs, prompt_length=prompt_length,  # noqa: E731
                                           answer_length=answer_length)
  return pipeline.DataIterator(list(records), example_fn=lambda rec, i: rec,
                               make_batcher=lambda: batching.Batcher(batch_size, collate),
                               seed=seed)


def test_synthetic_records_match_build_prompt_batch():
  records = synthetic.ArithmeticTask(num_digits=2).generate(13, seed=0)
  ref = _build_prompt_iterator(records, batch_size=4, prompt_length=12, answer_length=6, seed=5)
  new = prompt_batches(records, TOK, batch_size=4, prompt_length=12, answer_length=6, seed=5)
  for _ in range(8):  # several epochs; batches span epoch boundaries
    a, b = next(ref), next(new)
    assert set(b) == set(a) | {"record_index"}
    for k in a:
      assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
      assert a[k].tobytes() == b[k].tobytes()
    expect = [records[i]["prompt"] for i in b["record_index"]]
    assert [TOK.decode(row) for row in b["prompt_ids"]] == expect
  assert new.get_state() == ref.get_state()


def test_batch_layout():
  recs = [{"prompt": "ab", "answer": "7"}, {"prompt": "abcd", "answer": None}]
  out = prompt_arrays(recs, TOK, prompt_length=5, answer_length=3)
  np.testing.assert_array_equal(out["prompt_mask"], [[0, 0, 0, 1, 1], [0, 1, 1, 1, 1]])
  np.testing.assert_array_equal(out["prompt_ids"][0], [0, 0, 0] + TOK.encode("ab"))
  np.testing.assert_array_equal(out["answer_ids"], [TOK.encode("7") + [0, 0], [0, 0, 0]])
  np.testing.assert_array_equal(out["answer_mask"], [[1, 0, 0], [0, 0, 0]])
  assert out["record_index"].tolist() == [0, 1] and out["record_index"].dtype == np.int32
  assert out["prompt_ids"].dtype == np.int32 and out["prompt_mask"].dtype == bool
  assert set(prompt_arrays(recs, TOK, prompt_length=5)) == {"prompt_ids", "prompt_mask",
                                                            "record_index"}


def test_loaded_records_batch_with_their_prompt_ids(tmp_path):
  msgs = [{"role": "user", "content": "hi"}]
  data = _load(_jsonl_task(tmp_path, [{"prompt": msgs, "answer": "1"}, {"prompt": "yo"}],
                           eval_fraction=0.0), tok=CHAT_TOK, max_prompt_length=40)
  out = next(prompt_batches(data.train, CHAT_TOK, batch_size=2, prompt_length=40, seed=0,
                            answer_length=4))
  for row, mask, i in zip(out["prompt_ids"], out["prompt_mask"], out["record_index"]):
    assert row[mask].tolist() == data.train[i]["prompt_ids"]
    assert (row[~mask] == CHAT_TOK.pad_id).all()


def test_resume_is_exact(tmp_path):
  data = _load(_jsonl_task(tmp_path), seed=0)
  make = lambda: prompt_batches(data.train, TOK, batch_size=4, prompt_length=32,  # noqa: E731
                                seed=7, answer_length=4)
  it = make()
  for _ in range(6):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  expected = [next(it) for _ in range(5)]
  restored = make()
  restored.set_state(state)
  for want in expected:
    got = next(restored)
    assert got.keys() == want.keys()
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])
  other = prompt_batches(data.train, TOK, batch_size=4, prompt_length=32, seed=8)
  assert next(other)["record_index"].tolist() != next(make())["record_index"].tolist()


def test_batch_errors():
  recs = [{"prompt": "ab", "answer": "12345"}]
  with pytest.raises(ValueError, match=r"record 0 \(prompt 'ab'\): answer '12345' has 6 tokens "
                     r"with EOS, more than sampling.max_new_tokens=4; exact-match"):
    prompt_batches(recs, TOK, batch_size=1, prompt_length=4, seed=0, answer_length=4)
  located = [{"prompt": "ab", "answer": "12345", "_origin": "t.jsonl:3"}]
  with pytest.raises(ValueError, match=r"record 0 \(t.jsonl:3\)"):
    prompt_arrays(located, TOK, prompt_length=4, answer_length=2)
  with pytest.raises(ValueError, match=r"3 prompt tokens, more than data.max_prompt_length=2"):
    prompt_batches([{"prompt": "abc"}], TOK, batch_size=1, prompt_length=2, seed=0)
  with pytest.raises(ValueError, match="at least one record"):
    prompt_batches([], TOK, batch_size=1, prompt_length=2, seed=0)


def test_package_exports():
  from rlhf_jax import data as data_lib  # pylint: disable=import-outside-toplevel
  assert data_lib.load_prompt_data is load_prompt_data
  assert data_lib.prompt_data.prompt_batches is prompt_batches
  assert data_lib.prompt_batches is pipeline.prompt_batches
  assert prompt_data.PromptData is data_lib.PromptData
