"""Bad inputs fail early with an error naming the key/field/file and the fix.

Config (loop-level: `online_loop.train` / `offline_loop.train`), data (JSONL),
model (architecture, vocabulary, safetensors shapes), checkpoint (truncated,
wrong config, wrong shapes) and reward functions (verifier raising / timing
out). Every loop-level case also checks that no file was written.
"""

from __future__ import annotations

import json
import os
import re
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from rlhf_jax import checkpoint as ckpt_lib
from rlhf_jax import data as data_lib
from rlhf_jax import models
from rlhf_jax.data import DataFormatError
from rlhf_jax.rewards import callback
from rlhf_jax.sampling.config import SamplingConfig
from rlhf_jax.train import build, offline_loop, online, online_loop, optim
from rlhf_jax.train.rl_config import RLSettings
from rlhf_jax.train.runner import Runner
import reliability_configs  # tests/reliability_configs.py

TINY = dict(model_type="llama", vocab_size=16, hidden_size=16, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1, intermediate_size=32,
            max_position_embeddings=32, tie_word_embeddings=True)


def _files_under(path) -> list:
  return [os.path.join(r, n) for r, _, ns in os.walk(path) for n in ns]


def _config(arg, workdir, **changes):
  """A loop config with dotted-key changes, rebuilt so any value type is allowed."""
  d = reliability_configs.get_config(arg).to_dict()
  d["workdir"] = str(workdir)
  for key, value in changes.items():
    *parents, last = key.split(".")
    cur = d
    for p in parents:
      cur = cur[p]
    cur[last] = value
  return ml_collections.ConfigDict(d)


