"""Reward-model over-optimisation and ensembles (best-of-n against a proxy).

Setup after "Reward Model Ensembles Help Mitigate Overoptimization": responses are
x ∈ R^d ~ N(0, I) (the reference policy). A known gold reward
  r*(x) = u·x − c·‖x‖²  (u a random unit vector per seed)
labels `n_pairs` reference pairs by Bradley-Terry. Each of `members` proxy reward
models (ReLU MLP, different init, same data) is trained with the BT loss. Each
member is standardised over the reference pool. Best-of-n selects by

* single: member 0;  mean: mean_k R_k;
* WCO: min_k R_k;  UWO: mean_k R_k − λ·Var_k R_k (λ = 0.5 for best-of-n),

and we report the gold and proxy score of the selected response against
KL_bon(n) = log n − (n−1)/n, with the unbiased best-of-n estimator over a pool of
N samples: E[g_best-of-n] = Σ_{i≥n} C(i−1, n−1)/C(N, n)·g_(i) (sorted by score).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.scipy.special import gammaln

from experiments import _toylib as tl
import rlhf_jax.losses as L
from rlhf_jax.rewards import ensemble

BT = L.get("bt")


def gold(x, u, c):
  return x @ u - c * jnp.sum(x * x, -1)


def mlp_init(rng, d, h):
  k1, k2, k3 = jax.random.split(rng, 3)
  he = lambda k, i, o: jax.random.normal(k, (i, o)) * jnp.sqrt(2.0 / i)
  return {"w1": he(k1, d, h), "b1": jnp.zeros(h), "w2": he(k2, h, h), "b2": jnp.zeros(h),
          "w3": he(k3, h, 1)}


def mlp(p, x):
  h = jax.nn.relu(x @ p["w1"] + p["b1"])
  h = jax.nn.relu(h @ p["w2"] + p["b2"])
  return (h @ p["w3"])[..., 0]


def train_member(rng, xw, xl, cfg):
  params = mlp_init(rng, cfg.dim, cfg.hidden)
  opt = optax.adam(cfg.lr)
  loss_fn = lambda p: BT(mlp(p, xw), mlp(p, xl))[0].mean()
  def step(carry, _):
    p, s = carry
    up, s = opt.update(jax.grad(loss_fn)(p), s, p)
    return (optax.apply_updates(p, up), s), None
  (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), None, length=cfg.steps)
  return params


def bon_weights(pool, ns):
  """[len(ns), pool] weights of the i-th smallest score (i = 1..N) for best-of-n."""
  i = jnp.arange(1, pool + 1, dtype=jnp.float32)
  n = jnp.asarray(ns, jnp.float32)[:, None]
  logc = lambda a, b: gammaln(a + 1) - gammaln(b + 1) - gammaln(a - b + 1)
  logw = logc(i[None] - 1, n - 1) - logc(jnp.float32(pool), n)
  return jnp.where(i[None] >= n, jnp.exp(logw), 0.0)


def bon_curve(score, g, weights):
  order = jnp.argsort(score)
  return weights @ g[order], weights @ score[order]


def one_seed(rng, cfg, weights):
  k_u, k_a, k_b, k_lab, k_init, k_pool = jax.random.split(rng, 6)
  u = jax.random.normal(k_u, (cfg.dim,))
  u = u / jnp.linalg.norm(u)
  xa = jax.random.normal(k_a, (cfg.n_pairs, cfg.dim))
  xb = jax.random.normal(k_b, (cfg.n_pairs, cfg.dim))
  a_wins = jax.random.bernoulli(k_lab, jax.nn.sigmoid(gold(xa, u, cfg.curvature)
                                                      - gold(xb, u, cfg.curvature)))
  xw = jnp.where(a_wins[:, None], xa, xb)
  xl = jnp.where(a_wins[:, None], xb, xa)
  members = jax.vmap(lambda k: train_member(k, xw, xl, cfg))(
      jax.random.split(k_init, cfg.members))
  pool = jax.random.normal(k_pool, (cfg.pool, cfg.dim))
  rewards = jax.vmap(lambda p: mlp(p, pool))(members)                       # [K, N]
  rewards = (rewards - rewards.mean(1, keepdims=True)) / rewards.std(1, keepdims=True)
  g = gold(pool, u, cfg.curvature)
  per_sample = rewards.T                                                     # [N, K]
  scores = {"single": rewards[0], "mean": ensemble.mean(per_sample),
            "wco": ensemble.wco(per_sample),
            "uwo": ensemble.uwo(per_sample, coef=cfg.uwo_lambda), "gold_oracle": g}
  return {k: bon_curve(s, g, weights) for k, s in scores.items()}


def run(cfg):
  t0 = time.time()
  ns = [2 ** i for i in range(cfg.max_log2_n + 1)]
  weights = bon_weights(cfg.pool, ns)
  rngs = jax.random.split(jax.random.PRNGKey(5), cfg.seeds)
  out = jax.jit(jax.vmap(lambda r: one_seed(r, cfg, weights)))(rngs)
  kl = np.log(ns) - (np.asarray(ns) - 1) / np.asarray(ns)
  res = {"n": ns, "kl": kl, "methods": {}}
  for name, (g, s) in out.items():
    g, s = np.asarray(g), np.asarray(s)
    peak = g.argmax(1)
    res["methods"][name] = {
        "gold_mean": g.mean(0), "gold_std": g.std(0), "proxy_mean": s.mean(0),
        "gold_final": tl.mean_std(g[:, -1]), "gold_peak": tl.mean_std(g.max(1)),
        "kl_at_peak": tl.mean_std(kl[peak]), "drop": tl.mean_std(g.max(1) - g[:, -1])}
  res.update(seconds=time.time() - t0)
  return res


def report(res, cfg, png):
  names = {"single": "single proxy", "mean": "ensemble mean", "wco": "WCO (min)",
           "uwo": f"UWO (λ={cfg.uwo_lambda})", "gold_oracle": "gold (oracle)"}
  rows = [[names[k], tl.fmt(m["gold_peak"]), tl.fmt(m["kl_at_peak"], 2),
           tl.fmt(m["gold_final"]), tl.fmt(m["drop"])] for k, m in res["methods"].items()]
  tl.print_table(["best-of-n selector", "peak gold", "KL at peak (nats)",
                  f"gold at KL={res['kl'][-1]:.2f}", "drop from peak"], rows)
  print(f"{res['seconds']:.1f}s")
  plt = tl.pyplot()
  fig, ax = plt.subplots(1, 2, figsize=(8, 3.2))
  for k, m in res["methods"].items():
    ax[0].plot(res["kl"], m["gold_mean"], marker=".", label=names[k])
    if k != "gold_oracle":
      ax[1].plot(res["kl"], m["proxy_mean"], marker=".", label=names[k])
  ax[0].set_xlabel("KL(best-of-n ‖ ref) (nats)"); ax[0].set_ylabel("gold reward")
  ax[1].set_xlabel("KL(best-of-n ‖ ref) (nats)"); ax[1].set_ylabel("proxy score (standardised)")
  ax[0].legend(fontsize=6)
  tl.save_fig(fig, png)


if __name__ == "__main__":
  tl.main(__file__, run, report)
