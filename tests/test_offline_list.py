"""Listwise preference losses (PRO, TRPA) in the offline step and loop: ranked-list batches
[B, K, T], pairs as lists of two, padding of short lists, the "ranked" JSONL format."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import safetensors.numpy

from offline_testlib import config as _config  # tests/offline_testlib.py
from offline_testlib import pairs as _pairs
from offline_testlib import run_config as _run
from rlhf_jax import losses, models
from rlhf_jax.data import DataFormatError, load_jsonl, write_jsonl
from rlhf_jax.data.tokenizer import CharTokenizer
from rlhf_jax.train import offline
from rlhf_jax.train import offline_data as od

HF = dict(model_type="llama", vocab_size=32, hidden_size=16, num_hidden_layers=1,
          num_attention_heads=2, num_key_value_heads=2, intermediate_size=32,
          max_position_embeddings=32)
B, K, T = 3, 4, 10


def _list_batch(seed=0):
  rng = np.random.RandomState(seed)
  ids = rng.randint(1, HF["vocab_size"], (B, K, T)).astype(np.int32)
  lengths = rng.randint(5, T + 1, (B, K))
  mask = np.arange(T)[None, None, :] < lengths[..., None]
  loss_mask = mask & (np.arange(T)[None, None, :] >= 3)  # a 3-token prompt
  valid = np.ones((B, K), bool)
  valid[1, 3] = valid[2, 2:] = False
  return {"responses_ids": ids * mask, "responses_mask": mask,
          "responses_loss_mask": loss_mask & valid[..., None], "responses_valid": valid}


def _seq_logps_np(model, params, ids, mask, loss_mask):
  """Summed float64 log-probs of the loss-mask tokens, from the model's logits."""
  logits = np.asarray(model.apply(params, ids, attention_mask=mask), np.float64)
  logz = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1)) + logits.max(-1)
  lp = np.take_along_axis(logits[:, :-1], ids[:, 1:, None], -1)[..., 0] - logz[:, :-1]
  lp = np.concatenate([np.zeros((ids.shape[0], 1)), lp], 1)  # token t given tokens < t
  m = np.asarray(loss_mask, np.float64)
  return (lp * m).sum(1), m.sum(1)


def _pro_np(s, valid, temperature, sft_weight):
  """PRO: −Σ_k log[exp(s_k/T) / Σ_{j≥k} exp(s_j/T)] over valid entries − w · s_best."""
  out = []
  for row, v in zip(s, valid):
    x = row[v] / temperature
    pl = sum(np.log(np.sum(np.exp(x[k:]))) - x[k] for k in range(len(x)))
    out.append(pl - sft_weight * row[v][0])
  return np.array(out)


@pytest.fixture(scope="module")
def model_params():
  model = models.from_config(HF)
  return model, model.init(jax.random.PRNGKey(0))


def test_list_batch_loss_matches_float64_pro(model_params):
  model, params = model_params
  batch = _list_batch()
  loss_fn = offline.make_batch_loss("preference", model, losses.get("pro"),
                                    dict(temperature=0.7, sft_weight=0.1))
  loss, metrics = jax.jit(loss_fn)(params, None, batch)
  flat = {k: batch[k].reshape(B * K, T) for k in ("responses_ids", "responses_mask",
                                                   "responses_loss_mask")}
  lp, n = _seq_logps_np(model, params, flat["responses_ids"], flat["responses_mask"],
                        flat["responses_loss_mask"])
  s = (lp / np.maximum(n, 1)).reshape(B, K)
  want = _pro_np(s, batch["responses_valid"], 0.7, 0.1).mean()
  np.testing.assert_allclose(loss, want, rtol=2e-5)
  assert metrics["num_valid_responses"] == pytest.approx(batch["responses_valid"].sum() / B)


