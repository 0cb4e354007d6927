"""Nash-MD and Nash-MP on a tabular preference game (NLHF; Nash Mirror Prox).

Responses y ∈ {1..n}; P[y, y'] = P(y ≻ y'), P + Pᵀ = 1. The β-regularised Nash
equilibrium π*_β solves π* ∝ μ·exp(P π*/β). We measure KL(π*_β ‖ π_t) along

* Nash-MP (mirror prox, step η):
    π_{k+½} ∝ exp[(η·Pπ_k + ηβ·log μ + log π_k)/(1+ηβ)]
    π_{k+1} ∝ exp[(η·Pπ_{k+½} + ηβ·log μ + log π_k)/(1+ηβ)]
  bound: KL_k ≤ (1+ηβ)^{−k}·KL_0, i.e. (1+2β)^{−N/2} with η=2, N=2k queries.
* Nash-MD (η_t = 2/(τ(t+2)), τ = β):
    π^μ_t ∝ π_t^{1−η_t τ}·μ^{η_t τ};  π_{t+1} ∝ π^μ_t·exp(η_t·Pπ^μ_t)
  bound: KL_T ≤ 8/(τ²(T+1)).

Both updates come from `rlhf_jax.losses.nash_tabular` (`nash_mp_step`, `nash_md_step`).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments import _toylib as tl
from rlhf_jax.losses import nash_tabular


def make_game(rng, n, kind, scale, ref_temp):
  """Returns (P [n, n], log μ [n]) for one seed."""
  k1, k2 = jax.random.split(rng)
  if kind == "random":
    a = scale * jax.random.normal(k1, (n, n))
    P = jax.nn.sigmoid(a - a.T)
  elif kind == "cyclic":   # regular tournament: y beats the next (n-1)/2 responses
    d = (jnp.arange(n)[None, :] - jnp.arange(n)[:, None]) % n
    P = jnp.where(d == 0, 0.5, jnp.where(d <= (n - 1) // 2, 1.0, 0.0))
  else:
    raise ValueError(f"config.game must be 'random' or 'cyclic', got {kind!r}")
  log_mu = jax.nn.log_softmax(ref_temp * jax.random.normal(k2, (n,)))
  return P, log_mu


def equilibrium_np(P, log_mu, beta, iters):
  """Float64 numpy reference for π*_β (damped fixed point), with its residual."""
  P = np.asarray(P, np.float64)
  log_mu = np.asarray(log_mu, np.float64)
  softmax = lambda z: np.exp(z - z.max()) / np.exp(z - z.max()).sum()
  pi = np.exp(log_mu)
  eta = 1.0
  for _ in range(iters):   # mirror-prox steps in float64 (contraction, see docstring)
    half = softmax((eta * P @ pi + eta * beta * log_mu + np.log(pi)) / (1 + eta * beta))
    pi = softmax((eta * P @ half + eta * beta * log_mu + np.log(pi)) / (1 + eta * beta))
  resid = np.abs(pi - softmax(log_mu + P @ pi / beta)).max()
  return pi, resid


def nash_mp(P, log_mu, pi_star, beta, eta, iters):
  """KL(π*‖π_k) for k = 0..iters along Nash-MP from π_0 = μ. [iters + 1]."""
  log_pis = nash_tabular.nash_mp_iterates(log_mu, preference=P, log_ref=log_mu, beta=beta,
                                          eta=eta, num_steps=iters)
  return nash_tabular.kl_to(pi_star, log_pis)


def nash_md(P, log_mu, pi_star, tau, iters):
  """KL(π*‖π_t) for t = 0..iters along Nash-MD (η_t = 2/(τ(t+2))) from π_0 = μ. [iters + 1]."""
  log_pis = nash_tabular.nash_md_iterates(log_mu, preference=P, log_ref=log_mu, tau=tau,
                                          num_steps=iters)
  return nash_tabular.kl_to(pi_star, log_pis)


def run(cfg):
  t0 = time.time()
  rngs = jax.random.split(jax.random.PRNGKey(0), cfg.seeds)
  P, log_mu = jax.vmap(lambda r: make_game(r, cfg.n_responses, cfg.game, cfg.pref_scale,
                                           cfg.ref_temp))(rngs)
  eq = [equilibrium_np(P[i], log_mu[i], cfg.beta, cfg.eq_iters) for i in range(cfg.seeds)]
  pi_star = jnp.asarray(np.stack([e[0] for e in eq]), jnp.float32)
  resid = max(e[1] for e in eq)
  mp = jax.jit(jax.vmap(lambda p, m, s: nash_mp(p, m, s, cfg.beta, cfg.eta_mp, cfg.mp_iters)))
  md = jax.jit(jax.vmap(lambda p, m, s: nash_md(p, m, s, cfg.beta, cfg.md_iters)))
  kl_mp = np.asarray(mp(P, log_mu, pi_star), np.float64)     # [seeds, K+1]
  kl_md = np.asarray(md(P, log_mu, pi_star), np.float64)     # [seeds, T+1]
  k = np.arange(cfg.mp_iters + 1)
  t = np.arange(cfg.md_iters + 1)
  mp_bound = kl_mp[:, :1] * (1 + cfg.eta_mp * cfg.beta) ** (-k)[None]
  md_bound = 8.0 / (cfg.beta ** 2 * (t + 1))
  floor = 1e-5     # float32 KL resolution; the rate fit uses KL above this
  rates = []
  for s in range(cfg.seeds):
    ok = kl_mp[s] > floor
    slope = np.polyfit(k[ok], np.log(kl_mp[s][ok]), 1)[0]
    rates.append(-slope)
  tol = 1e-6
  log_idx = np.unique(np.geomspace(1, cfg.md_iters + 1, 200).astype(int)) - 1   # for the plot
  return {
      "equilibrium_residual": float(resid),
      "theory_rate_per_iter": float(np.log(1 + cfg.eta_mp * cfg.beta)),
      "mp_rate_per_iter": tl.mean_std(rates),
      "mp_kl0": tl.mean_std(kl_mp[:, 0]),
      "mp_kl_at_20": tl.mean_std(kl_mp[:, min(20, cfg.mp_iters)]),
      "mp_bound_at_20": tl.mean_std(mp_bound[:, min(20, cfg.mp_iters)]),
      "mp_frac_under_bound": float(np.mean(kl_mp <= mp_bound + tol)),
      "md_kl_final": tl.mean_std(kl_md[:, -1]),
      "md_bound_final": float(md_bound[-1]),
      "md_frac_under_bound": float(np.mean(kl_md <= md_bound[None] + tol)),
      "md_kl_at_100": tl.mean_std(kl_md[:, min(100, cfg.md_iters)]),
      "curves": {"mp_kl_mean": kl_mp.mean(0), "mp_bound_mean": mp_bound.mean(0),
                 "mp_kl_std": kl_mp.std(0), "md_t": t[log_idx],
                 "md_kl_mean": kl_md.mean(0)[log_idx], "md_kl_std": kl_md.std(0)[log_idx],
                 "md_bound": md_bound[log_idx]},
      "seconds": time.time() - t0,
  }


def report(res, cfg, png):
  tl.print_table(
      ["method", "measured", "theory", "frac. iterates under bound"],
      [["Nash-MP rate −d log KL/dk", tl.fmt(res["mp_rate_per_iter"], 4),
        f"{res['theory_rate_per_iter']:.4f} (log(1+ηβ))", f"{res['mp_frac_under_bound']:.3f}"],
       ["Nash-MP KL at k=20", tl.fmt(res["mp_kl_at_20"], 6), tl.fmt(res["mp_bound_at_20"], 6), ""],
       [f"Nash-MD KL at T={cfg.md_iters}", tl.fmt(res["md_kl_final"], 6),
        f"{res['md_bound_final']:.4f} (8/(τ²(T+1)))", f"{res['md_frac_under_bound']:.3f}"]])
  print(f"equilibrium residual {res['equilibrium_residual']:.2e}; {res['seconds']:.1f}s")
  plt = tl.pyplot()
  c = res["curves"]
  fig, ax = plt.subplots(1, 2, figsize=(8, 3.2))
  kq = 2 * np.arange(len(c["mp_kl_mean"]))
  ax[0].semilogy(kq, c["mp_kl_mean"], label="Nash-MP measured")
  ax[0].semilogy(kq, c["mp_bound_mean"], "--", label="(1+2β)^(−N/2)·KL₀")
  ax[0].set_xlabel("preference queries N = 2k"); ax[0].set_ylabel("KL(π*_β‖π)")
  ax[0].set_ylim(1e-7, None); ax[0].legend(fontsize=7)
  t = np.asarray(c["md_t"]) + 1
  ax[1].loglog(t, c["md_kl_mean"], label="Nash-MD measured")
  ax[1].loglog(t, c["md_bound"], "--", label="8/(τ²(T+1))")
  ax[1].set_xlabel("iteration T+1"); ax[1].legend(fontsize=7)
  tl.save_fig(fig, png)


if __name__ == "__main__":
  tl.main(__file__, run, report)