# (name, loop arg, changes, exception, message regex)
CONFIG_CASES = [
    ("online_unknown_top_key", "online", {"trian": {"steps": 1}}, KeyError,
     r"unknown config key 'trian'\. Did you mean 'train'\?"),
    ("offline_unknown_top_key", "dpo", {"los": "dpo"}, KeyError,
     r"unknown config key 'los'\. Did you mean 'loss'\?"),
    ("unknown_checkpoint_key", "online", {"checkpoint.every_step": 1}, KeyError,
     r"'checkpoint\.every_step'\. Did you mean 'checkpoint\.every_steps'\?"),
    ("unknown_train_key", "dpo", {"train.batchsize": 4}, KeyError,
     r"'train\.batchsize'\. Did you mean 'train\.batch_size'\?"),
    ("seed_wrong_type", "online", {"seed": "0"}, TypeError,
     r"config key 'seed': expected int, got str"),
    ("async_save_wrong_type", "dpo", {"checkpoint.async_save": "yes"}, TypeError,
     r"config key 'checkpoint\.async_save': expected bool, got str"),
    ("steps_bool_not_int", "dpo", {"train.steps": True}, TypeError,
     r"config key 'train\.steps': expected int, got bool"),
    ("negative_steps", "online", {"train.steps": -1}, ValueError,
     r"config key 'train\.steps'=-1 must be >= 0"),
    ("max_bad_steps_zero", "dpo", {"max_bad_steps": 0}, ValueError,
     r"config key 'max_bad_steps'=0 must be > 0"),
    ("unknown_resume_mode", "online", {"resume": "autoo"}, ValueError,
     r"config key 'resume'='autoo' must be one of \['auto', 'never'\]\. Did you mean 'auto'\?"),
    ("rl_unknown_key", "online", {"rl.group_sise": 4}, ValueError,
     r"unknown rl config keys \['group_sise'\]; known keys: .*'group_size'"),
    ("rl_minibatches_do_not_divide", "online", {"rl.num_minibatches": 3}, ValueError,
     r"rl\.num_minibatches=3 does not divide the 16 samples \(prompts_per_step=4 x "
     r"group_size=4\); pick a divisor"),
    ("rl_micro_batches_do_not_divide", "online", {"rl.micro_batches": 5}, ValueError,
     r"rl\.micro_batches=5 does not divide the 16 samples of a minibatch; pick a divisor"),
    ("rl_group_size_zero", "online", {"rl.group_size": 0}, ValueError,
     r"rl\.group_size must be >= 1, got 0"),
    ("rl_unknown_advantage", "online", {"rl.advantage": "grpoo"}, ValueError,
     r"rl\.advantage='grpoo' is unknown; choose one of"),
    ("rl_surrogate_not_pg", "online", {"rl.surrogate": "dpo"}, ValueError,
     r"rl\.surrogate='dpo' is not a policy-gradient or value-based loss"),
    ("unknown_reward", "online", {"rewards": ["exact"]}, ValueError,
     r"config\.rewards has unknown reward 'exact' \(did you mean 'exact_match'\?\); known"),
    ("unknown_task", "online", {"task.name": "algebra"}, ValueError,
     r"unknown synthetic task 'algebra'; choose one of"),
    ("task_without_name", "dpo", {"task": {"alphabet": "ab"}}, ValueError,
     r"config\.task needs a 'name'"),
    ("model_without_source", "online", {"model": {"dtype": "float32"}}, ValueError,
     r"config\.model needs .*'hf_config' .*'path'"),
    ("unknown_model_key", "dpo", {"model.dtyp": "bfloat16"}, KeyError,
     r"unknown config key 'model\.dtyp'\. Did you mean 'model\.dtype'\?"),
    ("unknown_model_dtype", "online", {"model.dtype": "float16"}, ValueError,
     r"config\.model\.dtype='float16' is unknown; use one of \['float32', 'bfloat16'\]"),
    ("unroll_layers_not_bool", "online", {"model.unroll_layers": "no"}, TypeError,
     r"config key 'model\.unroll_layers': expected bool or None, got str 'no'"),
    ("online_unknown_sampling_key", "online", {"sampling.temprature": 0.5}, KeyError,
     r"'sampling\.temprature'\. Did you mean 'sampling\.temperature'\?"),
    ("online_unknown_data_key", "online", {"data.eval_sise": 8}, KeyError,
     r"'data\.eval_sise'\. Did you mean 'data\.eval_size'\?"),
    ("online_unknown_sft_key", "online", {"sft.step": 8}, KeyError,
     r"'sft\.step'\. Did you mean 'sft\.steps'\?"),
    ("online_max_new_tokens_wrong_type", "online", {"sampling.max_new_tokens": 2.5}, TypeError,
     r"config key 'sampling\.max_new_tokens': expected int, got float"),
    ("offline_unknown_data_key", "dpo", {"data.max_lenght": 8}, KeyError,
     r"'data\.max_lenght'\. Did you mean 'data\.max_length'\?"),
    ("unknown_mesh_axis", "dpo", {"mesh": {"data": 1, "fsdpp": 1}}, KeyError,
     r"'mesh\.fsdpp'\. Did you mean 'mesh\.fsdp'\?"),
    ("unknown_distributed_key", "online", {"distributed": {"num_process": 2}}, KeyError,
     r"'distributed\.num_process'\. Did you mean 'distributed\.num_processes'\?"),
    ("unknown_value_key", "online", {"value": {"optm": {}}}, KeyError,
     r"'value\.optm'\. Did you mean 'value\.optim'\?"),
    ("unknown_model_type", "online", {"model.hf_config.model_type": "mamba"}, ValueError,
     r"Unknown model_type 'mamba' in the config; supported model_type values: llama"),
    ("vocab_smaller_than_tokenizer", "dpo", {"model.hf_config.vocab_size": 10}, ValueError,
     r"tokenizer vocab_size=\d+ exceeds the model's embedding vocab_size=10.*Set the model "
     r"config's vocab_size to at least"),
    ("offline_missing_loss", "dpo", {"loss": ""}, ValueError,
     r"config\.loss is required for paradigm 'preference'; one of"),
    ("offline_loss_wrong_family", "dpo", {"loss": "ppo_clip"}, ValueError,
     r"config\.loss='ppo_clip' is not a 'preference' loss; use one of"),
    ("offline_unknown_paradigm", "dpo", {"paradigm": "dpo"}, ValueError,
     r"config\.paradigm='dpo' is unknown; use one of"),
    ("offline_packing_not_sft", "dpo", {"data.packing": True}, ValueError,
     r"config\.data\.packing=True applies to paradigm 'sft' only"),
    ("offline_precompute_and_reference_free", "dpo",
     {"precompute_ref": True, "reference_free": True}, ValueError,
     r"config\.precompute_ref and config\.reference_free are exclusive"),
    ("online_no_prompts_per_step", "online", {"train.prompts_per_step": 0}, ValueError,
     r"config key 'train\.prompts_per_step'=0 must be > 0"),
    ("offline_no_batch_size", "dpo", {"train.batch_size": 0}, ValueError,
     r"config key 'train\.batch_size'=0 must be > 0"),
    ("online_negative_learning_rate", "online", {"optim.learning_rate": -1e-3}, ValueError,
     r"optim\.learning_rate=-0\.001 must be a finite number >= 0"),
    ("offline_negative_learning_rate", "dpo", {"optim.learning_rate": -1e-3}, ValueError,
     r"optim\.learning_rate=-0\.001 must be a finite number >= 0"),
    ("offline_beta_out_of_range", "dpo", {"optim.b2": 1.0}, ValueError,
     r"optim\.b2=1\.0 must be in \[0, 1\)"),
]