def test_padded_list_entries_change_nothing(model_params):
  model, params = model_params
  batch = _list_batch()
  loss_fn = jax.jit(offline.make_batch_loss("preference", model, losses.get("pro"), {}))
  other = dict(batch)
  bad = ~batch["responses_valid"]
  other["responses_ids"] = np.where(bad[..., None], 7, batch["responses_ids"])
  other["responses_mask"] = batch["responses_mask"] | bad[..., None]
  a, _ = loss_fn(params, None, batch)
  b, _ = loss_fn(params, None, other)
  assert float(a) == pytest.approx(float(b), rel=1e-6)
  g = jax.grad(lambda p: loss_fn(p, None, batch)[0])(params)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(g))


def test_pairs_are_lists_of_two(model_params):
  """On a paired batch a listwise loss sees [chosen, rejected]: PRO with K=2, T=1, w=0 is
  −log σ(s_c − s_r) on length-normalised log-probs."""
  model, params = model_params
  lb = _list_batch()
  pair = {}
  for side, k in (("chosen", 0), ("rejected", 1)):
    for part in ("ids", "mask", "loss_mask"):
      pair[f"{side}_{part}"] = lb[f"responses_{part}"][:, k]
  loss, _ = jax.jit(offline.make_batch_loss("preference", model, losses.get("pro"),
                                            dict(sft_weight=0.0)))(params, None, pair)
  lp, n = _seq_logps_np(model, params, lb["responses_ids"][:, :2].reshape(-1, T),
                        lb["responses_mask"][:, :2].reshape(-1, T),
                        lb["responses_loss_mask"][:, :2].reshape(-1, T))
  s = (lp / n).reshape(B, 2)
  want = np.mean(np.log1p(np.exp(-(s[:, 0] - s[:, 1]))))
  np.testing.assert_allclose(loss, want, rtol=2e-5)


def test_trpa_gets_levels_and_reference(model_params):
  model, params = model_params
  batch = dict(_list_batch(), levels=np.array([[1, 2, 3, 4], [1, 1, 2, 3], [2, 4, 1, 1]],
                                              np.int32))
  ref = jax.tree.map(lambda x: x * 0.9, params)
  opt = optax.sgd(0.1)
  step = offline.make_step("preference", model, losses.get("trpa"), opt, donate=False)
  state = offline.init_state(params, opt, ref_params=ref)
  state2, m = step(state, batch)
  assert np.isfinite(float(m["loss"])) and float(m["loss"]) > 0
  assert not np.allclose(jax.tree.leaves(state2.params)[0], jax.tree.leaves(params)[0])
  with pytest.raises(ValueError, match="ref_logps"):  # TRPA needs the reference
    offline.make_batch_loss("preference", model, losses.get("trpa"), {})(params, None, batch)


def test_collate_list_pads_short_lists_and_keeps_integer_levels():
  tok = CharTokenizer("abcd")
  fn = od.make_list_example_fn(tok, num_responses=3, max_prompt_length=4, max_length=10,
                               passthrough=("levels",))
  exs = [fn({"prompt": "ab", "responses": ["a", "bb", "c"], "levels": [1, 2, 2]}, 0),
         fn({"prompt": "c", "responses": ["dd", "a"], "levels": [1, 3]}, 1)]
  b = od.collate_list(exs, pad_id=tok.pad_id, max_length=10)
  assert b["responses_ids"].shape == (2, 3, 10) and b["responses_mask"].shape == (2, 3, 10)
  np.testing.assert_array_equal(b["responses_valid"], [[1, 1, 1], [1, 1, 0]])
  assert b["levels"].dtype == np.int32
  np.testing.assert_array_equal(b["levels"], [[1, 2, 2], [1, 3, 0]])
  assert b["responses_mask"][1, 2].sum() == 0 and b["responses_loss_mask"][1, 2].sum() == 0
  assert b["responses_loss_mask"][0, 1].sum() == len(tok.encode("bb")) + 1  # response + EOS
  with pytest.raises(ValueError, match="num_responses=3"):
    fn({"prompt": "a", "responses": ["a"] * 4, "levels": [1] * 4}, 2)
  with pytest.raises(ValueError, match="'levels' has 2 values for 3 responses"):
    fn({"prompt": "a", "responses": ["a", "b", "c"], "levels": [1, 2]}, 3)


