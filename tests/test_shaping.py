"""Reward shaping, combination and STARC against float64 numpy references."""

from __future__ import annotations

import statistics

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads as _check_grads

from rlhf_jax.rewards import shaping as sh
from rlhf_jax.rewards import shaping_state as ss
from rlhf_jax.rewards import starc

RNG = np.random.default_rng(2)


@pytest.fixture(autouse=True)
def _strict_ranks():
  with jax.numpy_rank_promotion("raise"):
    yield


def _f(x):
  return jnp.asarray(x, jnp.float32)


def _close(a, b, tol=1e-5):
  np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=tol, atol=tol)


def _sig(x):
  return 1 / (1 + np.exp(-x))


def test_kl_in_reward_reference():
  r, lp, rlp = RNG.normal(size=3), RNG.normal(size=(3, 4)), RNG.normal(size=(3, 4))
  mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], bool)
  got = jax.jit(lambda *a: sh.kl_in_reward(*a, beta=0.1))(_f(r), _f(lp), _f(rlp), mask)
  ref = -0.1 * (lp - rlp) * mask
  for i, n in enumerate(mask.sum(1)):
    ref[i, n - 1] += r[i]
  _close(got, ref)


def test_lsc_par_reference_and_special_cases():
  r, ref = RNG.normal(size=5), RNG.normal(size=(5, 3))
  _close(jax.jit(sh.lsc)(_f(r), _f(ref[:, 0])), np.log(_sig(r - ref[:, 0])))
  samples = RNG.normal(size=40)
  _close(sh.lsc_reference(_f(samples)), np.quantile(samples, 0.85), 1e-4)
  assert abs(sh.lsc_reference_normal(0.0, 1.0) - statistics.NormalDist().inv_cdf(0.85)) < 1e-4
  rk = RNG.normal(size=(5, 2))
  _close(sh.sum_log_sigmoid(_f(rk), _f(ref[0, :2])), np.log(_sig(rk - ref[0, :2])).sum(1))
  mask = np.array([[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 1], [0, 1, 1]], bool)
  got = jax.jit(sh.par)(_f(r), _f(ref), mask)
  _close(got, (_sig(r[:, None] - ref) * mask).sum(1) / mask.sum(1))
  # One reference: PAR = σ(r − r_ref).
  _close(sh.par(_f(r), _f(ref[:, :1])), _sig(r - ref[:, 0]))


def test_noisy_verifier_corrections():
  rt = jnp.array([0.0, 1.0, 1.0, 0.0])
  _close(jax.jit(lambda x: sh.noisy_backward_correction(x, rho0=0.0, rho1=0.0))(rt), rt)
  rho0, rho1 = 0.1, 0.25
  for clean in (0.0, 1.0):  # E[R̂ | R] = R (independent expectation over the flip model)
    p1 = rho0 if clean == 0 else 1 - rho1
    e_back = (p1 * float(sh.noisy_backward_correction(jnp.float32(1), rho0=rho0, rho1=rho1))
              + (1 - p1) * float(sh.noisy_backward_correction(jnp.float32(0), rho0=rho0,
                                                                   rho1=rho1)))
    assert abs(e_back - clean) < 1e-6
    e_fwd = (p1 * float(sh.noisy_forward_weights(jnp.float32(1), rho0=rho0, rho1=rho1))
             + (1 - p1) * float(sh.noisy_forward_weights(jnp.float32(0), rho0=rho0, rho1=rho1)))
    assert abs(e_fwd - (1 - rho0 - rho1) * (clean - 1)) < 1e-6
  _close(sh.noisy_forward_weights(rt, rho0=0.0, rho1=0.0), np.asarray(rt) - 1)
  with pytest.raises(ValueError, match="rho0"):
    sh.noisy_backward_correction(rt, rho0=0.6, rho1=0.5)


def test_length_rewards_reference():
  lengths = jnp.array([10, 80, 90, 100, 101, 150])
  got = jax.jit(lambda l: sh.overlong_penalty(l, max_length=100, cache_length=20))(lengths)
  ref = [0 if l <= 80 else ((80 - l) / 20 if l <= 100 else -1) for l in np.asarray(lengths)]
  _close(got, ref)
  _close(sh.length_penalty(lengths, coef=0.5, max_length=100), -0.5 * np.asarray(lengths) / 100)


def test_logprob_perplexity_cosine_reference():
  a, b = RNG.normal(size=(3, 4)) - 2, RNG.normal(size=(3, 4)) - 2
  mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], bool)
  n = mask.sum(1)
  _close(sh.reference_logprob_reward(_f(a), mask), (a * mask).sum(1) / n)
  _close(sh.reference_logprob_reward(_f(a), mask, normalize=False), (a * mask).sum(1))
  pc, pu = np.exp(-(a * mask).sum(1) / n), np.exp(-(b * mask).sum(1) / n)
  _close(jax.jit(sh.relative_perplexity_reward)(_f(a), _f(b), mask), (pu - pc) / pu, 1e-4)
  e, f = RNG.normal(size=(3, 5)), RNG.normal(size=(3, 5))
  _close(sh.cosine_similarity_reward(_f(e), _f(f)),
         (e * f).sum(1) / np.linalg.norm(e, axis=1) / np.linalg.norm(f, axis=1))


