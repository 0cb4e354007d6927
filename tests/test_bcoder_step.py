"""B-Coder in the RL step (`rl.surrogate="bcoder"` with a value model): the learn phase's
objective against a float64 per-row reference, the step at one compilation, named errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax import models
from rlhf_jax.train import learn, online, phases
from rlhf_jax.train.rl_config import RLSettings
from test_online import prompts, setup

G = 4
KW = dict(alpha=0.5, gamma=0.9, adv_coef=0.1, ce_coef=0.5)


@pytest.fixture(scope="module")
def parts():
  model, _, sc, _, rewards, st = setup()
  vmodel = model.with_head("value")
  vparams = {k: v for k, v in models.stack_layers(st.params).items() if k != "lm_head"}
  vparams["score"] = vmodel.init_score(jax.random.PRNGKey(4))
  ref = jax.tree.map(lambda x: x * 0.9, st.params)
  batch = {k: jnp.asarray(v) for k, v in prompts().items()}
  ro = phases.rollout(model, st.params, batch, jax.random.PRNGKey(3), sc)
  return model, vmodel, vparams, st.params, ref, ro, sc, rewards


def _row_logits(model, params, ids_row):
  return np.asarray(model.apply(params, jnp.asarray(ids_row)[None]), np.float64)[0]


def _reference(model, vmodel, params, vparams, ref, ro, rewards):
  """float64, one unpadded row at a time: Q = α(ℓ − max ℓ) + V, the conservative target from
  the reference's greedy token, TD² + 0.1·(−A(a_t)) + 0.5·CE, token-mean over the batch."""
  ids, attn = np.asarray(ro.ids), np.asarray(ro.attn)
  p, m = ro.prompt_len, np.asarray(ro.loss_mask) > 0
  a, g = KW["alpha"], KW["gamma"]
  total, count = 0.0, 0
  for i in range(ids.shape[0]):
    real = ids[i][attn[i]]
    start = int(attn[i, :p].sum())  # the real prompt tokens
    n = int(m[i].sum())
    acts = real[start:start + n]
    pos = np.arange(start - 1, start - 1 + n)  # the positions that predict the actions
    ell = _row_logits(model, params, real)[pos]
    frozen = _row_logits(model, ref, real)[pos]
    v = np.asarray(vmodel.apply(vparams, jnp.asarray(real)[None]), np.float64)[0][pos]
    q = a * (ell - ell.max(-1, keepdims=True)) + v[:, None]
    r = np.zeros(n)
    r[-1] = rewards[i]
    nxt = np.zeros(n)
    nxt[:-1] = q[np.arange(1, n), frozen.argmax(-1)[1:]]
    td = q[np.arange(n), acts] - (r + g * nxt)
    adv = -(q[np.arange(n), acts] - v)  # max_a A = 0
    logz = np.log(np.exp(ell - ell.max(-1, keepdims=True)).sum(-1)) + ell.max(-1)
    ce = logz - ell[np.arange(n), acts]
    total += np.sum(td ** 2 + KW["adv_coef"] * adv + KW["ce_coef"] * ce)
    count += n
  return total / count


def test_objective_matches_a_float64_per_row_reference(parts):
  model, vmodel, vparams, params, ref, ro, _, _ = parts
  rewards = jnp.asarray([1.0, 0.0, 0.5, 2.0] * 4)
  settings = RLSettings.from_config(dict(group_size=G, surrogate="bcoder", surrogate_kwargs=KW,
                                         kl_coef=0.0))
  sig = phases.signals(model, ref, ro, rewards, jnp.float32(0.0), group_size=G,
                       kl_in_reward=False, value_model=vmodel, value_params=vparams,
                       ref_logits=True)
  data = online.learn_data(ro, sig, jnp.zeros(rewards.shape))
  obj = learn.make_objective(model, settings, vmodel)
  mb = dict(data, prompt_len=ro.prompt_len)
  loss, aux = jax.jit(lambda p, v: obj(p, v, mb, None, jnp.float32(0.0)))(params, vparams)
  want = _reference(model, vmodel, params, vparams, ref, ro, np.asarray(rewards))
  np.testing.assert_allclose(float(loss), want, rtol=2e-4)
  assert float(aux["td_loss"]) > 0
  grads = jax.grad(lambda p, v: obj(p, v, mb, None, jnp.float32(0.0))[0], argnums=(0, 1))(
      params, vparams)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(grads))
  assert float(optax.tree.norm(grads[1])) > 0  # V trains through the TD loss


def test_the_step_compiles_once_and_trains_the_value_model(parts):
  model, vmodel, vparams, params, _, _, sc, rewards = parts
  settings = RLSettings.from_config(dict(group_size=G, surrogate="bcoder", kl_coef=0.01))
  opt, vopt = optax.adam(1e-2), optax.adam(1e-2)
  state = online.init_state(params, opt, jax.random.PRNGKey(1), settings, value_params=vparams,
                            value_optimizer=vopt)
  update = online.make_update(model, rewards, opt, settings, sc, value_model=vmodel,
                              value_optimizer=vopt, donate=False)
  first = state
  for step in range(2):
    state, m = update(state, {k: jnp.asarray(v) for k, v in prompts(seed=step).items()},
                      jax.random.PRNGKey(step))
    assert np.isfinite(float(m["loss"])) and float(m["td_loss"]) > 0
  assert update._cache_size() == 1  # pylint: disable=protected-access
  moved = [not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
           zip(jax.tree.leaves(first.value_params), jax.tree.leaves(state.value_params))]
  assert any(moved)


def test_bcoder_without_a_value_model_is_named(parts):
  model, _, _, params, _, _, sc, rewards = parts
  settings = RLSettings.from_config(dict(group_size=G, surrogate="bcoder"))
  opt = optax.adam(1e-2)
  with pytest.raises(ValueError, match=r"config\.value"):
    online.make_update(model, rewards, opt, settings, sc)
  with pytest.raises(ValueError, match="policy-gradient or value-based"):
    RLSettings.from_config(dict(group_size=G, surrogate="dpo"))
