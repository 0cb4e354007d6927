"""CoPG vs policy gradient on an off-policy multi-armed bandit.

K arms with reward R ~ N(0, 1); reference π_ref uniform; target
π* ∝ π_ref·exp(R/β), the maximiser of E_π R − β·KL(π‖π_ref). Training pairs
(y, y′) come from a FIXED behaviour policy μ = softmax(T·z), z ~ N(0, 1) (off-policy).
A tabular policy π = softmax(θ) is trained by Adam on minibatches of pairs with

* CoPG ("Contrastive Policy Gradient: Aligning LLMs on sequence-level scores in a
  supervised-friendly fashion"): maximise (R(y) − R(y′))·Δ − (β/2)·Δ²,
  Δ = log π(y)/π_ref(y) − log π(y′)/π_ref(y′);
* off-policy PG: the RLOO(k=2) surrogate ½(R(y) − R(y′))·(log π(y) − log π(y′))
  on the μ-samples, minus the exact β·KL(π‖π_ref) (the usual PG objective applied
  to data it was not derived for);
* on-policy PG: the same surrogate with (y, y′) ~ π (a reference for what PG
  reaches when its samples are on-policy).
Reported: KL(π_T ‖ π*) = (J(π*) − J(π_T))/β, the regularised-objective gap over β.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import _toylib as tl
import rlhf_jax.losses as L


COPG = L.get("copg")


def kl(p_log, q_log):
  return jnp.sum(jnp.exp(p_log) * (p_log - q_log))


def train(rng, method, cfg):
  k_r, k_mu, k_run = jax.random.split(rng, 3)
  K = cfg.n_arms
  R = jax.random.normal(k_r, (K,))
  log_mu = jax.nn.log_softmax(cfg.behaviour_temp * jax.random.normal(k_mu, (K,)))
  log_ref = jnp.full((K,), -jnp.log(K))
  log_star = jax.nn.log_softmax(log_ref + R / cfg.beta)
  opt = optax.adam(cfg.lr)

  def loss_fn(theta, y, y2):
    lp = jax.nn.log_softmax(theta)
    if method == "copg":
      return COPG(lp[y], lp[y2], log_ref[y], log_ref[y2], beta=cfg.beta,
                  chosen_rewards=R[y], rejected_rewards=R[y2])[0].mean()
    surrogate = 0.5 * (R[y] - R[y2]) * (lp[y] - lp[y2])
    return -surrogate.mean() + cfg.beta * kl(lp, log_ref)

  def step(carry, t):
    theta, s = carry
    k = jax.random.fold_in(k_run, t)
    logits = jax.lax.stop_gradient(theta) if method == "pg_on" else log_mu
    y, y2 = jax.random.categorical(k, logits, shape=(2, cfg.batch))
    u, s = opt.update(jax.grad(loss_fn)(theta, y, y2), s, theta)
    theta = optax.apply_updates(theta, u)
    return (theta, s), kl(jax.nn.log_softmax(theta), log_star)

  theta0 = jnp.zeros((K,))
  _, kls = jax.lax.scan(step, (theta0, opt.init(theta0)), jnp.arange(cfg.steps))
  return kls[cfg.log_every - 1::cfg.log_every]


METHODS = {"copg": "CoPG (off-policy)", "pg_off": "PG (off-policy)",
           "pg_on": "PG (on-policy, reference)"}


def run(cfg):
  t0 = time.time()
  rngs = jax.random.split(jax.random.PRNGKey(6), cfg.seeds)
  res = {"steps": list(range(cfg.log_every, cfg.steps + 1, cfg.log_every)), "methods": {}}
  for m in METHODS:
    curves = np.asarray(jax.jit(jax.vmap(lambda r: train(r, m, cfg)))(rngs))
    res["methods"][m] = {"final_kl": tl.mean_std(curves[:, -1]), "kl_mean": curves.mean(0),
                         "kl_std": curves.std(0)}
  res.update(seconds=time.time() - t0)
  return res


def report(res, cfg, png):
  tl.print_table(["method", f"KL(π_T‖π*) after {cfg.steps} steps"],
                 [[METHODS[m], tl.fmt(v["final_kl"], 4)] for m, v in res["methods"].items()])
  print(f"{res['seconds']:.1f}s")
  plt = tl.pyplot()
  fig, ax = plt.subplots(figsize=(4.5, 3))
  for m, v in res["methods"].items():
    ax.semilogy(res["steps"], v["kl_mean"], label=METHODS[m])
  ax.set_xlabel("step"); ax.set_ylabel("KL(π‖π*)"); ax.legend(fontsize=7)
  tl.save_fig(fig, png)


if __name__ == "__main__":
  tl.main(__file__, run, report)
