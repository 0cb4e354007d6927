"""Each phase of the online step alone: rollout, score, signals, estimate, learn.

The learn phase's objective (PPO-clip surrogate + β·k3 KL − entropy bonus + clipped value
loss, token-mean aggregated) and its gradient are checked against a float64 numpy
reference on a bigram policy (logits = table[previous token]); the epochs × minibatches ×
micro-batches split against a numpy loop of the same SGD updates.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax import models
from rlhf_jax.sampling.config import SamplingConfig
from rlhf_jax.train import learn, online, phases
from rlhf_jax.train.rl_config import RLSettings
from test_online import EOS, HF, PAD, prompts

V, P, T = 5, 2, 3
EPS, BETA, ENT, VCOEF, VCLIP = 0.2, 0.1, 0.05, 0.5, 0.2


# ----------------------------------------------------------------------------- learn


def _bigram_logps(params, mb):
  ids = mb["ids"]
  logits = params["table"][ids[:, P - 1:-1]]  # [n, T, V]: next-token logits
  logp = jax.nn.log_softmax(logits, axis=-1)
  lp = jnp.take_along_axis(logp, ids[:, P:, None], axis=-1)[..., 0]
  ent = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
  return lp, ent


def _values(vp, mb):
  return vp["w"][mb["ids"][:, P - 1:-1]]


def _np_objective(table, w, mb):
  """float64 numpy: the same objective from the definitions (docstrings of the losses)."""
  ids, mask = mb["ids"], mb["mask"].astype(np.float64)
  logits = table[ids[:, P - 1:-1]]
  logits = logits - logits.max(-1, keepdims=True)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  lp = np.take_along_axis(logp, ids[:, P:, None], axis=-1)[..., 0]
  ent = -(np.exp(logp) * logp).sum(-1)
  adv = np.asarray(mb["advantages"], np.float64)[:, None]
  ratio = np.exp(lp - mb["old_logps"])
  pg = np.maximum(-adv * ratio, -adv * np.clip(ratio, 1 - EPS, 1 + EPS))
  lr = mb["ref_logps"] - lp
  kl = np.expm1(lr) - lr
  per_token = pg + BETA * kl - ENT * ent
  n_tok = mask.sum()
  loss = (per_token * mask).sum() / n_tok
  v = w[ids[:, P - 1:-1]]
  old, ret = mb["old_values"], mb["returns"]
  vc = old + np.clip(v - old, -VCLIP, VCLIP)
  vl = 0.5 * np.maximum((v - ret) ** 2, (vc - ret) ** 2)
  return loss + VCOEF * (vl * mask).sum() / n_tok


def _np_grad(f, x, h=1e-6):
  g = np.zeros_like(x)
  for i in np.ndindex(x.shape):
    e = np.zeros_like(x)
    e[i] = h
    g[i] = (f(x + e) - f(x - e)) / (2 * h)
  return g


def _batch(n, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, V, size=(n, P + T)).astype(np.int32)
  mask = np.ones((n, T), np.float32)
  mask[0, 2:] = 0  # a short completion
  mask[3, 1:] = 0
  return {"ids": ids, "attn": np.ones((n, P + T), bool), "mask": mask,
          "old_logps": rng.normal(-1.6, 0.3, (n, T)).astype(np.float32) * mask,
          "ref_logps": rng.normal(-1.6, 0.3, (n, T)).astype(np.float32) * mask,
          "advantages": rng.normal(0, 1, (n,)).astype(np.float32),
          "old_values": rng.normal(0, 1, (n, T)).astype(np.float32) * mask,
          "returns": rng.normal(0, 1, (n, T)).astype(np.float32) * mask}


def _settings(**kw):
  return RLSettings.from_config(dict(group_size=2, kl_coef=BETA, entropy_coef=ENT,
                                     value_coef=VCOEF, value_clip=VCLIP, **kw))


def _objective(settings):
  return learn.make_objective(None, settings, policy_logps=_bigram_logps, value_fn=_values)


def test_learn_objective_and_gradient_equal_a_float64_reference():
  rng = np.random.default_rng(1)
  table = rng.normal(0, 1, (V, V))
  w = rng.normal(0, 1, (V,))
  mb = _batch(4)
  obj = _objective(_settings())
  params, vparams = {"table": jnp.asarray(table, jnp.float32)}, {"w": jnp.asarray(w, jnp.float32)}
  jmb = dict(jax.tree.map(jnp.asarray, mb), prompt_len=P)
  norm = jnp.sum(jmb["mask"])
  loss, aux = jax.jit(lambda p, v: obj(p, v, jmb, norm, BETA))(params, vparams)
  want = _np_objective(table, w, {k: np.asarray(v, np.float64) if k != "ids" else v
                                  for k, v in mb.items()})
  np.testing.assert_allclose(float(loss), want, rtol=1e-5, atol=1e-6)
  assert set(aux) == {"loss", "pg_loss", "kl", "entropy", "clip_fraction", "value_loss"}
  np.testing.assert_allclose(float(aux["loss"]), float(loss), rtol=1e-6)
  gp, gv = jax.grad(lambda p, v: obj(p, v, jmb, norm, BETA)[0], argnums=(0, 1))(params, vparams)
  mb64 = {k: np.asarray(v, np.float64) if k != "ids" else v for k, v in mb.items()}
  np.testing.assert_allclose(np.asarray(gp["table"]),
                             _np_grad(lambda t: _np_objective(t, w, mb64), table),
                             rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(gv["w"]),
                             _np_grad(lambda x: _np_objective(table, x, mb64), w),
                             rtol=1e-4, atol=1e-5)


def test_epochs_minibatches_micro_batches_equal_a_numpy_sgd_loop():
  epochs, nmb, lr, n = 2, 2, 0.5, 8
  settings = _settings(epochs=epochs, num_minibatches=nmb, micro_batches=2)
  rng = np.random.default_rng(2)
  table, w = rng.normal(0, 1, (V, V)), rng.normal(0, 1, (V,))
  data = _batch(n, seed=3)
  key = jax.random.PRNGKey(5)
  carry = learn.Trainable({"table": jnp.asarray(table, jnp.float32)},
                          {"w": jnp.asarray(w, jnp.float32)}, None, None, jnp.asarray(True))
  opt = optax.sgd(lr)
  carry = carry._replace(opt_state=opt.init(carry.params), value_opt_state=opt.init(carry.value_params))
  out, aux = jax.jit(lambda c, d: learn.learn(_objective(settings), settings, opt, opt, c, d, P,
                                              jnp.float32(BETA), key))(
                                                  carry, jax.tree.map(jnp.asarray, data))
  assert aux["pg_loss"].shape == (epochs, nmb)
  d64 = {k: np.asarray(v, np.float64) if k != "ids" else v for k, v in data.items()}
  for e in range(epochs):  # the learn phase shuffles with fold_in(rng, epoch)
    perm = np.asarray(jax.random.permutation(jax.random.fold_in(key, e), n))
    for part in perm.reshape(nmb, n // nmb):
      mb = {k: v[part] for k, v in d64.items()}
      gt = _np_grad(lambda t, mb=mb: _np_objective(t, w, mb), table)
      gw = _np_grad(lambda x, mb=mb: _np_objective(table, x, mb), w)
      table, w = table - lr * gt, w - lr * gw
  np.testing.assert_allclose(np.asarray(out.params["table"]), table, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(out.value_params["w"]), w, rtol=1e-4, atol=1e-5)
  assert bool(out.ok)


def test_learn_skips_every_update_after_a_non_finite_one():
  settings = _settings(epochs=2)
  data = _batch(4)
  data["advantages"] = data["advantages"].copy()
  data["advantages"][1] = np.nan
  opt = optax.sgd(0.1)
  p = {"table": jnp.ones((V, V))}
  carry = learn.Trainable(p, {"w": jnp.zeros(V)}, opt.init(p), opt.init({"w": jnp.zeros(V)}),
                          jnp.asarray(True))
  out, _ = learn.learn(_objective(settings), settings, opt, opt, carry,
                       jax.tree.map(jnp.asarray, data), P, jnp.float32(BETA),
                       jax.random.PRNGKey(0))
  assert not bool(out.ok)
  np.testing.assert_array_equal(np.asarray(out.params["table"]), np.ones((V, V)))


# ----------------------------------------------------------------------------- rollout / signals


@pytest.fixture(scope="module")
def tiny():
  model = models.from_config(HF)
  params = model.init(jax.random.PRNGKey(0))
  sc = SamplingConfig(max_new_tokens=4, temperature=1.0, eos_ids=(EOS,), pad_id=PAD,
                      num_samples=2)
  batch = {k: jnp.asarray(v) for k, v in prompts(n=2).items()}
  ro = jax.jit(lambda p, b: phases.rollout(model, p, b, jax.random.PRNGKey(3), sc))(params, batch)
  return model, params, batch, ro


def test_rollout_shapes_masks_and_sampler_logps_equal_the_trainer(tiny):
  model, params, _, ro = tiny
  assert ro.completion_ids.shape == (4, 4) and ro.prompt_ids.shape == (4, 5)
  np.testing.assert_array_equal(np.asarray(ro.loss_mask), np.asarray(ro.completion_mask, float))
  np.testing.assert_array_equal(np.asarray(ro.lengths), np.asarray(ro.completion_mask).sum(1))
  lp, _ = models.token_logps(model, params, ro.ids, ro.attn)
  m = np.asarray(ro.completion_mask)
  np.testing.assert_allclose(np.asarray(lp)[:, ro.prompt_len:] * m, np.asarray(ro.logps) * m,
                             atol=1e-5)


def test_signals_reference_kl_token_rewards_and_values(tiny):
  model, params, _, ro = tiny
  ref = jax.tree.map(lambda x: x * 0.9, params)
  rewards = jnp.asarray([1.0, 0.0, 0.5, 2.0])
  vmodel = model.with_head("value")
  vparams = {k: v for k, v in models.stack_layers(params).items() if k != "lm_head"}
  vparams["score"] = vmodel.init_score(jax.random.PRNGKey(4))
  sig = phases.signals(model, ref, ro, rewards, jnp.float32(0.3), group_size=2,
                       kl_in_reward=True, value_model=vmodel, value_params=vparams)
  m = np.asarray(ro.loss_mask)
  want_ref, _ = models.token_logps(model, ref, ro.ids, ro.attn)
  want_ref = np.asarray(want_ref)[:, ro.prompt_len:]
  np.testing.assert_allclose(np.asarray(sig.ref_logps) * m, want_ref * m, atol=1e-5)
  kl = (np.asarray(ro.logps) - want_ref) * m
  np.testing.assert_allclose(np.asarray(sig.kl), kl, atol=1e-5)
  last = m * (np.cumsum(m, 1) == m.sum(1, keepdims=True))  # the last real token
  np.testing.assert_allclose(np.asarray(sig.token_rewards),
                             -0.3 * kl + np.asarray(rewards)[:, None] * last, atol=1e-5)
  v = np.asarray(vmodel.apply(vparams, ro.ids, attention_mask=ro.attn))
  np.testing.assert_allclose(np.asarray(sig.values), v[:, ro.prompt_len - 1:-1] * m, atol=1e-5)


# ----------------------------------------------------------------------------- score / estimate


def test_score_weights_each_reward_and_repeats_extras(tiny):
  _, _, batch, ro = tiny
  extras = phases.repeat_extras(dict(batch, record_index=jnp.asarray([7, 9])), 2)
  np.testing.assert_array_equal(np.asarray(extras["record_index"]), [7, 7, 9, 9])
  assert "prompt_ids" not in extras
  one = lambda p, c, m, e: jnp.sum(m, axis=1).astype(jnp.float32)  # noqa: E731
  two = lambda p, c, m, e: jnp.stack([e["record_index"] * 1.0, -jnp.ones(c.shape[0])], 1)  # noqa: E731
  sc = phases.make_score([one, two], (0.5, 2.0, 1.0))(ro, extras, None)
  lengths = np.asarray(ro.completion_mask).sum(1)
  each = np.stack([lengths, [7, 7, 9, 9], -np.ones(4)], 1)
  np.testing.assert_allclose(np.asarray(sc.each), each)
  np.testing.assert_allclose(np.asarray(sc.rewards), each @ np.array([0.5, 2.0, 1.0]))
  with pytest.raises(ValueError, match="rl.reward_weights has 2 entries"):
    phases.make_score([one, two], (1.0, 1.0))(ro, extras, None)


def test_estimate_reads_the_declaration(tiny):
  _, _, _, ro = tiny
  rewards = jnp.asarray([1.0, 0.0, 0.5, 0.5])
  sc = phases.Scores(rewards=rewards, each=rewards[:, None])
  sig = phases.Signals(ref_logps=ro.logps, kl=jnp.zeros_like(ro.logps),
                       token_rewards=jnp.zeros_like(ro.logps))
  est = phases.Estimator.build("grpo", {}, group_size=2, provides=online.step_inputs(False))
  adv, state = phases.estimate(est, sc, ro, sig, None)
  r = np.asarray(rewards, np.float64).reshape(2, 2)
  want = (r - r.mean(1, keepdims=True)) / (r.std(1, ddof=1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(np.asarray(adv), want.reshape(-1), atol=1e-5)
  assert state is None
  with pytest.raises(ValueError, match="'gae' needs 'values'"):
    phases.Estimator.build("gae", {}, group_size=2, provides=online.step_inputs(False))
  with pytest.raises(ValueError, match="'epss', which 'grpo' does not take .did you mean 'eps'"):
    phases.Estimator.build("grpo", {"epss": 1.0}, group_size=2, provides=())
  # A stateful estimator (BNPO): the step keeps the running moments it declares.
  bnpo = phases.Estimator.build("bnpo", {}, group_size=2, provides=online.step_inputs(False))
  s0 = bnpo.init_state()
  _, s1 = bnpo(sc, ro, sig, s0)
  assert int(s0.count) == 0 and int(s1.count) == 1
  np.testing.assert_allclose(float(s1.mean), 0.5, atol=1e-6)


# ----------------------------------------------------------------------------- bookkeep


def test_bookkeep_kl_controller_reference_and_guard():
  # Two updates per step: bookkeep itself restores the old params after a skipped step (with
  # one update the learn phase already kept them).
  settings = RLSettings.from_config(dict(group_size=2, kl_coef=0.1, kl_target=1.0,
                                         kl_horizon=10.0, ref_update_every=1, epochs=2))
  params = {"w": jnp.ones(3)}
  opt = optax.sgd(0.1)
  state = online.init_state(params, opt, jax.random.PRNGKey(0), settings)
  bookkeep = online.make_bookkeep(settings)
  new = learn.Trainable({"w": jnp.full(3, 2.0)}, None, opt.init(params), None, jnp.asarray(True))
  sc = phases.Scores(rewards=jnp.zeros(4), each=jnp.zeros((4, 1)))
  metrics = {"seq_kl": jnp.float32(3.0), "loss": jnp.float32(0.5)}
  out, m = bookkeep(state, new, sc, None, dict(metrics))
  # adaptive β (Ziegler et al.): β ← β (1 + clip(KL / target − 1, −0.2, 0.2) · n / horizon)
  np.testing.assert_allclose(float(m["kl_beta"]), 0.1 * (1 + 0.2 * 4 / 10.0), rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(out.params["w"]), np.full(3, 2.0))
  np.testing.assert_array_equal(np.asarray(out.ref_params["w"]), np.full(3, 2.0))  # follows
  assert int(out.step) == 1 and float(m["skipped"]) == 0.0
  # A non-finite update: params, reference and controller stay; the step still advances.
  bad = new._replace(ok=jnp.asarray(False))
  out, m = bookkeep(state, bad, sc, None, dict(metrics))
  np.testing.assert_array_equal(np.asarray(out.params["w"]), np.ones(3))
  np.testing.assert_array_equal(np.asarray(out.ref_params["w"]), np.ones(3))
  np.testing.assert_allclose(float(out.kl_state.beta), float(state.kl_state.beta))
  assert int(out.step) == 1 and float(m["skipped"]) == 1.0 and int(m["skipped_total"]) == 1


def test_a_reward_function_of_the_wrong_shape_is_named(tiny):
  _, _, batch, ro = tiny
  def scalar_reward(p, c, m, e):
    return jnp.sum(m)
  def short_reward(p, c, m, e):
    return jnp.ones(c.shape[0] - 1)
  for fn, shape in ((scalar_reward, r"\(\)"), (short_reward, r"\(3,\)")):
    with pytest.raises(ValueError, match=rf"reward function .*{fn.__name__} returned shape "
                                         rf"{shape}; expected \[N\].*N = 4"):
      phases.make_score([fn], (1.0,))(ro, phases.repeat_extras(batch, 2), None)
