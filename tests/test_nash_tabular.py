"""Tabular Nash-MP / Nash-MD updates against float64 numpy references and their rates."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize

from rlhf_jax.losses import nash_tabular as nt

RNG = np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _strict_ranks():
  with jax.numpy_rank_promotion("raise"):
    yield


def _game(n, rng, scale=2.0):
  """Random P = σ(A − Aᵀ) (P + Pᵀ = 1) and log μ, float64."""
  a = scale * rng.normal(size=(n, n))
  p = 1.0 / (1.0 + np.exp(-(a - a.T)))
  z = rng.normal(size=n)
  return p, z - np.log(np.exp(z).sum())


def _softmax64(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _mp_step64(pi, p, mu, beta, eta):
  """Nash-MP in float64 from the paper's closed form."""
  half = _softmax64((eta * p @ pi + eta * beta * np.log(mu) + np.log(pi)) / (1 + eta * beta))
  new = _softmax64((eta * p @ half + eta * beta * np.log(mu) + np.log(pi)) / (1 + eta * beta))
  return new, half


def _md_step64(pi, p, mu, tau, eta):
  """Nash-MD in float64: π^μ ∝ π^(1−ητ) μ^(ητ); π' ∝ π^μ exp(η Pπ^μ)."""
  mix = pi ** (1 - eta * tau) * mu ** (eta * tau)
  mix /= mix.sum()
  new = mix * np.exp(eta * p @ mix)
  return new / new.sum(), mix


def _prox_argmax64(opp, anchor, p, mu, beta, eta):
  """argmax_π η⟨π, P opp⟩ − ηβ KL(π‖μ) − KL(π‖anchor) by numerical optimisation over
  softmax parameters (independent of the closed form)."""
  g = p @ opp

  def neg(theta):
    pi = _softmax64(theta)
    kl = lambda q: np.sum(pi * (np.log(pi) - np.log(q)))  # noqa: E731
    return -(eta * pi @ g - eta * beta * kl(mu) - kl(anchor))
  res = optimize.minimize(neg, np.zeros_like(opp), method="BFGS", options={"gtol": 1e-10})
  return _softmax64(res.x)


def test_nash_mp_step_matches_float64_reference():
  p, log_mu = _game(5, RNG)
  pi = _softmax64(RNG.normal(size=5))
  beta, eta = 0.3, 1.5
  out = jax.jit(nt.nash_mp_step, static_argnames=("beta", "eta"))(
      jnp.asarray(np.log(pi), jnp.float32), preference=jnp.asarray(p, jnp.float32),
      log_ref=jnp.asarray(log_mu, jnp.float32), beta=beta, eta=eta)
  new, half = _mp_step64(pi, p, np.exp(log_mu), beta, eta)
  np.testing.assert_allclose(np.exp(out.log_pi), new, atol=1e-6)
  np.testing.assert_allclose(np.exp(out.half), half, atol=1e-6)
  # Both half-steps are the proximal maximisers of the paper's objective.
  mu = np.exp(log_mu)
  np.testing.assert_allclose(half, _prox_argmax64(pi, pi, p, mu, beta, eta), atol=1e-5)
  np.testing.assert_allclose(new, _prox_argmax64(half, pi, p, mu, beta, eta), atol=1e-5)


def test_nash_md_step_matches_float64_reference():
  p, log_mu = _game(6, RNG)
  pi = _softmax64(RNG.normal(size=6))
  tau = 0.2
  for t in (0, 3, 40):
    eta = float(nt.nash_md_learning_rate(t, tau=tau))
    np.testing.assert_allclose(eta, 2 / (tau * (t + 2)), rtol=1e-6)
    out = nt.nash_md_step(jnp.asarray(np.log(pi), jnp.float32),
                          preference=jnp.asarray(p, jnp.float32),
                          log_ref=jnp.asarray(log_mu, jnp.float32), tau=tau, eta=eta)
    new, mix = _md_step64(pi, p, np.exp(log_mu), tau, eta)
    np.testing.assert_allclose(np.exp(out.log_pi), new, atol=1e-6)
    np.testing.assert_allclose(np.exp(out.mixture), mix, atol=1e-6)


def test_special_cases():
  n = 4
  p, log_mu = _game(n, RNG)
  mu = np.exp(log_mu)
  pi = _softmax64(RNG.normal(size=n))
  f = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
  # All ties (P ≡ ½): Pπ is constant, so each half-step interpolates geometrically to μ.
  ties = nt.nash_mp_step(f(np.log(pi)), preference=f(np.full((n, n), 0.5)), log_ref=f(log_mu),
                         beta=0.5, eta=2.0)
  w = 1.0 / 2.0  # ηβ/(1+ηβ)
  geo = _softmax64((1 - w) * np.log(pi) + w * log_mu)
  np.testing.assert_allclose(np.exp(ties.half), geo, atol=1e-6)
  np.testing.assert_allclose(np.exp(ties.log_pi), geo, atol=1e-6)
  # Nash-MD with ητ = 1 starts from μ itself; with τ = 0 it is a plain mirror-ascent step.
  one = nt.nash_md_step(f(np.log(pi)), preference=f(p), log_ref=f(log_mu), tau=0.5, eta=2.0)
  np.testing.assert_allclose(np.exp(one.mixture), mu, atol=1e-6)
  zero = nt.nash_md_step(f(np.log(pi)), preference=f(p), log_ref=f(log_mu), tau=0.0, eta=0.7)
  np.testing.assert_allclose(np.exp(zero.log_pi), _softmax64(np.log(pi) + 0.7 * p @ pi),
                             atol=1e-6)
  # Batched games (leading axes) equal per-game calls.
  ps = np.stack([p, p.T])
  lps = np.stack([np.log(pi), log_mu])
  lmu = np.stack([log_mu, np.log(pi)])
  batched = nt.nash_mp_step(f(lps), preference=f(ps), log_ref=f(lmu), beta=0.2)
  for i in range(2):
    single = nt.nash_mp_step(f(lps[i]), preference=f(ps[i]), log_ref=f(lmu[i]), beta=0.2)
    np.testing.assert_allclose(batched.log_pi[i], single.log_pi, atol=1e-6)


