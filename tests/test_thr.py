"""THR: the LM-head influence against float64 per-token gradients and autodiff, GRPO re-weighted
by it against a float64 reference, and the RL step's signals / estimate phases feeding it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax import advantages
from rlhf_jax.advantages import hidden_reward
from rlhf_jax.train import online, phases
from rlhf_jax.train.rl_config import RLSettings
from test_online import prompts, setup

RNG = np.random.default_rng(0)
G = 4


def _inputs(n=8, t=5, d=6, v=7, seed=0):
  rng = np.random.default_rng(seed)
  h = rng.normal(size=(n, t, d))
  w = rng.normal(size=(d, v)) * 0.7
  y = rng.integers(0, v, size=(n, t))
  mask = np.arange(t)[None] < rng.integers(1, t + 1, size=n)[:, None]
  weights = rng.integers(0, 2, size=(n, t)) * mask
  return h, w, y, mask, weights.astype(np.float64)


def _reference(h, w, y, mask, weights, group_size):
  """float64: every token's LM-head gradient (e_y − p) hᵀ, then pairwise inner products."""
  n, t, _ = h.shape
  logits = h @ w
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  grads = np.zeros((n, t) + w.shape)
  for i in range(n):
    for a in range(t):
      e = np.eye(w.shape[1])[y[i, a]]
      grads[i, a] = np.outer(h[i, a], e - p[i, a])
  out = np.zeros((n, t))
  for i in range(n):
    g0 = i // group_size * group_size
    for a in range(t):
      if not mask[i, a]:
        continue
      for j in range(g0, g0 + group_size):
        for b in range(t):
          if mask[j, b]:
            out[i, a] += weights[j, b] * np.sum(grads[i, a] * grads[j, b])
  return out


def test_lm_head_influence_matches_float64_per_token_gradients():
  h, w, y, mask, weights = _inputs()
  got = hidden_reward.lm_head_influence(jnp.asarray(h, jnp.float32),
                                        jnp.asarray(h @ w, jnp.float32), jnp.asarray(y),
                                        jnp.asarray(mask), jnp.asarray(weights, jnp.float32),
                                        group_size=G)
  want = _reference(h, w, y, mask, weights, G)
  assert np.abs(want).max() > 1.0  # the check has something to compare
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)
  assert not np.any(np.asarray(got)[~mask])


def test_lm_head_influence_is_the_autodiff_gradient_inner_product():
  h, w, y, mask, weights = _inputs(seed=1)
  h, w = jnp.asarray(h, jnp.float32), jnp.asarray(w, jnp.float32)

  def logp(wm, i, a):
    return jax.nn.log_softmax(h[i, a] @ wm)[y[i, a]]

  total = jax.grad(lambda wm: sum(weights[j, b] * logp(wm, j, b)
                                  for j in range(G) for b in range(h.shape[1]) if mask[j, b]))(w)
  got = np.asarray(hidden_reward.lm_head_influence(h, h @ w, jnp.asarray(y), jnp.asarray(mask),
                                                   jnp.asarray(weights, jnp.float32),
                                                   group_size=G))
  for a in range(h.shape[1]):
    if mask[1, a]:
      want = float(jnp.sum(jax.grad(logp)(w, 1, a) * total))
      np.testing.assert_allclose(got[1, a], want, rtol=1e-4, atol=1e-5)


def test_lm_head_influence_ignores_padding_and_runs_under_jit():
  h, w, y, mask, weights = _inputs(seed=2)
  args = (jnp.asarray(h, jnp.float32), jnp.asarray(h @ w, jnp.float32), jnp.asarray(y),
          jnp.asarray(mask), jnp.asarray(weights, jnp.float32))
  base = np.asarray(jax.jit(hidden_reward.lm_head_influence, static_argnames="group_size")(
      *args, group_size=G))
  pad = lambda x, val: np.concatenate([x, np.full(x.shape[:1] + (2,) + x.shape[2:], val)], 1)  # noqa: E731
  padded = hidden_reward.lm_head_influence(
      jnp.asarray(pad(h, 9.0), jnp.float32), jnp.asarray(pad(h, 9.0) @ w, jnp.float32),
      jnp.asarray(pad(y, 3)), jnp.asarray(pad(mask, False)),
      jnp.asarray(pad(weights, 1.0), jnp.float32), group_size=G)
  np.testing.assert_allclose(np.asarray(padded)[:, :-2], base, rtol=1e-5, atol=1e-5)
  assert not np.any(np.asarray(padded)[:, -2:])


def test_correct_token_weights_mark_the_responses_above_their_group_mean():
  r = jnp.asarray([1.0, 0.0, 0.0, 0.5, 2.0, 2.0, 2.0, 2.0])  # second group: all equal
  mask = jnp.asarray(np.arange(3)[None] < np.asarray([3, 2, 1, 3, 3, 3, 3, 3])[:, None])
  w = np.asarray(hidden_reward.correct_token_weights(r, mask, group_size=G))
  want = np.asarray([1, 0, 0, 1, 0, 0, 0, 0], np.float32)[:, None] * np.asarray(mask)
  np.testing.assert_array_equal(w, want)


