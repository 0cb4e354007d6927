"""The offline batch losses against independent float64 numpy references built from the
model's logits / rewards, packing invariance, precomputed references, and clear errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import losses, models
from rlhf_jax.data import CharTokenizer, PreferenceTask, pipeline
from rlhf_jax.train import offline, offline_config
from rlhf_jax.train import offline_data as od

TOK = CharTokenizer()
T, B = 16, 4
LM = models.from_config(dict(offline_config.tiny_llama(), vocab_size=TOK.vocab_size))
P0 = LM.init(jax.random.PRNGKey(0))
P1 = LM.init(jax.random.PRNGKey(1))
PAIRS = PreferenceTask(max_len=6).generate(B, seed=3)


def _np_batch(batch):
  return {k: jnp.asarray(v) for k, v in batch.items()
          if isinstance(v, np.ndarray) and v.dtype != object}


def _pref_batch():
  it = pipeline.preference_batches(PAIRS, TOK, batch_size=B, max_prompt_length=8,
                                   max_length=T, shuffle=False)
  return _np_batch(next(it))


def _np_seq_logps(params, ids, loss_mask):
  """Σ_t loss_mask[t] log p(ids[t] | ids[:t]) in float64 from full-sequence logits."""
  out = []
  for row, m in zip(np.asarray(ids), np.asarray(loss_mask)):
    n = int(np.nonzero(row != TOK.pad_id)[0].max()) + 1 if (row != TOK.pad_id).any() else 0
    logits = np.asarray(LM.apply(params, row[None, :n]), np.float64)[0]
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    lp = logits[np.arange(n - 1), row[1:n]] - logz[:n - 1]
    out.append(float(np.sum(lp * m[1:n])))
  return np.asarray(out)


def _log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def test_dpo_batch_loss_matches_numpy_reference():
  batch = _pref_batch()
  fn = jax.jit(offline.make_batch_loss("preference", LM, losses.get("dpo"), {"beta": 0.3}))
  loss, metrics = fn(P0, P1, batch)
  c, r = (_np_seq_logps(P0, batch[f"{s}_ids"], batch[f"{s}_loss_mask"])
          for s in ("chosen", "rejected"))
  rc, rr = (_np_seq_logps(P1, batch[f"{s}_ids"], batch[f"{s}_loss_mask"])
            for s in ("chosen", "rejected"))
  want = np.mean(-_log_sigmoid(0.3 * ((c - rc) - (r - rr))))
  np.testing.assert_allclose(float(loss), want, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(float(metrics["implicit_reward_accuracy"]),
                             np.mean((c - rc) > (r - rr)))
  np.testing.assert_allclose(float(metrics["implicit_reward_margin"]),
                             np.mean((c - rc) - (r - rr)), rtol=1e-4, atol=1e-4)


def test_precomputed_reference_gives_same_loss_and_grads():
  batch = _pref_batch()
  fn = offline.make_batch_loss("preference", LM, losses.get("ipo"), {"beta": 0.5})
  g = jax.jit(jax.value_and_grad(fn, has_aux=True))
  ref = offline.make_ref_logps(LM)(P1, batch)
  (l1, _), g1 = g(P0, P1, batch)
  (l2, _), g2 = g(P0, None, dict(batch, **ref))
  np.testing.assert_allclose(float(l1), float(l2), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    # Two programs, float32: equal up to rounding at the scale of the leaf's gradient.
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                               atol=1e-5 * float(np.abs(np.asarray(a)).max()))


def test_kto_unpaired_loss_matches_numpy_reference():
  src = od.to_unpaired(PAIRS)
  assert [src[i]["label"] for i in range(4)] == [True, False, True, False]
  assert src[0]["completion"] == PAIRS[0]["chosen"]
  assert src[0]["kl_completion"] == PAIRS[1]["rejected"]  # another prompt's completion
  fn_ex, collate = od.batch_fns("unpaired", TOK, dict(max_length=T, max_prompt_length=8))
  batch = _np_batch(collate([fn_ex(src[i], i) for i in range(B)]))
  loss_fn = offline.make_batch_loss("preference", LM, losses.get("kto"), {"beta": 0.2})
  loss, metrics = jax.jit(loss_fn)(P0, P1, batch)
  lp, ref = (_np_seq_logps(p, batch["completion_ids"], batch["completion_loss_mask"])
             for p in (P0, P1))
  kl, ref_kl = (_np_seq_logps(p, batch["kl_ids"], batch["kl_loss_mask"]) for p in (P0, P1))
  z = max(0.0, np.mean(kl - ref_kl))
  d = np.asarray(batch["label"]) > 0.5
  sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
  want = np.mean(np.where(d, 1 - sig(0.2 * (lp - ref - z)), 1 - sig(0.2 * (z - lp + ref))))
  np.testing.assert_allclose(float(loss), want, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(float(metrics["kl_estimate"]), z, rtol=1e-4, atol=1e-5)


def test_reward_model_bt_and_plackett_luce_reduction():
  rm = LM.with_head("reward")
  params = rm.init(jax.random.PRNGKey(2))
  batch = _pref_batch()
  bt = jax.jit(offline.make_batch_loss("reward_model", rm, losses.get("bt")))
  pl = jax.jit(offline.make_batch_loss("reward_model", rm, losses.get("plackett_luce")))
  loss, m = bt(params, None, batch)
  cr = np.asarray(rm.apply(params, batch["chosen_ids"], batch["chosen_mask"]), np.float64)
  rr = np.asarray(rm.apply(params, batch["rejected_ids"], batch["rejected_mask"]), np.float64)
  np.testing.assert_allclose(float(loss), np.mean(-_log_sigmoid(cr - rr)), rtol=1e-5)
  np.testing.assert_allclose(float(m["accuracy"]), np.mean(cr > rr))
  # Plackett-Luce over a list of two (chosen first) is Bradley-Terry.
  np.testing.assert_allclose(float(pl(params, None, batch)[0]), float(loss), rtol=1e-5)
  # A numeric batch field reaches the loss argument of the same name (data.passthrough).
  margin = np.linspace(0.0, 1.5, B).astype(np.float32)
  btm = jax.jit(offline.make_batch_loss("reward_model", rm, losses.get("bt_margin")))
  got = btm(params, None, dict(batch, margin=jnp.asarray(margin)))[0]
  np.testing.assert_allclose(float(got), np.mean(-_log_sigmoid(cr - rr - margin)), rtol=1e-5)
  # HelpSteer2-Preference: the records' scores (chosen_reward / rejected_reward) are the
  # regression targets of bt_regression: c_bt·BT + c_reg·½[(r_w − t_w)² + (r_l − t_l)²].
  tw = np.linspace(-1.0, 2.0, B).astype(np.float32)
  tl = np.linspace(0.5, -0.5, B).astype(np.float32)
  reg = jax.jit(offline.make_batch_loss("reward_model", rm, losses.get("bt_regression"),
                                        {"regression_coef": 0.7, "bt_coef": 0.4}))
  got = reg(params, None, dict(batch, chosen_reward=jnp.asarray(tw),
                               rejected_reward=jnp.asarray(tl)))[0]
  want = np.mean(0.4 * -_log_sigmoid(cr - rr)
                 + 0.7 * 0.5 * ((cr - tw) ** 2 + (rr - tl) ** 2))
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  with pytest.raises(ValueError, match="chosen_targets"):  # no scores: named
    reg(params, None, batch)


def test_packed_sft_equals_unpacked():
  recs = [{"prompt": p["prompt"], "completion": p["chosen"]} for p in PAIRS]
  unpacked = _np_batch(next(pipeline.sft_batches(recs, TOK, batch_size=B, max_length=T,
                                                 shuffle=False)))
  packed = _np_batch(next(pipeline.sft_batches(recs, TOK, batch_size=2, max_length=2 * T,
                                               pack=True, shuffle=False)))
  assert int(packed["segment_ids"].max()) >= 2  # rows really hold several examples
  f = lambda p, b, packed: offline.sft_loss(LM, p, b, packed=packed)[0]  # noqa: E731
  f = jax.jit(f, static_argnums=2)
  np.testing.assert_allclose(float(f(P0, packed, True)), float(f(P0, unpacked, False)),
                             rtol=1e-5)


def test_step_updates_and_skips_nonfinite():
  import optax  # pylint: disable=import-outside-toplevel
  opt = optax.sgd(0.1)
  batch = _pref_batch()
  step = offline.make_step("preference", LM, losses.get("dpo"), opt, donate=False)
  st = offline.init_state(P0, opt, ref_params=P1)
  st2, m = step(st, batch)
  assert int(st2.step) == 1 and float(m["skipped"]) == 0.0
  bad = dict(batch, ref_chosen_logps=jnp.full((B,), jnp.nan),
             ref_rejected_logps=jnp.zeros((B,)))
  st3, m = step(st2, bad)
  assert float(m["skipped"]) == 1.0
  for a, b in zip(jax.tree.leaves(st2.params), jax.tree.leaves(st3.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_clear_errors():
  batch = _pref_batch()
  with pytest.raises(ValueError, match="loss_kwargs has 'bta'"):
    offline.make_batch_loss("preference", LM, losses.get("dpo"), {"bta": 1.0})(P0, P1, batch)
  with pytest.raises(KeyError, match="missing.*rejected_ids"):
    offline.make_batch_loss("preference", LM, losses.get("dpo"))(
        P0, P1, {k: v for k, v in batch.items() if k != "rejected_ids"})
  with pytest.raises(ValueError, match="paradigm='ppo' is unknown"):
    offline.make_batch_loss("ppo", LM, None)
  with pytest.raises(ValueError, match="osp needs 'preference_strength'"):
    offline.make_batch_loss("preference", LM, losses.get("osp"))(P0, P1, batch)
  with pytest.raises(KeyError, match="no field 'chosen'"):
    od.to_unpaired([{"prompt": "a>", "text": "b"}])[0]



def test_a_loss_input_the_batch_lacks_names_the_fixes():
  available = {"chosen_logps": jnp.zeros(2), "rejected_logps": jnp.zeros(2)}
  with pytest.raises(ValueError, match=r"osp needs 'preference_strength', which this batch "
                     r"cannot provide \(it provides \['chosen_logps', 'rejected_logps'\]\); "
                     r"pass a constant in config\.loss_kwargs, a per-example field of the "
                     r"records through config\.data\.passthrough"):
    offline.call_with_available(losses.get("osp"), available, {}, "osp")