def _equilibrium64(p, log_mu, beta):
  """π*_β: the root of z = log μ + P softmax(z)/β (π* = softmax(z)) by scipy's hybrid
  Newton solver, float64, independent of the updates under test."""
  z = optimize.fsolve(lambda z: z - log_mu - p @ _softmax64(z) / beta, log_mu, xtol=1e-14)
  pi = _softmax64(z)
  assert np.abs(pi - _softmax64(log_mu + p @ pi / beta)).max() < 1e-12
  return pi


def test_equilibrium_is_a_fixed_point_of_nash_mp():
  p, log_mu = _game(6, RNG)
  beta = 0.5
  star = _equilibrium64(p, log_mu, beta)
  f = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
  mp = nt.nash_mp_step(f(np.log(star)), preference=f(p), log_ref=f(log_mu), beta=beta)
  np.testing.assert_allclose(np.exp(mp.log_pi), star, atol=2e-6)
  np.testing.assert_allclose(np.exp(mp.half), star, atol=2e-6)
  # Nash-MD with a fixed step is not stationary there (it needs η_t → 0): the check can fail.
  md = nt.nash_md_step(f(np.log(star)), preference=f(p), log_ref=f(log_mu), tau=beta, eta=0.3)
  assert np.abs(np.exp(md.log_pi) - star).max() > 1e-4


@pytest.mark.parametrize("beta", [0.1, 0.3])
def test_nash_mp_rate_and_nash_md_bound(beta):
  """On a random 8-response game (and a cyclic one): KL(π*_β‖π_k) ≤ (1+2β)^(−N/2) KL_0 with
  N = 2k queries at η = 2, down to float32 resolution; Nash-MD's last iterate stays under
  8/(β²(T+1)) and converges."""
  n = 8
  p, log_mu = _game(n, np.random.default_rng(3))
  d = (np.arange(n)[None, :] - np.arange(n)[:, None]) % n  # near-regular tournament
  cyclic = np.where(d == 0, 0.5, np.where(d <= (n - 1) // 2, 1.0, 0.0))
  cyclic = 0.5 * (cyclic + 1.0 - cyclic.T)
  for game in (p, cyclic):
    star = _equilibrium64(game, log_mu, beta)
    f = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    k = 60
    mp = jax.jit(nt.nash_mp_iterates, static_argnames=("beta", "eta", "num_steps"))(
        f(log_mu), preference=f(game), log_ref=f(log_mu), beta=beta, num_steps=k)
    assert mp.shape == (k + 1, n)
    kl = np.asarray([np.sum(star * (np.log(star) - np.asarray(lp, np.float64))) for lp in mp])
    queries = 2 * np.arange(k + 1)
    bound = (1 + 2 * beta) ** (-queries / 2) * kl[0]
    assert kl[0] > 1e-2
    assert np.all(kl <= bound + 2e-6), np.flatnonzero(kl > bound + 2e-6)
    assert kl[-1] < 1e-5
    # The fitted linear rate is at least log(1 + 2β) per iteration.
    ok = kl > 1e-5
    slope = -np.polyfit(np.arange(k + 1)[ok], np.log(kl[ok]), 1)[0]
    assert slope >= np.log(1 + 2 * beta), (slope, np.log(1 + 2 * beta))
    t = 300
    md = jax.jit(nt.nash_md_iterates, static_argnames=("tau", "num_steps"))(
        f(log_mu), preference=f(game), log_ref=f(log_mu), tau=beta, num_steps=t)
    kl_md = np.asarray(nt.kl_to(jnp.asarray(star, jnp.float32), md), np.float64)
    assert np.all(kl_md <= 8.0 / (beta ** 2 * (np.arange(t + 1) + 1)) + 1e-6)
    assert kl_md[-1] < 0.05 * kl_md[0]


def test_bad_inputs_are_named():
  x = jnp.zeros(3)
  with pytest.raises(ValueError, match="preference must be"):
    nt.nash_mp_step(x, preference=jnp.zeros((3, 4)), log_ref=x, beta=0.1)
  with pytest.raises(ValueError, match="log_ref"):
    nt.nash_md_step(x, preference=jnp.zeros((3, 3)), log_ref=jnp.zeros(4), tau=0.1, eta=1.0)
  with pytest.raises(ValueError, match="beta must be >= 0"):
    nt.nash_mp_step(x, preference=jnp.zeros((3, 3)), log_ref=x, beta=-1.0)
  with pytest.raises(ValueError, match="eta must be > 0"):
    nt.nash_mp_step(x, preference=jnp.zeros((3, 3)), log_ref=x, beta=0.1, eta=0.0)


def test_win_rates_match_numpy_and_self_play_is_one_half():
  rng = np.random.default_rng(3)
  a = rng.random((2, 5, 5))
  p = a / (a + np.swapaxes(a, 1, 2))  # P(y > y') + P(y' > y) = 1
  logits = rng.normal(size=(2, 5))
  log_pi = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  got = np.asarray(nt.win_rates(jnp.asarray(p, jnp.float32), jnp.asarray(log_pi, jnp.float32)))
  np.testing.assert_allclose(got, np.einsum("bij,bj->bi", p, np.exp(log_pi)), rtol=1e-5)
  np.testing.assert_allclose((got * np.exp(log_pi)).sum(-1), 0.5, rtol=1e-5)