@pytest.mark.parametrize("name,arg,changes,exc,msg", CONFIG_CASES,
                         ids=[c[0] for c in CONFIG_CASES])
def test_bad_config_is_named(name, arg, changes, exc, msg, tmp_path):
  del name
  workdir = tmp_path / "w"
  c = _config(arg, workdir, **changes)
  train = online_loop.train if arg == "online" else offline_loop.train
  with pytest.raises(exc, match=msg):
    train(c)
  assert _files_under(workdir) == []  # nothing half-written


def test_jsonl_data_source_errors_name_file_line_and_fix(tmp_path):
  """Loop-level: a malformed JSONL line names the file, the line and the fix."""
  path = tmp_path / "train.jsonl"
  rec = {"prompt": "ab", "chosen": "aa", "rejected": "bb"}
  path.write_text(json.dumps(rec) + "\n{\"prompt\": \"ab\", \"chosen\": \n")
  c = _config("dpo", tmp_path / "w", **{"data.source": "jsonl", "data.path": str(path)})
  with pytest.raises(DataFormatError,
                     match=re.escape(f"{path}:2: malformed JSON") + r".*skip_invalid=True"):
    offline_loop.train(c)
  assert _files_under(tmp_path / "w") == []


JSONL_CASES = [
    ("missing_field", [{"prompt": "a", "chosen": "b"}], "preference",
     r"train\.jsonl:1: missing field 'rejected'"),
    ("wrong_field_type", [{"prompt": 3.5, "chosen": "b", "rejected": "c"}], "preference",
     r"train\.jsonl:1: field 'prompt': expected str or list of chat messages"),
    ("not_an_object", [["prompt", "chosen"]], "auto",
     r"train\.jsonl:1: expected a JSON object, got list"),
    ("unknown_fields", [{"question": "a", "reply": "b"}], "auto",
     r"cannot infer the dataset format from fields \['question', 'reply'\]"),
    ("empty_file", [], "auto", r"train\.jsonl: no valid records \(empty dataset\)"),
]


@pytest.mark.parametrize("name,records,fmt,msg", JSONL_CASES, ids=[c[0] for c in JSONL_CASES])
def test_bad_jsonl_records(name, records, fmt, msg, tmp_path):
  del name
  path = tmp_path / "train.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  with pytest.raises(DataFormatError, match=msg):
    data_lib.load_jsonl(path, format=fmt)


