"""SSPO's preference-degree variants (`config.data.degrees`): the variants, their batches,
the policy's degree logits against its full logits, the loss wiring against a float64
reference, and the named errors."""

from __future__ import annotations

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from offline_testlib import config
from rlhf_jax import losses
from rlhf_jax.data import batching
from rlhf_jax.train import degrees, offline, offline_data as od, offline_loop
from test_offline_step import LM, P0, P1, TOK

T = 20
DEG = degrees.settings({"max_removed": 2, "key": "a"})
RECORDS = [dict(prompt="abcd>", chosen="aabca", rejected="dd"),
           dict(prompt="bbcc>", chosen="cab", rejected="a"),      # one key part: k=2 invalid
           dict(prompt="ddcb>", chosen="bcd", rejected="aaa"),    # none: k=1, 2 invalid
           dict(prompt="acbd>", chosen="aaaa", rejected="b")]


def test_remove_parts():
  rng = np.random.default_rng(0)
  for k in range(4):
    out = degrees.remove_parts("the cat sat on a mat", r"\S+", k, np.random.default_rng(k))
    assert len(out.split()) == 6 - k
    assert all(w in "the cat sat on a mat".split() for w in out.split())
  assert degrees.remove_parts("aXbXa", "X", 2, rng) == "aba"
  assert degrees.remove_parts("aXb", "X", 2, rng) is None
  assert degrees.remove_parts("abc", "X", 0, rng) == "abc"
  a = degrees.attach(RECORDS, DEG, seed=3)
  b = degrees.attach(RECORDS, DEG, seed=3)
  assert [r["degree_responses"] for r in a] == [r["degree_responses"] for r in b]
  first = a[0]["degree_responses"]
  assert first[0] == "aabca" and [v.count("a") for v in first] == [3, 2, 1]
  assert [len(v) for v in first] == [5, 4, 3]
  assert a[1]["degree_responses"][2] is None and a[2]["degree_responses"][1:] == [None, None]


def _batch(records=RECORDS, length=T):
  d = dict(max_prompt_length=8, max_length=length, truncation="error")
  fns = od.batch_fns("preference", TOK, d)
  encode = batching.make_response_encoder(TOK, **d)
  fn, coll = degrees.wrap(*fns, encode, TOK.pad_id, length)
  recs = degrees.attach(records, DEG, seed=0)
  out = coll([fn(recs[i], i) for i in range(len(recs))])
  return {k: jnp.asarray(v) for k, v in out.items() if isinstance(v, np.ndarray)}


def test_degree_batches():
  b = _batch()
  assert b["degree_ids"].shape == (4, 3, T) and b["degree_loss_mask"].shape == (4, 3, T)
  np.testing.assert_array_equal(b["degree_labels"], np.tile(np.arange(3), (4, 1)))
  np.testing.assert_array_equal(b["degree_valid"], [[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]])
  np.testing.assert_array_equal(b["degree_ids"][:, 0], b["chosen_ids"])  # k = 0: the chosen
  np.testing.assert_array_equal(b["degree_mask"][:, 0], b["chosen_mask"])
  lens = np.asarray(b["degree_loss_mask"][0].sum(-1))
  np.testing.assert_array_equal(lens, [6, 5, 4])  # 5, 4, 3 letters + EOS


def test_degree_logits_against_the_full_logits_and_padding():
  b = _batch()
  classes = degrees.class_ids(TOK, DEG["class_tokens"])
  got = np.asarray(jax.jit(lambda p, x: degrees.degree_logits(LM, p, x, classes))(P1, b))
  ids = np.asarray(b["degree_ids"]).reshape(12, T)
  mask = np.asarray(b["degree_mask"]).reshape(12, T)
  full = np.asarray(LM.apply(P1, jnp.asarray(ids), jnp.asarray(mask)), np.float64)  # [12, T, V]
  last = mask.sum(1) - 1
  want = full[np.arange(12), last][:, list(classes)].reshape(4, 3, 3)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  longer = _batch(length=T + 7)
  np.testing.assert_allclose(degrees.degree_logits(LM, P1, longer, classes), got,
                             rtol=1e-5, atol=1e-5)


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_sspo_batch_loss_is_dpo_plus_the_masked_degree_cross_entropy():
  b = _batch()
  classes = degrees.class_ids(TOK, DEG["class_tokens"])
  kw = {"beta": 0.1, "weight": 0.7}
  sspo = offline.make_batch_loss("preference", LM, losses.get("sspo"), kw,
                                 degree_tokens=classes)
  dpo = offline.make_batch_loss("preference", LM, losses.get("dpo"), {"beta": 0.1})
  got, metrics = jax.jit(sspo)(P1, P0, b)
  base, _ = jax.jit(dpo)(P1, P0, b)
  logits = np.asarray(degrees.degree_logits(LM, P1, b, classes), np.float64)
  valid = np.asarray(b["degree_valid"], bool)
  ce = -_log_softmax(logits)[:, np.arange(3), np.arange(3)]  # [B, M]: the label is k
  per_row = np.array([ce[i][valid[i]].mean() for i in range(4)])
  np.testing.assert_allclose(float(got) - float(base), 0.7 * per_row.mean(), rtol=1e-4,
                             atol=1e-6)
  hit = (logits.argmax(-1) == np.arange(3)) & valid
  np.testing.assert_allclose(float(metrics["degree_accuracy"]), hit.sum() / valid.sum())
  g = jax.grad(lambda p: sspo(p, P0, b)[0])(P1)  # the degree term trains the policy
  g0 = jax.grad(lambda p: dpo(p, P0, b)[0])(P1)
  assert max(float(jnp.abs(x - y).max()) for x, y in zip(jax.tree.leaves(g),
                                                         jax.tree.leaves(g0))) > 1e-6


@pytest.mark.parametrize("degrees_cfg,loss,paradigm,match", [
    (None, "sspo", "preference", r"config\.loss='sspo' classifies preference degrees"),
    ({"max_removed": 2}, "dpo", "preference", r"only a loss\s+taking degree_logits"),
    ({"max_removed": 0}, "sspo", "preference", r"max_removed must be an integer >= 1"),
    ({"max_removed": 2, "keys": "a"}, "sspo", "preference", r"unknown keys \['keys'\]"),
    ({"max_removed": 1, "key": "a*"}, "sspo", "preference", r"matches the empty string"),
    ({"max_removed": 1, "key": "("}, "sspo", "preference", r"is not a regular expression"),
    ({"max_removed": 1, "class_tokens": ["0"]}, "sspo", "preference", r"must be 2 non-empty"),
    ({"max_removed": 1, "class_tokens": ["no", "yes"]}, "sspo", "preference",
     r"'no' encodes to 2 tokens"),
    ({"max_removed": 1}, "bt", "reward_model", r"paradigm 'preference' only"),
])
def test_degree_config_errors_are_named_before_anything_is_written(tmp_path, degrees_cfg, loss,
                                                                   paradigm, match):
  c = config(paradigm, tmp_path / "w", loss)
  c.data.degrees = degrees_cfg
  with pytest.raises(ValueError, match=match):
    offline_loop.train(c)
  assert not os.path.exists(tmp_path / "w")


def test_class_ids():
  assert degrees.class_ids(TOK, ("0", "1")) == tuple(TOK.encode("0") + TOK.encode("1"))
  with pytest.raises(ValueError, match=re.escape("share token ids")):
    degrees.class_ids(TOK, ("1", "1"))
