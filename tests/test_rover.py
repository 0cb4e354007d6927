"""ROVER in the online step: the vocabulary-mean log-probs of the LM-head pass, the
regression loss with targets built from them, the learn phase's objective at θ ≠ θ_old
(float64 references), and the signals phase's old-policy pass."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import advantages, losses
from rlhf_jax import models as M
from rlhf_jax.train import learn, phases
from rlhf_jax.train.rl_config import RLSettings
from tests.test_sampling import MODEL, PARAMS, VOCAB


def _log_softmax64(z):
  z = np.asarray(z, np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _ids(n=3, t=9, seed=0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.integers(1, VOCAB, (n, t)), jnp.int32)


@pytest.mark.parametrize("vocab_limit", [None, 11])
@pytest.mark.parametrize("chunk_size", [128, 3])
def test_vocab_mean_logps_equal_a_float64_reference(vocab_limit, chunk_size):
  ids = _ids()
  mask = jnp.ones_like(ids)
  lp, ent, vm = M.token_logps(MODEL, PARAMS, ids, mask, chunk_size=chunk_size,
                              vocab_limit=vocab_limit, vocab_mean=True)
  logits = np.asarray(MODEL.apply(PARAMS, ids, attention_mask=mask), np.float64)[:, :-1]
  real = logits[..., :vocab_limit] if vocab_limit else logits
  want = _log_softmax64(real).mean(-1)
  np.testing.assert_allclose(np.asarray(vm)[:, 1:], want, atol=1e-5)
  assert np.all(np.asarray(vm)[:, 0] == 0)
  lp2, ent2 = M.token_logps(MODEL, PARAMS, ids, mask, chunk_size=chunk_size,
                            vocab_limit=vocab_limit)  # the other outputs are unchanged
  np.testing.assert_array_equal(np.asarray(lp), np.asarray(lp2))
  np.testing.assert_array_equal(np.asarray(ent), np.asarray(ent2))


def test_completion_pass_gives_the_same_vocab_means():
  g, p = 2, 4
  ids = _ids(n=4, t=p + 5, seed=1)
  ids = ids.at[1].set(ids[0].at[p:].set(ids[1, p:])).at[3].set(ids[2].at[p:].set(ids[3, p:]))
  attn = jnp.ones_like(ids, bool)
  _, _, vm = phases.completion_logps(MODEL, PARAMS, ids, attn, p, g, vocab_mean=True)
  _, _, full = M.token_logps(MODEL, PARAMS, ids, attn, vocab_mean=True)
  np.testing.assert_allclose(np.asarray(vm), np.asarray(full)[:, p:], atol=1e-5)


def test_vocab_mean_is_refused_with_vocabulary_chunks():
  with pytest.raises(ValueError, match="vocab_chunk"):
    M.token_logps(MODEL, PARAMS, _ids(), None, vocab_chunk=8, vocab_mean=True)


def _np_rover(lp, old, r_tilde, vmlr, mask, rho):
  m = mask.astype(np.float64)
  v = vmlr * m
  v_next = np.concatenate([v[:, 1:], np.zeros_like(v[:, :1])], 1)
  y = (r_tilde[:, None] + rho * v_next) * m
  return np.where(m > 0, (rho * (lp - old) - y) ** 2, 0.0)


def test_rover_loss_builds_the_paper_targets():
  rng = np.random.default_rng(2)
  n, t, rho = 4, 6, 0.7
  lp, old = rng.normal(-2, 0.5, (2, n, t))
  r = rng.uniform(size=n)
  mask = np.ones((n, t))
  mask[0, 3:] = 0
  mask[2, 1:] = 0
  vmlr = rng.normal(0, 0.3, (n, t))
  r_tilde = r - np.repeat(r.reshape(-1, 2).mean(1), 2)
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  got, _ = losses.get("rover")(f32(lp), f32(old), f32(r_tilde), f32(mask),
                               vocab_mean_log_ratio=f32(vmlr), rho=rho)
  np.testing.assert_allclose(np.asarray(got), _np_rover(lp, old, r_tilde, vmlr, mask, rho),
                             rtol=1e-5, atol=1e-6)
  # The same as the targets form: advantages.rover's targets passed as the advantages.
  y = advantages.get("rover")(f32(r), vocab_mean_log_ratio=f32(vmlr), mask=f32(mask),
                              group_size=2, rho=rho)
  ref, _ = losses.get("rover")(f32(lp), f32(old), y, f32(mask), rho=rho)
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-6)
  # The targets carry no gradient: d loss / d vmlr = 0.
  g = jax.grad(lambda v: jnp.sum(losses.get("rover")(
      f32(lp), f32(old), f32(r_tilde), f32(mask), vocab_mean_log_ratio=v, rho=rho)[0]))(f32(vmlr))
  assert np.all(np.asarray(g) == 0)


def test_rover_is_declared_for_the_step():
  assert losses.declaration("rover").needs == ("vocab_mean_log_ratio",)
  decl = advantages.declaration("rover")
  assert decl.kind == "group" and "vocab_mean_log_ratio" in decl.needs
  assert "vocab_mean_log_ratio" in phases.STEP_INPUTS


# ----------------------------------------------------------------------------- learn phase

V, P, T, RHO = 5, 2, 4, 0.8


def _bigram(params, mb):
  ids = mb["ids"]
  logp = jax.nn.log_softmax(params["table"][ids[:, P - 1:-1]], axis=-1)
  lp = jnp.take_along_axis(logp, ids[:, P:, None], axis=-1)[..., 0]
  ent = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
  return lp, ent, jnp.mean(logp, axis=-1)


def _np_bigram(table, ids):
  logp = _log_softmax64(table[ids[:, P - 1:-1]])
  return np.take_along_axis(logp, ids[:, P:, None], axis=-1)[..., 0], logp.mean(-1)


def _settings(**kw):
  return RLSettings.from_config(dict(group_size=2, advantage="rover", surrogate="rover",
                                     surrogate_kwargs={"rho": RHO}, kl_coef=0.0,
                                     aggregation="token_mean", **kw))


def test_objective_uses_the_current_ratio_at_theta_not_theta_old():
  rng = np.random.default_rng(3)
  table_old = rng.normal(0, 1, (V, V))
  table = table_old + rng.normal(0, 0.3, (V, V))  # after an update: θ ≠ θ_old
  n = 4
  ids = rng.integers(0, V, (n, P + T)).astype(np.int32)
  mask = np.ones((n, T))
  mask[1, 2:] = 0
  old_lp, old_vm = _np_bigram(table_old, ids)
  r_tilde = rng.normal(0, 1, n)
  mb = {"ids": ids, "attn": np.ones((n, P + T), bool), "mask": mask, "old_logps": old_lp * mask,
        "ref_logps": old_lp * mask, "advantages": r_tilde, "old_vocab_mean_logps": old_vm * mask}
  jmb = dict({k: jnp.asarray(v) for k, v in mb.items()}, prompt_len=P)
  obj = learn.make_objective(None, _settings(), policy_logps=_bigram)
  params = {"table": jnp.asarray(table, jnp.float32)}
  loss, aux = obj(params, None, jmb, jnp.float32(1.0), jnp.float32(0.0))

  def np_loss(tab, target_tab=table):
    lp, _ = _np_bigram(tab, ids)
    _, vm = _np_bigram(target_tab, ids)  # the targets are stop-gradient at the current θ
    return _np_rover(lp, old_lp, r_tilde, vm - old_vm, mask, RHO).sum()

  np.testing.assert_allclose(float(aux["pg_loss"]), np_loss(table), rtol=1e-5)
  grad = jax.grad(lambda p: obj(p, None, jmb, jnp.float32(1.0), jnp.float32(0.0))[0])(params)
  h, num = 1e-6, np.zeros_like(table)
  for i in np.ndindex(table.shape):
    e = np.zeros_like(table)
    e[i] = h
    num[i] = (np_loss(table + e) - np_loss(table - e)) / (2 * h)
  np.testing.assert_allclose(np.asarray(grad["table"]), num, rtol=1e-4, atol=1e-5)
  # Without the old means (one update: θ = θ_old) the ratio is 0: plain centred targets.
  jmb0 = {k: v for k, v in jmb.items() if k != "old_vocab_mean_logps"}
  _, aux0 = obj(params, None, jmb0, jnp.float32(1.0), jnp.float32(0.0))
  lp, _ = _np_bigram(table, ids)
  np.testing.assert_allclose(float(aux0["pg_loss"]),
                             _np_rover(lp, old_lp, r_tilde, np.zeros((n, T)), mask, RHO).sum(),
                             rtol=1e-5)


def test_old_pass_only_when_the_data_trains_in_several_updates():
  assert not learn.old_vocab_mean_needed(_settings())
  assert learn.old_vocab_mean_needed(_settings(epochs=2))
  assert learn.old_vocab_mean_needed(_settings(num_minibatches=2))
  assert not learn.old_vocab_mean_needed(RLSettings.from_config(dict(group_size=2)))


def test_signals_phase_records_the_sampling_policys_vocab_means():
  g, p = 2, 4
  ids = _ids(n=4, t=p + 5, seed=4)
  ids = ids.at[1, :p].set(ids[0, :p]).at[3, :p].set(ids[2, :p])
  attn = jnp.ones_like(ids, bool)
  mask = jnp.ones((4, 5), jnp.float32).at[0, 3:].set(0.0)
  ro = phases.Rollout(prompt_ids=ids[:, :p], prompt_mask=attn[:, :p], completion_ids=ids[:, p:],
                      completion_mask=mask.astype(bool), loss_mask=mask,
                      logps=jnp.zeros((4, 5)), lengths=jnp.sum(mask, 1),
                      finished=jnp.ones((4,), bool))
  common = dict(group_size=g, kl_in_reward=False)
  sig = phases.signals(MODEL, PARAMS, ro, jnp.zeros(4), jnp.float32(0.0), **common)
  assert sig.old_vocab_mean_logps is None
  sig = phases.signals(MODEL, PARAMS, ro, jnp.zeros(4), jnp.float32(0.0),
                       policy_params=PARAMS, **common)
  _, _, full = M.token_logps(MODEL, PARAMS, ids, attn, vocab_mean=True)
  np.testing.assert_allclose(np.asarray(sig.old_vocab_mean_logps),
                             np.asarray(full)[:, p:] * np.asarray(mask), atol=1e-5)