def test_jsonl_missing_file_and_unknown_format(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"JSONL dataset '.*nope\.jsonl' does not exist"):
    data_lib.load_jsonl(tmp_path / "nope.jsonl")
  with pytest.raises(ValueError, match=r"unknown format 'pairs'; choose 'auto' or one of"):
    data_lib.load_jsonl(tmp_path / "nope.jsonl", format="pairs")


def test_text_outside_vocabulary_and_too_long_prompt():
  tok = data_lib.CharTokenizer()
  with pytest.raises(ValueError, match=r"CharTokenizer: character '€' at position 1"):
    tok.encode("a€")
  with pytest.raises(ValueError, match=r"more than data\.max_prompt_length=3; raise it"):
    build.encode_prompts(tok, ["1+23="], length=3)
  with pytest.raises(ValueError, match=r"more than sampling\.max_new_tokens=2; raise "
                                       r"max_new_tokens"):
    build.encode_answers(tok, ["123"], length=2)


def test_checkpoint_tensor_shape_and_missing_model_dir(tmp_path):
  model = models.from_config(TINY)
  models.save_hf(str(tmp_path / "m"), model, model.init(jax.random.PRNGKey(0)))
  cfg_path = tmp_path / "m" / "config.json"
  hf = json.loads(cfg_path.read_text())
  hf["intermediate_size"] = 48
  cfg_path.write_text(json.dumps(hf))
  with pytest.raises(ValueError, match=r"Checkpoint tensor '.*mlp.*' has shape \(\d+, \d+\) but "
                                       r"the config expects .*config\.json and weights disagree"):
    models.load_hf(str(tmp_path / "m"))
  with pytest.raises(FileNotFoundError, match=r"Checkpoint directory .*missing does not exist"):
    models.load_hf(str(tmp_path / "missing"))


def _tiny_state():
  return {"w": jnp.arange(2048, dtype=jnp.float32).reshape(32, 64), "step": jnp.int32(3)}


def _saved(tmp_path, config=None):
  ck = ckpt_lib.Checkpointer(tmp_path / "checkpoints", async_save=False, max_to_keep=None)
  for step in (1, 2):
    ck.save(step, _tiny_state(), config=config or {"model": {"hidden_size": 32}}, force=True)
  ck.wait()
  return ck


