"""JSONL loading: formats, and errors naming file, line and field; TFDS via mock data."""

from __future__ import annotations

import json

import pytest

from rlhf_jax.data import jsonl
from rlhf_jax.data.jsonl import DataFormatError, load_jsonl

CHAT = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


def _write(tmp_path, lines, name="d.jsonl"):
  path = tmp_path / name
  path.write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n")
  return path


@pytest.mark.parametrize("fmt,record", [
    ("preference", {"prompt": "p", "chosen": "a", "rejected": "b"}),
    ("preference", {"prompt": CHAT[:1], "chosen": CHAT[1:], "rejected": CHAT[1:]}),
    ("messages", {"messages": CHAT}),
    ("sft", {"prompt": "p", "completion": "c"}),
    ("kto", {"prompt": "p", "completion": "c", "label": True}),
    ("rl", {"prompt": "1+1=", "answer": "2"}),
])
def test_formats_load_and_infer(tmp_path, fmt, record):
  path = _write(tmp_path, [record, "", {**record, "extra": 1}])
  ds = load_jsonl(path, format=fmt)
  assert len(ds) == 2 and ds.format == fmt and ds[1]["extra"] == 1 and ds.num_skipped == 0
  assert load_jsonl(path).format == fmt  # auto


def test_number_answer_is_normalised(tmp_path):
  ds = load_jsonl(_write(tmp_path, [{"prompt": "1+1=", "answer": 2}]), format="rl")
  assert ds[0]["answer"] == "2"


@pytest.mark.parametrize("bad,pattern", [
    ('{"prompt": "p", "chosen": "a", "rejected": ', r"d\.jsonl:2: malformed JSON"),
    ({"prompt": "p", "chosen": "a"}, r"d\.jsonl:2: missing field 'rejected'"),
    ({"prompt": "p", "chosen": 3, "rejected": "b"}, r"d\.jsonl:2: field 'chosen': expected str"),
    ({"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"},
     r"d\.jsonl:2: field 'prompt'\[0\]: missing field 'content'"),
    ('[1, 2]', r"d\.jsonl:2: expected a JSON object, got list"),
])
def test_errors_name_file_line_field(tmp_path, bad, pattern):
  good = {"prompt": "p", "chosen": "a", "rejected": "b"}
  path = _write(tmp_path, [good, bad, good])
  with pytest.raises(DataFormatError, match=pattern):
    load_jsonl(path, format="preference")
  ds = load_jsonl(path, format="preference", skip_invalid=True)
  assert len(ds) == 2 and ds.num_skipped == 1 and ds.skipped[0][0] == 2


def test_kto_label_type(tmp_path):
  path = _write(tmp_path, [{"prompt": "p", "completion": "c", "label": "yes"}])
  with pytest.raises(DataFormatError, match=r":1: field 'label': expected true/false"):
    load_jsonl(path, format="kto")


def test_empty_and_missing(tmp_path):
  with pytest.raises(DataFormatError, match=r"e\.jsonl: no valid records \(empty dataset\)"):
    load_jsonl(_write(tmp_path, [""], name="e.jsonl"), format="sft")
  with pytest.raises(DataFormatError, match="2 invalid line"):
    load_jsonl(_write(tmp_path, ["{", "{"], name="f.jsonl"), format="sft", skip_invalid=True)
  with pytest.raises(FileNotFoundError, match="nope.jsonl"):
    load_jsonl(tmp_path / "nope.jsonl")
  with pytest.raises(ValueError, match="unknown format 'dpo'"):
    load_jsonl(_write(tmp_path, [{"a": 1}]), format="dpo")
  with pytest.raises(DataFormatError, match="cannot infer"):
    load_jsonl(_write(tmp_path, [{"a": 1}], name="g.jsonl"))


def test_roundtrip_write(tmp_path):
  recs = [{"prompt": "ü", "answer": "1"}]
  jsonl.write_jsonl(tmp_path / "w.jsonl", recs)
  assert load_jsonl(tmp_path / "w.jsonl").records == recs


def test_gsm8k_tfds_mock_data():
  tfds = pytest.importorskip("tensorflow_datasets")
  from rlhf_jax.data import tfds_source  # pylint: disable=import-outside-toplevel
  with tfds.testing.mock_data(num_examples=5):
    src = tfds_source.TfdsSource("gsm8k", split="train")
    assert len(src) == 5
    recs = [src[i] for i in range(5)]
  assert all(isinstance(r["prompt"], str) and isinstance(r["answer"], str) for r in recs)
  with pytest.raises(ValueError, match="no record mapping"):
    tfds_source.TfdsSource("imdb_reviews")


def test_gsm8k_record_and_score_bytes():
  from rlhf_jax.data import tfds_source  # pylint: disable=import-outside-toplevel
  rec = tfds_source.gsm8k_record({"question": b"Tom has 3 apples...",
                                  "answer": b"He has 3*4=12.\n#### 1,200"})
  assert rec == {"prompt": "Tom has 3 apples...", "answer": "1200",
                 "solution": "He has 3*4=12.\n#### 1,200"}
  assert tfds_source.gsm8k_score("", "so the answer is 1200", answer=rec["solution"]) == 1.0
  assert tfds_source.gsm8k_score("", "1200 or 12", answer=rec["solution"]) == 0.0
  assert tfds_source.gsm8k_score("", "no idea", answer="#### 5") == 0.0
  with pytest.raises(TypeError, match="field 'question'"):
    tfds_source.gsm8k_record({"question": 3, "answer": "1"})