def test_pure_min_form_reference():
  r = RNG.uniform(-1, 1, size=(3, 4))
  mask = np.array([[1, 1, 1, 1], [1, 1, 1, 0], [1, 0, 0, 0]], bool)
  w, g = jax.jit(lambda x, m: sh.pure_min_form(x, m, temperature=0.1))(_f(r), mask)
  for i in range(3):
    v = r[i, mask[i]]
    p = np.exp(-v / 0.1) / np.exp(-v / 0.1).sum()
    _close(w[i, :len(v)], p * v, 1e-4)
    _close(g[i, :len(v)], np.cumsum((p * v)[::-1])[::-1], 1e-4)
    _close(w[i, len(v):], 0.0)
  # T → 0: the return at step 0 approaches the minimum step reward.
  _, g0 = sh.pure_min_form(_f(r), mask, temperature=1e-3)
  _close(g0[:, 0], np.array([r[i, mask[i]].min() for i in range(3)]), 1e-3)


def test_lagrangian_dual_ascent():
  dual = ss.lagrangian_multipliers(thresholds=[0.5, 0.0], lr=1.0, equality=[False, True])
  state = dual.init()
  _close(dual.multipliers(state), [0.5, 0.0])
  update = jax.jit(dual.update)
  s1 = update(state, jnp.array([0.2, 0.3]))  # first violated (0.2 < 0.5): λ1 grows
  lam0, lam1 = np.asarray(dual.multipliers(state)), np.asarray(dual.multipliers(s1))
  assert lam1[0] > lam0[0]
  # Reference step: λ̃ ← λ̃ − lr·(J − θ)·λ'(λ̃): σ' = 0.25 at 0, tanh' = 1 at 0.
  _close(s1.raw, [-(0.2 - 0.5) * 0.25, -(0.3 - 0.0) * 1.0])
  r, c = RNG.normal(size=4), RNG.normal(size=(4, 2))
  got = jax.jit(dual.reward)(s1, _f(r), _f(c))
  lam = np.array([_sig(0.075), np.tanh(-0.3)])
  _close(got, r + ((c - [0.5, 0.0]) * lam).sum(1))
  with pytest.raises(ValueError, match="constraint_values"):
    dual.update(state, jnp.ones(3))


def test_dynamic_reward_weights():
  dw = ss.dynamic_reward_weights(3, lr=1.0, min_weight=0.05)
  s = dw.init()
  s = jax.jit(dw.update)(s, jnp.array([1.0, 0.0, -20.0]))
  w = np.asarray(s.weights)
  assert abs(w.sum() - 1) < 1e-6 and w[0] > w[1] > w[2] >= 0.05 - 1e-6
  ref = np.exp([1.0, 0.0, -20.0]) / 3
  _close(w, (1 - 3 * 0.05) * ref / ref.sum() + 0.05)
  r = RNG.normal(size=(4, 3))
  _close(dw.combine(s, _f(r)), r @ w)


def _np_canon(rew, p, gamma):
  s = rew.shape[0]
  ppi = p.mean(1)
  rpi = (p * rew).sum(2).mean(1)
  v = np.linalg.solve(np.eye(s) - gamma * ppi, rpi)
  c = (p * (rew + gamma * v[None, None])).sum(2) - v[:, None]
  return np.broadcast_to(c[:, :, None], rew.shape)


def test_starc_reference_and_invariances():
  s_, a_, gamma = 4, 2, 0.9
  p = RNG.uniform(size=(s_, a_, s_))
  p /= p.sum(2, keepdims=True)
  r1, r2 = RNG.normal(size=(s_, a_, s_)), RNG.normal(size=(s_, a_, s_))
  _close(jax.jit(starc.canonicalize, static_argnums=2)(_f(r1), _f(p), gamma),
         _np_canon(r1, p, gamma), 1e-4)
  phi = RNG.normal(size=s_)
  shaped = 3.0 * (r1 + gamma * phi[None, None, :] - phi[:, None, None])
  dist = jax.jit(starc.starc_distance, static_argnums=3)
  assert float(dist(_f(r1), _f(shaped), _f(p), gamma)) < 1e-3
  c1, c2 = _np_canon(r1, p, gamma), _np_canon(r2, p, gamma)
  ref = np.linalg.norm(c1 / np.linalg.norm(c1) - c2 / np.linalg.norm(c2))
  _close(dist(_f(r1), _f(r2), _f(p), gamma), ref, 1e-4)
  assert 0 < ref <= 2
  _close(dist(_f(r1), _f(-r1), _f(p), gamma), 2.0, 1e-4)
  with pytest.raises(ValueError, match="gamma"):
    starc.canonicalize(_f(r1), _f(p), 1.0)