def test_truncated_checkpoint_names_step_and_file(tmp_path):
  ck = _saved(tmp_path)
  files = _files_under(ck.step_dir(2))
  big = max(files, key=os.path.getsize)
  size = os.path.getsize(big)
  with open(big, "r+b") as f:
    f.truncate(size // 2)
  rel = os.path.relpath(big, ck.step_dir(2))
  with pytest.raises(ckpt_lib.CheckpointError,
                     match=re.escape(f"checkpoint step 2: file {rel} has {size // 2} bytes, "
                                     f"expected {size} (truncated or overwritten)")):
    ck.restore(_tiny_state(), 2)
  before = sorted(_files_under(tmp_path))
  with pytest.warns(RuntimeWarning, match=r"checkpoint step 2: .*Falling back"):
    _, _, _, step = ck.restore_latest_valid(_tiny_state())
  assert step == 1 and sorted(_files_under(tmp_path)) == before  # restore writes nothing


def test_checkpoint_with_other_model_config_names_keys(tmp_path):
  """Loop-level: `Runner` refuses to resume a checkpoint of another model, saying which key."""
  _saved(tmp_path, config={"workdir": str(tmp_path), "model": {"hidden_size": 32}})
  c = ml_collections.ConfigDict(dict(workdir=str(tmp_path), resume="auto",
                                     checkpoint=dict(every_steps=1, async_save=False),
                                     model=dict(hidden_size=64)))
  with pytest.raises(ValueError, match=r"model\.hidden_size: checkpoint=32 current=64\n"
                                       r"Use the checkpoint's config for these keys or start a "
                                       r"new workdir"):
    Runner(c, _tiny_state())


def test_checkpoint_wrong_shapes_and_absent(tmp_path):
  ck = _saved(tmp_path)
  wrong = {"w": jnp.zeros((16, 64), jnp.float32), "step": jnp.int32(0)}
  with pytest.raises(ckpt_lib.CheckpointError, match=r"checkpoint step 2 at .* could not be "
                                                     r"restored"):
    ck.restore(wrong, 2)
  empty = ckpt_lib.Checkpointer(tmp_path / "none", async_save=False)
  with pytest.raises(FileNotFoundError, match=r"no committed checkpoint in .*none"):
    empty.restore(_tiny_state())


def _verifier_reward(check, **kw):
  tok = data_lib.CharTokenizer()
  fn = callback.python_verifier(check, decode=lambda ids: tok.decode(list(ids)), answer_key=None,
                                **kw)
  ids = jnp.asarray([tok.encode("12"), tok.encode("34")], jnp.int32)
  mask = jnp.ones(ids.shape, bool)
  return lambda: np.asarray(jax.jit(lambda i, m: fn(i, i, m, {}))(ids, mask))


def _raising(completion, answer):
  del answer
  raise ZeroDivisionError(f"cannot score {completion!r}")


def _sleeping(completion, answer):
  del completion, answer
  time.sleep(5)
  return 1.0


def _not_a_number(completion, answer):
  del completion, answer
  return "yes"


@pytest.mark.parametrize("check,msg", [
    (_raising, r"verifier '_raising' raised ZeroDivisionError: cannot score '12' on row 0; "
               r"pass fallback=<reward>"),
    (_sleeping, r"verifier '_sleeping' exceeded timeout_s=0\.2 on row 0; pass fallback="),
    (_not_a_number, r"verifier '_not_a_number' raised ValueError: .* on row 0"),
], ids=["raises", "times_out", "not_a_number"])
def test_bad_verifier_is_named(check, msg):
  with pytest.raises(Exception, match=msg):
    _verifier_reward(check, timeout_s=0.2)()
  # With a fallback the same rows score the fallback instead.
  np.testing.assert_array_equal(_verifier_reward(check, timeout_s=0.2, fallback=-1.0)(), [-1, -1])


def test_verifier_settings_and_code_sandbox():
  with pytest.raises(ValueError, match=r"timeout_s must be > 0, got 0"):
    callback.python_verifier(_raising, decode=str, timeout_s=0)
  t0 = time.time()
  assert callback.run_code_tests("while True:\n  pass\n", "assert True", timeout_s=1.0) == 0.0
  assert time.time() - t0 < 20  # killed in its subprocess, not hanging the trainer


def test_reward_weights_and_sampling_mismatch():
  ids = jnp.zeros((4, 3), jnp.int32)
  one = lambda p, c, m, e: jnp.ones((c.shape[0],))  # noqa: E731
  with pytest.raises(ValueError, match=r"rl\.reward_weights has 2 entries but the reward "
                                       r"functions return 1 rewards; give one weight per reward"):
    online.score([one], (1.0, 0.5), ids, ids, ids, {})
  model = models.from_config(TINY)
  settings = RLSettings.from_config(dict(group_size=4))
  opt = optim.make_optimizer(dict(learning_rate=1e-3))
  with pytest.raises(ValueError, match=r"sampling\.num_samples=2 differs from rl\.group_size=4; "
                                       r"set them equal"):
    online.make_update(model, [one], opt, settings, SamplingConfig(max_new_tokens=4,
                                                                   num_samples=2))
  with pytest.raises(ValueError, match=r"make_update needs at least one reward function"):
    online.make_update(model, [], opt, settings, SamplingConfig(max_new_tokens=4, num_samples=4))
