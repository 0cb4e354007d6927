"""More bad inputs, each a named error (type, the key or file, the value, the fix).

Complements `tests/test_bad_inputs.py`. Covers: sequences longer than the model's
positions (online prompt + completion, offline `data.max_length`; Llama and GPT-2), a
model vocabulary padded beyond the tokenizer's (a documented behaviour: the sampler and
the trainer use the real vocabulary only), safetensors with tensors config.json does not
use or of another architecture, files that are not GGUF, greedy sampling with a group
estimator, too few records for one batch, mesh / batch mismatches naming each loop's own
key, out-of-range sampling / data / checkpoint / optimiser settings, a workdir that is a
file, JSONL paths that are directories or not UTF-8, unknown config arguments, and
`checkpoint.every_steps=0` (no checkpoints, with a warning). Every loop-level case checks
that nothing was written to the workdir.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from rlhf_jax import data as data_lib
from rlhf_jax import demo
from rlhf_jax import models
from rlhf_jax.data import DataFormatError
from rlhf_jax.models import gguf as gguf_lib
from rlhf_jax.sampling.config import SamplingConfig
from rlhf_jax.train import build, offline_loop, online, online_loop, online_setup, optim
from rlhf_jax.train import placement
from rlhf_jax.train.offline_config import tiny_llama
from rlhf_jax.train.rl_config import RLSettings
from rlhf_jax.train.runner import Runner
import reliability_configs  # tests/reliability_configs.py

CHAR_VOCAB = data_lib.CharTokenizer().vocab_size  # 84
GPT2 = dict(model_type="gpt2", n_embd=16, n_head=2, n_layer=1, n_positions=8)


def _files_under(path) -> list:
  return [os.path.join(r, n) for r, _, ns in os.walk(path) for n in ns]


def _in_tmp(value, tmp):
  """`value` with "{tmp}" in its strings (nested too) replaced by the tmp dir."""
  if isinstance(value, str):
    return value.replace("{tmp}", str(tmp))
  if isinstance(value, dict):
    return {k: _in_tmp(v, tmp) for k, v in value.items()}
  return value


def _config(loop_arg, run_dir, tmp, changes):
  """A loop config with dotted-key changes; "{tmp}" in string values is the test's tmp dir."""
  d = reliability_configs.get_config(loop_arg).to_dict()
  d["workdir"] = str(run_dir)
  for key, value in changes.items():
    value = _in_tmp(value, tmp)
    *parents, last = key.split(".")
    cur = d
    for p in parents:
      cur = cur[p]
    cur[last] = value
  return ml_collections.ConfigDict(d)


def _train(arg):
  return online_loop.train if arg == "online" else offline_loop.train


