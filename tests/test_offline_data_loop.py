"""Offline training data paths through `rlhf_jax.train.run.run`: JSONL files, mocked TFDS,
bad data (clear errors or counted skips), exact resume, cached reference log-probs.

The shared config and runner live in `offline_testlib`.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from offline_testlib import config as _config  # tests/offline_testlib.py
from offline_testlib import pairs as _pairs
from offline_testlib import run_config as _run
from rlhf_jax.data import DataFormatError, write_jsonl


def _jsonl_config(paradigm, tmp_path, loss, records, **data):
  path = tmp_path / "train.jsonl"
  write_jsonl(path, records)
  c = _config(paradigm, tmp_path / "run", loss)
  c.data.source, c.data.path = "jsonl", str(path)
  c.data.eval_batch_size = 64
  c.train.steps = 5
  for k, v in data.items():
    c.data[k] = v
  return c


@pytest.mark.parametrize("paradigm,loss", [("preference", "dpo"), ("reward_model", "bt"),
                                           ("sft", None)])
def test_jsonl_source(tmp_path, paradigm, loss):
  recs = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in _pairs(640)]
  if paradigm == "sft":
    recs = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in recs]
  kw = dict(loss_kwargs=dict(beta=0.1)) if loss == "dpo" else {}
  c = _jsonl_config(paradigm, tmp_path, loss, recs)
  c.loss_kwargs = kw.get("loss_kwargs", {})
  s = _run(c)
  assert s["eval_after"]["loss"] < s["eval_before"]["loss"]


def test_tfds_mock_source(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  c = _config("preference", tmp_path, "dpo", loss_kwargs=dict(beta=0.1))
  c.data.source, c.data.name = "tfds", "gsm8k"
  c.data.fields = dict(prompt="question", chosen="answer", rejected="short_answer")
  c.data.truncation = "truncate_left"
  c.train.steps = 4
  with tfds.testing.mock_data(num_examples=64):
    s = _run(c)
  assert s["eval_after"]["loss"] < s["eval_before"]["loss"]
  c.paradigm, c.loss, c.loss_kwargs = "sft", "", {}
  c.data.fields = dict(prompt="question", completion="answer")
  c.workdir = str(tmp_path / "sft")
  with tfds.testing.mock_data(num_examples=64):
    s = _run(c)
  assert s["eval_after"]["nll"] < s["eval_before"]["nll"]


def test_bad_data_gives_clear_errors(tmp_path):
  good = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in _pairs(700)]
  path = tmp_path / "bad.jsonl"
  lines = [json.dumps(r) for r in good]
  lines[3] = '{"prompt": "ab>", "chosen": '  # malformed JSON
  lines[5] = json.dumps({"prompt": "ab>", "chosen": "a"})  # missing field
  path.write_text("\n".join(lines) + "\n")
  c = _config("preference", tmp_path / "run", "dpo", loss_kwargs=dict(beta=0.1))
  c.data.source, c.data.path, c.train.steps = "jsonl", str(path), 3
  with pytest.raises(DataFormatError, match=r"bad.jsonl:4: malformed JSON"):
    _run(c)
  c.data.skip_invalid = True  # a counted, logged skip instead
  s = _run(c)
  assert np.isfinite(s["final_train_loss"])
  lines[3] = json.dumps(good[3])
  path.write_text("\n".join(lines) + "\n")
  c.data.skip_invalid = False
  with pytest.raises(DataFormatError, match=r"bad.jsonl:6: missing field 'rejected'"):
    _run(c)
  empty = tmp_path / "empty.jsonl"
  empty.write_text("\n")
  c.data.path = str(empty)
  with pytest.raises(DataFormatError, match="empty dataset"):
    _run(c)


def test_long_prompt_error_or_counted_skip(tmp_path):
  recs = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in _pairs(640)]
  recs[100]["prompt"] = "abcd" * 10 + ">"  # 41 tokens > max_prompt_length=8 (not in eval)
  path = tmp_path / "long.jsonl"
  write_jsonl(path, recs)
  c = _config("preference", tmp_path / "run", "dpo", loss_kwargs=dict(beta=0.1))
  c.data.source, c.data.path, c.train.steps = "jsonl", str(path), 25
  with pytest.raises(ValueError, match="max_prompt_length=8"):
    _run(c)  # raised by the up-front precheck, before any step
  c.data.truncation = "skip"
  s = _run(c)  # 25 steps x 32 > 640 records: the long one is met and skipped
  assert s["skipped_records"] >= 1


def test_resume_is_bitwise_identical(tmp_path):
  def cfg(workdir, steps, every):
    c = _config("preference", workdir, "dpo", loss_kwargs=dict(beta=0.1))
    c.train.steps, c.checkpoint.every_steps = steps, every
    c.data.train_size = 100  # batches cross an epoch boundary before the resume point
    return c
  full = _run(cfg(tmp_path / "a", 7, 0))  # uninterrupted, no checkpoints
  first = _run(cfg(tmp_path / "b", 4, 3))  # saves at 3 and (final) 4
  assert first["start_step"] == 0
  resumed = _run(cfg(tmp_path / "b", 7, 3))
  assert resumed["start_step"] == 4
  for x, y in zip(jax.tree.leaves(full["state"].params),
                  jax.tree.leaves(resumed["state"].params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_precompute_ref_matches_on_the_fly(tmp_path):
  c = _config("preference", tmp_path / "a", "dpo", loss_kwargs=dict(beta=0.1))
  c.train.steps = 10
  on_the_fly = _run(c)
  c.workdir = str(tmp_path / "b")
  c.precompute_ref = True
  cached = _run(c)
  files = [f for f in os.listdir(tmp_path / "b") if f.startswith("ref_logps_")]
  assert len(files) == 2 and cached["state"].ref_params is None
  for k in ("implicit_reward_accuracy", "loss"):
    np.testing.assert_allclose(cached["eval_after"][k], on_the_fly["eval_after"][k],
                               rtol=1e-3, atol=1e-3)
  again = _run(c)  # loads the npz instead of recomputing
  np.testing.assert_allclose(again["eval_before"]["loss"], cached["eval_before"]["loss"])