def test_gradients():
  kw = dict(order=1, modes=("rev",), atol=1e-5, rtol=1e-5)
  with jax.enable_x64(True):
    g = lambda *s: jnp.asarray(RNG.normal(size=s), jnp.float64)
    mask = jnp.array([[1, 1, 1], [1, 1, 0]], bool)
    fns = [
        (lambda r: sh.kl_in_reward(r, g(2, 3), g(2, 3), mask, beta=0.1).sum(), (g(2),)),
        (lambda r, q: sh.lsc(r, q).sum() + sh.par(r, q[:, None]).sum(), (g(4), g(4))),
        (lambda r: sh.pure_min_form(r, mask, temperature=0.5)[1].sum(), (g(2, 3),)),
        (lambda a, b: sh.relative_perplexity_reward(a, b, mask).sum()
         + sh.cosine_similarity_reward(a, b).sum(), (g(2, 3), g(2, 3))),
        (lambda r: starc.starc_distance(r, jnp.ones((2, 2, 2)), jnp.full((2, 2, 2), 0.5), 0.5),
         (g(2, 2, 2),)),
    ]
    for f, args in fns:
      _check_grads(jax.jit(f), args, **kw)


def test_masked_transforms_padding_invariance_jit():
  mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], bool)
  junk = np.where(mask, 0.0, 1e4)
  a, b = RNG.normal(size=(3, 4)) - 2, RNG.normal(size=(3, 4)) - 2
  r = RNG.normal(size=3)
  cases = [
      lambda x, y: sh.kl_in_reward(_f(r), x, y, mask, beta=0.1),
      lambda x, y: sh.reference_logprob_reward(x, mask),
      lambda x, y: sh.relative_perplexity_reward(x, y, mask),
      lambda x, y: sh.pure_min_form(x, mask, temperature=0.3)[1],
      lambda x, y: sh.par(_f(r), x, mask[:, :4]),
  ]
  for f in cases:
    jf = jax.jit(f)
    _close(jf(_f(a - junk), _f(b + junk)), np.asarray(jf(_f(a), _f(b))), 1e-4)
  # special cases: β = 0 puts only the score on the last token; no max_length = −coef·L
  _close(sh.kl_in_reward(_f(r), _f(a), _f(b), mask, beta=0.0).sum(1), r)
  _close(sh.length_penalty(jnp.array([3, 10]), coef=0.2), [-0.6, -2.0])
  _close(sh.relative_perplexity_reward(_f(a), _f(a), mask), np.zeros(3))
  _close(sh.cosine_similarity_reward(_f(a), _f(3.0 * a)), np.ones(3))
  _close(jax.jit(lambda x: sh.noisy_backward_correction(x, rho0=0.1, rho1=0.2))(_f(a)),
         (a - 0.1) / 0.7)
  _close(jax.jit(sh.sum_log_sigmoid)(_f(a), _f(b)), np.log(_sig(a - b)).sum(1))


def test_more_gradients():
  kw = dict(order=1, modes=("rev",), atol=1e-5, rtol=1e-5)
  with jax.enable_x64(True):
    g = lambda *s: jnp.asarray(RNG.normal(size=s), jnp.float64)
    mask = jnp.array([[1, 1, 1], [1, 1, 0]], bool)
    fns = [
        (lambda r, q: sh.sum_log_sigmoid(r, q).sum(), (g(4, 3), g(3))),
        (lambda r: (sh.reference_logprob_reward(r, mask) ** 2).sum(), (g(2, 3),)),
        (lambda r: sh.noisy_backward_correction(r, rho0=0.1, rho1=0.2).sum(), (g(4),)),
        (lambda r: sh.lsc_reference(r, quantile=0.85), (jnp.asarray([0.1, 0.7, -0.4, 1.3, 2.2]),)),
        (lambda r: starc.standardize(r, jnp.full((2, 2, 2), 0.5), 0.5)[0, 0, 0], (g(2, 2, 2),)),
    ]
    for f, args in fns:
      _check_grads(jax.jit(f), args, **kw)
    # the KL inside kl_in_reward is a constant unless stop_gradient=False
    lp, ref = g(2, 3), g(2, 3)
    gk = jax.grad(lambda x: sh.kl_in_reward(jnp.zeros(2), x, ref, mask, beta=0.1).sum())(lp)
    assert np.all(np.asarray(gk) == 0)
    gk = jax.grad(lambda x: sh.kl_in_reward(jnp.zeros(2), x, ref, mask, beta=0.1,
                                            stop_gradient=False).sum())(lp)
    _close(gk, -0.1 * np.asarray(mask, np.float64))