# (name, loop arg, changes, exception, message regex)
CONFIG_CASES = [
    # Model limits.
    ("online_prompt_plus_completion_beyond_llama_positions", "online",
     {"model.hf_config.max_position_embeddings": 8}, ValueError,
     r"data\.max_prompt_length \+ sampling\.max_new_tokens = 6 \+ 4 = 10 tokens, more than "
     r"the model's max_position_embeddings=8 .*lower data\.max_prompt_length or "
     r"sampling\.max_new_tokens"),
    ("online_prompt_plus_completion_beyond_gpt2_positions", "online",
     {"model.hf_config": GPT2}, ValueError,
     r"= 10 tokens, more than the model's n_positions=8 \(gpt2 config\)"),
    ("offline_max_length_beyond_positions", "dpo",
     {"model.hf_config.max_position_embeddings": 16}, ValueError,
     r"data\.max_length = 20 tokens, more than the model's max_position_embeddings=16.*lower "
     r"data\.max_length"),
    # Greedy sampling with a group estimator learns nothing.
    ("online_temperature_zero_with_group_estimator", "online", {"sampling.temperature": 0.0},
     ValueError, r"sampling\.temperature=0 decodes greedily, so the rl\.group_size=4 samples "
                 r".*rl\.advantage='grpo' \(a group estimator\).*set sampling\.temperature > 0"),
    ("online_top_k_one_with_group_estimator", "online",
     {"sampling.top_k": 1, "rl.advantage": "rloo"}, ValueError,
     r"sampling\.top_k=1 decodes greedily.*rl\.advantage='rloo'"),
    # Too few records for one batch.
    ("online_fewer_prompts_than_one_step", "online", {"data.train_size": 2}, ValueError,
     r"the task has 2 training prompts, fewer than one step's train\.prompts_per_step=4; lower "
     r"train\.prompts_per_step"),
    ("online_eval_size_zero", "online", {"data.eval_size": 0}, ValueError,
     r"data\.eval_size=0: held-out accuracy needs at least one prompt"),
    ("offline_fewer_records_than_one_batch", "dpo", {"data.train_size": 4}, ValueError,
     r"the training set has 4 examples, fewer than one step's train\.batch_size=8; lower "
     r"train\.batch_size or raise data\.train_size \(now 4\)"),
    ("offline_eval_size_zero", "dpo", {"data.eval_size": 0}, ValueError,
     r"the eval set has 0 records, fewer than one eval batch \(data\.eval_batch_size=16\); "
     r"lower data\.eval_batch_size or raise data\.eval_size \(now 0\)"),
    ("offline_eval_set_smaller_than_eval_batch", "dpo", {"data.eval_size": 8}, ValueError,
     r"the eval set has 8 records, fewer than one eval batch \(data\.eval_batch_size=16\)"),
    ("offline_truncation_skips_below_one_eval_batch", "dpo",
     {"data.max_length": 12, "data.truncation": "skip"}, ValueError,
     r"only \d+ of 16 eval records fit data\.max_length=12 \(truncation='skip'\), fewer than "
     r"one eval batch"),
    ("offline_eval_batch_default_is_train_batch", "dpo",
     {"data.eval_batch_size": 0, "data.eval_size": 4}, ValueError,
     r"the eval set has 4 records, fewer than one eval batch \(train\.batch_size=8\)"),
    # The mesh: each loop names its own batch key.
    ("online_batch_not_divisible_over_mesh", "online", {"mesh": {"data": 8, "fsdp": 1,
                                                                 "tensor": 1}}, ValueError,
     r"train\.prompts_per_step=4 is not divisible by the mesh's data x fsdp = 8 devices"),
    ("offline_batch_not_divisible_over_mesh", "dpo",
     {"mesh": {"data": 8, "fsdp": 1, "tensor": 1}, "train.batch_size": 12}, ValueError,
     r"train\.batch_size=12 is not divisible by the mesh's data x fsdp = 8 devices.*set "
     r"train\.batch_size to a multiple of 8"),
    ("online_mesh_not_the_device_count", "online", {"mesh": {"data": 3, "fsdp": 1,
                                                             "tensor": 1}}, ValueError,
     r"config\.mesh=\{'data': 3, 'fsdp': 1, 'tensor': 1\}: make_mesh: .*3 but there are 8 "
     r"devices"),
    ("offline_mesh_not_the_device_count", "dpo", {"mesh": {"data": 2, "fsdp": 2, "tensor": 1}},
     ValueError, r"config\.mesh=.*: make_mesh: .*= 4 but there are 8 devices"),
    # Optimiser.
    ("online_negative_max_grad_norm", "online", {"optim.max_grad_norm": -1.0}, ValueError,
     r"optim\.max_grad_norm=-1\.0 must be >= 0 \(0 or None: no clipping"),
    ("offline_nan_max_grad_norm", "dpo", {"optim.max_grad_norm": float("nan")}, ValueError,
     r"optim\.max_grad_norm=nan must be >= 0"),
    ("online_sft_optim_negative_learning_rate", "online",
     {"sft.steps": 2, "sft.optim": {"learning_rate": -1.0}}, ValueError,
     r"sft\.optim\.learning_rate=-1\.0 must be a finite number >= 0"),
    ("online_unknown_optim_key", "online", {"optim.lr": 1e-3}, ValueError,
     r"unknown optim keys \['lr'\]; known keys: .*'learning_rate'"),
    ("offline_cosine_without_total_steps", "dpo", {"optim.schedule": "cosine"}, ValueError,
     r"optim\.total_steps=0 must exceed optim\.warmup_steps=10 for the 'cosine' schedule"),
    ("offline_unknown_optimizer", "dpo", {"optim.name": "adagrad"}, ValueError,
     r"optim\.name='adagrad' is unknown; use 'adamw', 'adam', 'sgd' or 'lion'"),
    # Out-of-range sampling / data / train / checkpoint settings.
    ("online_max_new_tokens_zero", "online", {"sampling.max_new_tokens": 0}, ValueError,
     r"config key 'sampling\.max_new_tokens'=0 must be >= 1"),
    ("online_negative_temperature", "online", {"sampling.temperature": -0.5}, ValueError,
     r"config key 'sampling\.temperature'=-0\.5 must be >= 0"),
    ("online_top_p_zero", "online", {"sampling.top_p": 0.0}, ValueError,
     r"config key 'sampling\.top_p'=0\.0 must be in \(0, 1\]"),
    ("online_top_k_zero", "online", {"sampling.top_k": 0}, ValueError,
     r"config key 'sampling\.top_k'=0 must be >= 1"),
    ("online_negative_compact_stages", "online", {"sampling.compact_stages": -1}, ValueError,
     r"config key 'sampling\.compact_stages'=-1 must be >= 0"),
    ("online_max_prompt_length_zero", "online", {"data.max_prompt_length": 0}, ValueError,
     r"config key 'data\.max_prompt_length'=0 must be >= 1"),
    ("online_sft_batch_size_zero", "online", {"sft.batch_size": 0}, ValueError,
     r"config key 'sft\.batch_size'=0 must be >= 1"),
    ("online_negative_eval_every", "online", {"train.eval_every": -5}, ValueError,
     r"config key 'train\.eval_every'=-5 must be >= 0"),
    ("offline_max_length_zero", "dpo", {"data.max_length": 0}, ValueError,
     r"config key 'data\.max_length'=0 must be >= 1"),
    ("offline_prompt_not_shorter_than_max_length", "dpo", {"data.max_prompt_length": 20},
     ValueError, r"config key 'data\.max_prompt_length'=20 must be < 'data\.max_length'=20"),
    ("offline_negative_eval_batch_size", "dpo", {"data.eval_batch_size": -1}, ValueError,
     r"config key 'data\.eval_batch_size'=-1 must be >= 0"),
    ("offline_negative_train_size", "dpo", {"data.train_size": -3}, ValueError,
     r"config key 'data\.train_size'=-3 must be >= 0"),
    ("online_max_to_keep_zero", "online", {"checkpoint.max_to_keep": 0}, ValueError,
     r"config key 'checkpoint\.max_to_keep'=0 must be >= 1 \(None keeps every checkpoint\)"),
    ("offline_every_minutes_zero", "dpo", {"checkpoint.every_minutes": 0}, ValueError,
     r"config key 'checkpoint\.every_minutes'=0 must be > 0"),
    ("offline_negative_every_steps", "dpo", {"checkpoint.every_steps": -1}, ValueError,
     r"config key 'checkpoint\.every_steps'=-1 must be >= 0"),
    # Workdir.
    ("online_workdir_is_a_file", "online", {"workdir": "{tmp}/file"}, ValueError,
     r"config\.workdir='.*file' is an existing file, not a directory"),
    ("offline_workdir_is_a_file", "dpo", {"workdir": "{tmp}/file"}, ValueError,
     r"config\.workdir='.*file' is an existing file, not a directory"),
    ("offline_workdir_under_a_file", "dpo", {"workdir": "{tmp}/file/run"}, ValueError,
     r"config\.workdir='.*file/run' is under '.*file', an existing file"),
    ("online_workdir_empty", "online", {"workdir": ""}, ValueError,
     r"config\.workdir is empty"),
    ("online_workdir_gs_url", "online", {"workdir": "gs://bucket/run"}, ValueError,
     r"config\.workdir='gs://bucket/run' is a URL; .*gcsfuse .*e\.g\. '/gcs/bucket/run'"),
    ("offline_workdir_s3_url", "dpo", {"workdir": "s3://bucket/run"}, ValueError,
     r"config\.workdir='s3://bucket/run' is a URL; .*mount the bucket on every host"),
    # Data files of the offline loop.
    ("offline_jsonl_path_is_a_directory", "dpo",
     {"data.source": "jsonl", "data.path": "{tmp}/folder"}, IsADirectoryError,
     r"config\.data\.path='.*folder' is a directory; point it at a \.jsonl file"),
    ("offline_jsonl_eval_path_missing", "dpo",
     {"data.source": "jsonl", "data.path": "{tmp}/pairs.jsonl",
      "data.eval_path": "{tmp}/nope.jsonl"}, FileNotFoundError,
     r"config\.data\.eval_path='.*nope\.jsonl' does not exist"),
    ("offline_jsonl_line_not_utf8", "dpo",
     {"data.source": "jsonl", "data.path": "{tmp}/latin1.jsonl"}, DataFormatError,
     r"latin1\.jsonl:2: not valid UTF-8 \(byte b'\\xe9' at column \d+\); re-encode the file "
     r"as UTF-8 \(pass skip_invalid=True"),
    ("offline_jsonl_default_eval_split_too_small", "dpo",
     {"data.source": "jsonl", "data.path": "{tmp}/pairs.jsonl"}, ValueError,
     r"the eval set has 2 records, fewer than one eval batch \(data\.eval_batch_size=16\); "
     r"lower data\.eval_batch_size or set data\.eval_path"),
    # Model files.
    ("offline_gguf_that_is_not_gguf", "dpo", {"model": {"gguf": "{tmp}/model.gguf"}},
     ValueError, r"config\.model\.gguf='.*model\.gguf': '.*model\.gguf' is not a GGUF file: it "
                 r"starts with b'\{\"mo'"),
    ("offline_safetensors_with_an_extra_layer", "dpo", {"model": {"path": "{tmp}/extra"}},
     ValueError, r"config\.model\.path='.*extra': .*model\.safetensors has \d+ tensor\(s\) that "
                 r".*config\.json does not use: 'model\.layers\.1\..*num_hidden_layers=1; set "
                 r"num_hidden_layers=2"),
]