def test_ranked_jsonl_format(tmp_path):
  p = tmp_path / "r.jsonl"
  write_jsonl(p, [{"prompt": "ab", "responses": ["a", "b", "c"]}])
  ds = load_jsonl(p)
  assert ds.format == "ranked" and ds.records[0]["responses"] == ["a", "b", "c"]
  write_jsonl(p, [{"prompt": "ab", "responses": ["a"]}])
  with pytest.raises(DataFormatError, match="responses.*>= 2"):
    load_jsonl(p, format="ranked")


def _ranked_records(n):
  """Synthetic pairs turned into ranked triples: chosen, rejected, then a worse variant."""
  out = []
  for r in _pairs(n):
    worse = r["rejected"] + "d" * 2
    out.append({"prompt": r["prompt"], "responses": [r["chosen"], r["rejected"], worse][:3],
                "levels": [1, 2, 3]})
  return out


@pytest.mark.parametrize("loss", ["pro", "trpa"])
def test_loop_trains_on_ranked_jsonl(tmp_path, loss):
  path = tmp_path / "ranked.jsonl"
  write_jsonl(path, _ranked_records(320))
  c = _config("preference", tmp_path / "run", loss)
  c.data.source, c.data.path = "jsonl", str(path)
  c.data.num_responses = 3
  c.data.max_length = 24
  c.data.eval_batch_size = 16
  c.data.passthrough = ("levels",)
  c.train.steps = 15
  s = _run(c)
  assert np.isfinite(s["eval_after"]["loss"])
  assert s["eval_after"]["loss"] < s["eval_before"]["loss"]


def test_loop_list_errors(tmp_path):
  path = tmp_path / "ranked.jsonl"
  write_jsonl(path, _ranked_records(64))
  c = _config("preference", tmp_path / "run", "dpo")
  c.data.source, c.data.path = "jsonl", str(path)
  with pytest.raises(ValueError, match="listwise preference loss"):
    _run(c)
  c.loss = "pro"
  with pytest.raises(ValueError, match="config.data.num_responses"):
    _run(c)


def test_loop_ranked_precompute_ref_matches_on_the_fly(tmp_path):
  path = tmp_path / "ranked.jsonl"
  write_jsonl(path, _ranked_records(160))  # eval: the first 16
  c = _config("preference", tmp_path / "a", "trpa")  # TRPA reads ref_logps [B, K]
  c.data.source, c.data.path = "jsonl", str(path)
  c.data.num_responses, c.data.max_length, c.data.eval_batch_size = 3, 24, 16
  c.data.passthrough = ("levels",)
  c.train.steps = 4
  on_the_fly = _run(c)
  c.workdir, c.precompute_ref = str(tmp_path / "b"), True
  cached = _run(c)
  files = sorted(f for f in os.listdir(tmp_path / "b") if f.startswith("ref_logps_"))
  assert [f.split("_")[2] for f in files] == ["eval", "train"]
  assert cached["state"].ref_params is None
  table = safetensors.numpy.load_file(str(tmp_path / "b" / files[1]))
  assert table["ref_responses_logps"].shape == (160, 3)
  assert np.all(np.isfinite(table["ref_responses_logps"]))
  for when in ("eval_before", "eval_after"):
    for k, v in on_the_fly[when].items():
      np.testing.assert_allclose(cached[when][k], v, rtol=1e-4, atol=1e-5, err_msg=f"{when} {k}")


def test_loop_pro_on_synthetic_pairs(tmp_path):
  c = _config("preference", tmp_path, "pro")
  c.train.steps = 10
  s = _run(c)
  assert s["eval_after"]["loss"] < s["eval_before"]["loss"]