@pytest.mark.parametrize("p,min_abs", [(0.3, 0.0), (-0.5, 0.05), (0.0, 0.0)])
def test_grpo_thr_matches_a_float64_reference(p, min_abs):
  n, t = 8, 4
  r = RNG.integers(0, 2, size=n).astype(np.float64)
  r[:G] = [1, 0, 0, 1]  # one mixed group at least
  s = RNG.normal(size=(n, t)) * 0.1
  mask = np.arange(t)[None] < RNG.integers(1, t + 1, size=n)[:, None]
  got = advantages.get("grpo_thr")(jnp.asarray(r, jnp.float32),
                                   lm_head_influence=jnp.asarray(s, jnp.float32),
                                   mask=jnp.asarray(mask), group_size=G, p=p, min_abs=min_abs)
  rg = r.reshape(-1, G)
  a = ((rg - rg.mean(1, keepdims=True)) / (rg.std(1, ddof=1, keepdims=True) + 1e-6)).reshape(-1)
  thr = a[:, None] * s
  want = np.where(np.abs(thr) > min_abs, a[:, None] * (1 + p * np.sign(thr)), a[:, None]) * mask
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
  if p == 0.0:  # no re-weighting: GRPO on every token
    np.testing.assert_allclose(np.asarray(got), a[:, None] * mask, rtol=1e-5, atol=1e-6)


def test_thr_weight_range_is_named():
  with pytest.raises(ValueError, match=r"p.*\[-1, 1\]"):
    advantages.get("grpo_thr")(jnp.zeros(4), lm_head_influence=jnp.zeros((4, 2)),
                               mask=jnp.ones((4, 2)), group_size=4, p=1.5)


@pytest.fixture(scope="module")
def rolled():
  model, settings, sc, opt, rewards, state = setup()
  batch = {k: jnp.asarray(v) for k, v in prompts().items()}
  ro = phases.rollout(model, state.params, batch, jax.random.PRNGKey(3), sc)
  return model, state, ro


def test_signals_influence_equals_a_float64_pass_over_the_head(rolled):
  model, state, ro = rolled
  rewards = jnp.asarray([1.0, 0.0, 0.0, 1.0] * 4)
  sig = phases.signals(model, state.ref_params, ro, rewards, jnp.float32(0.0), group_size=G,
                       kl_in_reward=False, influence_params=state.params)
  h = np.asarray(model.hidden(state.params, ro.ids, ro.attn), np.float64)[:, ro.prompt_len - 1:-1]
  emb = np.asarray(state.params["embed"], np.float64)  # tied LM head
  m = np.asarray(ro.loss_mask) > 0
  weights = m * (np.asarray(rewards) > 0.5)[:, None]  # above the group mean of 0.5
  want = _reference(h, emb.T, np.asarray(ro.completion_ids), m, weights, G)
  assert np.abs(want).max() > 1e-3
  np.testing.assert_allclose(np.asarray(sig.lm_head_influence), want, rtol=2e-4, atol=2e-5)


def test_the_estimate_phase_reweights_grpo_by_the_signals(rolled):
  model, state, ro = rolled
  rewards = jnp.asarray([1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0] * 2)
  sc = phases.Scores(rewards=rewards, each=rewards[:, None])
  sig = phases.signals(model, state.ref_params, ro, rewards, jnp.float32(0.0), group_size=G,
                       kl_in_reward=False, influence_params=state.params)
  est = phases.Estimator.build("grpo_thr", {"p": 0.5}, group_size=G,
                               provides=phases.STEP_INPUTS)
  adv, _ = phases.estimate(est, sc, ro, sig, None)
  grpo = np.asarray(advantages.get("grpo")(rewards, group_size=G))
  s = np.asarray(sig.lm_head_influence)
  m = np.asarray(ro.loss_mask)
  want = grpo[:, None] * (1 + 0.5 * np.sign(grpo[:, None] * s)) * m
  np.testing.assert_allclose(np.asarray(adv), want, rtol=1e-5, atol=1e-6)
  assert np.abs(np.asarray(adv) - grpo[:, None] * m).max() > 0.1  # it re-weighted
  no_sig = sig.replace(lm_head_influence=None)
  with pytest.raises(ValueError, match="influence_params"):
    phases.estimate(est, sc, ro, no_sig, None)


def test_the_step_with_grpo_thr_compiles_once():
  model, _, sc, _, rewards, st = setup()
  settings = RLSettings.from_config(dict(group_size=G, advantage="grpo_thr",
                                         advantage_kwargs={"p": 0.2}, kl_coef=0.0))
  opt = optax.adam(1e-2)
  state = online.init_state(st.params, opt, jax.random.PRNGKey(1), settings)
  update = online.make_update(model, rewards, opt, settings, sc, donate=False)
  for step in range(2):
    state, m = update(state, {k: jnp.asarray(v) for k, v in prompts(seed=step).items()},
                      jax.random.PRNGKey(step))
    assert np.isfinite(float(m["pg_loss"]))
  assert update._cache_size() == 1  # pylint: disable=protected-access