def _make_files(tmp):
  """The files the cases above point at (under the test's tmp dir)."""
  (tmp / "file").write_text("not a directory\n")
  (tmp / "folder").mkdir()
  pairs = [{"prompt": "ab", "chosen": "aa", "rejected": "bb"}] * 24
  (tmp / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
  (tmp / "latin1.jsonl").write_bytes(json.dumps(pairs[0]).encode() + b"\n"
                                     + '{"prompt": "caf\u00e9", "chosen": "a", "rejected": "b"}\n'
                                     .encode("latin-1"))
  (tmp / "model.gguf").write_text(json.dumps({"model_type": "llama"}))
  hf = dict(tiny_llama(), vocab_size=CHAR_VOCAB)
  model = models.from_config(hf)
  models.save_hf(str(tmp / "extra"), model, model.init(jax.random.PRNGKey(0)))
  cfg = json.loads((tmp / "extra" / "config.json").read_text())
  cfg["num_hidden_layers"] = 1
  (tmp / "extra" / "config.json").write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("inputs")
  _make_files(tmp)
  return tmp


@pytest.mark.parametrize("name,arg,changes,exc,msg", CONFIG_CASES,
                         ids=[c[0] for c in CONFIG_CASES])
def test_bad_config_is_named_and_nothing_is_written(name, arg, changes, exc, msg, files,
                                                    tmp_path):
  del name
  workdir = tmp_path / "w"
  c = _config(arg, workdir, files, changes)
  with pytest.raises(exc, match=msg):
    _train(arg)(c)
  # Nothing half-written: the workdir is absent or empty (or the file it wrongly names).
  for path in {str(workdir), c.workdir} - {""}:
    assert not os.path.isdir(path) or _files_under(path) == [], path
  assert (files / "file").read_text() == "not a directory\n"


# ----------------------------------------------------------------------------- vocabulary


def test_padded_model_vocabulary_evaluates_and_trains_on_real_ids_only():
  """A model with 96 vocabulary rows and the 84-id character tokenizer: the evaluator and
  the RL step sample only ids the tokenizer has (greedy decoding would otherwise pick a
  padded row and fail to decode), and the step's sampler / trainer log-probs agree (the
  first step's KL to the identical reference is 0)."""
  tok = data_lib.CharTokenizer()
  hf = dict(tiny_llama(hidden_size=16, layers=1), vocab_size=96, tie_word_embeddings=False)
  model = models.from_config(hf)
  params = model.init(jax.random.PRNGKey(0))
  w = params["lm_head"]
  params = dict(params, lm_head=w.at[..., CHAR_VOCAB:].set(10.0 * w[..., :96 - CHAR_VOCAB]))
  limit = build.vocab_limit(model, tok)
  assert limit == CHAR_VOCAB and build.vocab_limit(models.from_config(
      dict(hf, vocab_size=CHAR_VOCAB)), tok) is None  # equal sizes: no limit, nothing changes
  records = [{"prompt": "1+2=", "answer": "3"}, {"prompt": "4+4=", "answer": "8"}]
  score = lambda record, text: float(text == record["answer"])  # noqa: E731
  unlimited = online_setup.make_evaluator(model, tok, records, score, prompt_length=6,
                                          max_new_tokens=4)
  with pytest.raises(ValueError, match=r"outside the vocabulary"):
    unlimited(params)
  accuracy = online_setup.make_evaluator(model, tok, records, score, prompt_length=6,
                                         max_new_tokens=4, vocab_limit=limit)(params)
  assert 0.0 <= accuracy <= 1.0

  settings = RLSettings.from_config(dict(group_size=4))
  opt = optim.make_optimizer(dict(learning_rate=1e-3))
  cfg = SamplingConfig(max_new_tokens=4, temperature=1.0, eos_ids=(tok.eos_id,),
                       pad_id=tok.pad_id, num_samples=4, vocab_limit=limit)
  seen = []

  def reward(prompt_ids, completion_ids, completion_mask, extras):
    del prompt_ids, extras
    seen.append(completion_ids)
    return jnp.sum(completion_mask, axis=1).astype(jnp.float32)

  update = online.make_update(model, [reward], opt, settings, cfg)
  state = online.init_state(params, opt, jax.random.PRNGKey(1), settings)
  batch = {k: jnp.asarray(v) for k, v in build.prompt_batch(
      tok, records, prompt_length=6, answer_length=4).items()}
  state, metrics = update(state, batch, jax.random.PRNGKey(2))
  assert abs(float(metrics["seq_kl"])) < 1e-5  # sampler logps == trainer (reference) logps
  assert np.isfinite(float(metrics["pg_loss"])) and float(metrics["skipped"]) == 0.0


# ----------------------------------------------------------------------------- model files


def _saved_llama(path, **changes):
  hf = dict(model_type="llama", vocab_size=32, hidden_size=16, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, intermediate_size=32,
            max_position_embeddings=32, tie_word_embeddings=True, **changes)
  model = models.from_config(hf)
  models.save_hf(str(path), model, model.init(jax.random.PRNGKey(0)))
  return path


def _edit(path, fn):
  cfg_path = path / "config.json"
  cfg = json.loads(cfg_path.read_text())
  fn(cfg)
  cfg_path.write_text(json.dumps(cfg))


def _add_tensors(path, **tensors):
  from safetensors.numpy import load_file, save_file  # pylint: disable=import-outside-toplevel
  f = str(path / "model.safetensors")
  t = dict(load_file(f), **tensors)
  save_file(t, f, metadata={"format": "pt"})


def test_safetensors_with_an_extra_layer_names_the_tensors_and_the_file(tmp_path):
  path = _saved_llama(tmp_path / "m")
  _edit(path, lambda c: c.update(num_hidden_layers=1))
  with pytest.raises(ValueError, match=re.escape(str(path / "model.safetensors")) + r" has 9 "
                     r"tensor\(s\) that .*config\.json does not use: 'model\.layers\.1\.input_"
                     r"layernorm\.weight', .* and 3 more; the file has layers up to index 1 but "
                     r"config\.json num_hidden_layers=1; set num_hidden_layers=2"):
    models.load_hf(str(path))


def test_safetensors_with_an_unknown_tensor_is_named(tmp_path):
  path = _saved_llama(tmp_path / "m")
  _add_tensors(path, **{"model.extra_adapter.weight": np.zeros((4, 4), np.float32)})
  with pytest.raises(ValueError, match=r"has 1 tensor\(s\) that .*config\.json does not use: "
                                       r"'model\.extra_adapter\.weight'; config\.json "
                                       r"\(model_type='llama'\) describes another"):
    models.load_hf(str(path))


def test_safetensors_with_attention_biases_under_llama_suggests_qwen2(tmp_path):
  path = _saved_llama(tmp_path / "m")
  _add_tensors(path, **{f"model.layers.{i}.self_attn.{n}_proj.bias": np.zeros((8,), np.float32)
                        for i in range(2) for n in "qkv"})
  with pytest.raises(ValueError, match=r"the file has attention biases: the weights may be "
                                       r"qwen2 \(model_type='qwen2'\)"):
    models.load_hf(str(path))


def test_buffers_and_a_tied_lm_head_are_not_unused_tensors(tmp_path):
  """Legitimate leftovers: rotary buffers and an lm_head saved next to tied embeddings."""
  path = _saved_llama(tmp_path / "m")
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  embed = load_file(str(path / "model.safetensors"))["model.embed_tokens.weight"]
  _add_tensors(path, **{"lm_head.weight": embed,
                        "model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(4, np.float32)})
  model, params = models.load_hf(str(path))
  assert model.config.num_layers == 2 and "lm_head" not in params


@pytest.mark.parametrize("weights,claimed", [("llama", "gpt2"), ("gpt2", "llama")])
def test_config_model_type_that_does_not_match_the_weights_names_both(tmp_path, weights,
                                                                     claimed):
  if weights == "llama":
    path = _saved_llama(tmp_path / "m")
  else:
    model = models.from_config(dict(GPT2, vocab_size=32))
    path = tmp_path / "m"
    models.save_hf(str(path), model, model.init(jax.random.PRNGKey(0)))
  _edit(path, lambda c: c.update(model_type=claimed))
  family = "gpt2" if weights == "gpt2" else "llama-style"
  with pytest.raises(ValueError, match=re.escape(str(path / "config.json")) +
                     rf" says model_type='{claimed}' but the weights in .*model\.safetensors "
                     rf"are {family} \(e\.g\. tensor '.*'\); set model_type to"):
    models.load_hf(str(path))


def test_config_qwen2_on_llama_weights_names_the_missing_tensor_and_model_type(tmp_path):
  path = _saved_llama(tmp_path / "m")
  _edit(path, lambda c: c.update(model_type="qwen2"))
  with pytest.raises(KeyError, match=r"missing tensor 'model\.layers\.0\.self_attn\.[qkv]_proj\."
                                     r"bias' needed for model_type='qwen2' \(as .*config\.json "
                                     r"says\)"):
    models.load_hf(str(path))


@pytest.mark.parametrize("content,msg", [
    (b"PK\x03\x04 a zip archive", r"is not a GGUF file: it starts with b'PK\\x03\\x04'"),
    (b"", r"is not a GGUF file: it starts with b''"),
    (b"GGUF\x03\x00\x00\x00", r"is not a readable GGUF file \(.*\); it may be truncated"),
], ids=["other_format", "empty", "truncated"])
def test_file_that_is_not_gguf_names_the_path(tmp_path, content, msg):
  path = tmp_path / "weights.gguf"
  path.write_bytes(content)
  with pytest.raises(ValueError, match=re.escape(repr(str(path))) + " " + msg):
    models.load_gguf(str(path))
  with pytest.raises(IsADirectoryError, match=r"GGUF file '.*' is a directory"):
    gguf_lib.load_gguf(str(tmp_path))


# ----------------------------------------------------------------------------- JSONL data


def test_jsonl_path_that_is_a_directory(tmp_path):
  with pytest.raises(IsADirectoryError, match=r"JSONL dataset '.*' is a directory; pass the "
                                              r"path of a \.jsonl file"):
    data_lib.load_jsonl(tmp_path)


def test_jsonl_line_that_is_not_utf8_with_and_without_skip_invalid(tmp_path):
  path = tmp_path / "train.jsonl"
  good = json.dumps({"prompt": "a", "completion": "b"}).encode()
  path.write_bytes(good + b"\n" + b'{"prompt": "\xff\xfe", "completion": "b"}\n' + good + b"\n")
  with pytest.raises(DataFormatError, match=r"train\.jsonl:2: not valid UTF-8 \(byte b'\\xff' "
                                            r"at column 13\); re-encode the file as UTF-8 "
                                            r"\(pass skip_invalid=True"):
    data_lib.load_jsonl(path)
  ds = data_lib.load_jsonl(path, skip_invalid=True)
  assert len(ds) == 2 and [line for line, _ in ds.skipped] == [2]
  only_bad = tmp_path / "bad.jsonl"
  only_bad.write_bytes(b"\xff\n")
  with pytest.raises(DataFormatError, match=r"bad\.jsonl: no valid records \(empty dataset; 1 "
                                            r"invalid line\(s\) skipped\)"):
    data_lib.load_jsonl(only_bad, skip_invalid=True)
  bom = tmp_path / "bom.jsonl"
  bom.write_bytes(b"\xef\xbb\xbf" + good + b"\n")  # a byte-order mark is not an error
  assert data_lib.load_jsonl(bom).records[0]["prompt"] == "a"


# ----------------------------------------------------------------------------- config arguments


TOP_LEVEL_EXPERIMENTS = sorted(
    f[:-3] for f in os.listdir(os.path.join(os.path.dirname(__file__), "..", "experiments"))
    if f.endswith(".py") and not f.startswith("_"))


def test_demo_rejects_an_unknown_config_argument():
  with pytest.raises(ValueError, match=r"config arg 'runlocl' is unknown; use one of "
                                       r"\['runlocal'\] or none \(the full run\)"):
    demo.get_config("runlocl")
  assert demo.get_config("runlocal").train.steps < demo.get_config().train.steps


@pytest.mark.parametrize("name", TOP_LEVEL_EXPERIMENTS)
def test_experiment_configs_reject_an_unknown_argument(name):
  module = importlib.import_module(f"experiments.{name}")
  with pytest.raises(ValueError, match=r"config arg 'runlocl' is unknown; use one of \[.*'"
                                       r"runlocal'.*\]"):
    module.get_config("runlocl")
  assert module.get_config("runlocal").workdir  # the known argument still works


# ----------------------------------------------------------------------------- library level


def test_optimizer_rejects_negative_or_nan_clipping_and_names_the_block():
  for bad in (-0.5, math.nan):
    with pytest.raises(ValueError, match=r"value\.optim\.max_grad_norm=(-0\.5|nan) must be "
                                         r">= 0"):
      optim.make_optimizer(dict(learning_rate=1e-3, max_grad_norm=bad), key="value.optim")
  optim.make_optimizer(dict(learning_rate=1e-3, max_grad_norm=0.0))  # 0: no clipping, allowed


def test_put_batch_names_each_loops_batch_key():
  mesh = {"data": 8, "fsdp": 1, "tensor": 1}
  state = {"w": jnp.zeros((4,))}
  batch = {"input_ids": np.zeros((12, 3), np.int32)}
  offline_cfg = ml_collections.ConfigDict(dict(mesh=mesh, train=dict(batch_size=12)))
  online_cfg = ml_collections.ConfigDict(dict(mesh=mesh, train=dict(prompts_per_step=12)))
  for cfg, key in ((offline_cfg, "train.batch_size"), (online_cfg, "train.prompts_per_step")):
    _, put_batch, _ = placement.placement(cfg, None, state)
    with pytest.raises(ValueError, match=rf"batch field 'input_ids' has 12 rows, not divisible "
                                         rf"by mesh data x fsdp = 8; set {re.escape(key)} to a "
                                         rf"multiple of 8"):
      put_batch(batch)


def test_sequence_length_check_of_the_model_config():
  cfg = models.from_config(dict(GPT2, vocab_size=32)).config
  cfg.check_sequence_length(8, what="x", fix="y")  # exactly the positions: fine
  with pytest.raises(ValueError, match=r"x = 9 tokens, more than the model's n_positions=8 "
                                       r"\(gpt2 config\): positions >= 8 were never trained; y"):
    cfg.check_sequence_length(9, what="x", fix="y")


def test_checkpoint_every_steps_zero_means_no_checkpoints_with_a_warning(tmp_path, caplog):
  """`checkpoint.every_steps=0` without `every_minutes` is allowed: no checkpoint is written
  (a stopped run starts again from step 0), and a warning says so."""
  c = ml_collections.ConfigDict(dict(workdir=str(tmp_path / "w"), resume="auto",
                                     checkpoint=dict(every_steps=0, async_save=False)))
  with caplog.at_level(logging.WARNING):
    run = Runner(c, {"w": jnp.zeros(2)})
  assert run.ckpt is None and run.start_step == 0
  assert re.search(r"no checkpoints: checkpoint\.every_steps=0 and checkpoint\.every_minutes "
                   r"is unset, so a stopped run starts again from step 0", caplog.text)
  run.after_step(1, {"w": jnp.zeros(2)})
  run.finish(1, {"w": jnp.zeros(2)})
  assert not os.path.exists(tmp_path / "w")  # nothing written
