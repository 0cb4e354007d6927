"""STARC distance vs naive L2 as predictors of policy regret on random MDPs.

After "STARC: A General Framework For Quantifying Differences Between Reward
Functions" (Skalse et al.): per seed, a random MDP (Dirichlet transitions τ,
discount γ, uniform initial state) and many reward pairs (R1, R2), R1 ~ N(0, 1)
over (s, a, s′) and
  R2 = α·R1 + γΦ(s′) − Φ(s) + ν·N(0, 1)   (α log-uniform in [0.1, 10],
                                            Φ ~ U(0, max_shaping)·N(0, 1), ν ~ U(0, max_noise)),
i.e. a positively rescaled, potential-shaped and noised copy: scaling and shaping
never change the optimal policy, only the noise does. Regret of the optimal
policy π2 of R2, under R1:
  (J1(π1*) − J1(π2)) / (J1(π1*) − J1(π1⁻)),  π1⁻ the optimal policy of −R1.
Distances: naive L2 ‖R1 − R2‖₂, scale-normalised L2 ‖R1/‖R1‖ − R2/‖R2‖‖₂, and
the library's STARC distance (canonicalise with the uniform policy's value,
normalise by the L2 norm, L2 distance). Reported: Pearson and Spearman
correlation of each distance with regret across the pairs.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments import _toylib as tl
from rlhf_jax.rewards import starc


def optimal_policy(reward, trans, gamma, iters):
  """Greedy policy [S] of Q* for reward [S, A, S′]."""
  r_sa = jnp.sum(trans * reward, -1)
  def body(v, _):
    return jnp.max(r_sa + gamma * trans @ v, -1), None
  v, _ = jax.lax.scan(body, jnp.zeros(r_sa.shape[0]), None, length=iters)
  return jnp.argmax(r_sa + gamma * trans @ v, -1)


def policy_return(policy, reward, trans, gamma):
  """J(π) = mean_s V^π(s) for a deterministic policy [S]."""
  S = trans.shape[0]
  p = trans[jnp.arange(S), policy]                                    # [S, S′]
  r = jnp.sum(p * reward[jnp.arange(S), policy], -1)
  def body(v, _):   # iterative evaluation (γ^400 ≈ 5e-19)
    return r + gamma * p @ v, None
  v, _ = jax.lax.scan(body, jnp.zeros(S), None, length=400)
  return v.mean()


def rank(x):
  return jnp.argsort(jnp.argsort(x)).astype(jnp.float32)


def pearson(x, y):
  x, y = x - x.mean(), y - y.mean()
  return jnp.sum(x * y) / jnp.sqrt(jnp.sum(x * x) * jnp.sum(y * y))


def one_pair(rng, trans, cfg):
  S, A = cfg.n_states, cfg.n_actions
  k1, k2, k3, k4, k5, k6 = jax.random.split(rng, 6)
  r1 = jax.random.normal(k1, (S, A, S))
  alpha = jnp.exp(jax.random.uniform(k2, (), minval=np.log(0.1), maxval=np.log(10.0)))
  phi = jax.random.uniform(k3, (), maxval=cfg.max_shaping) * jax.random.normal(k4, (S,))
  noise = jax.random.uniform(k5, (), maxval=cfg.max_noise) * jax.random.normal(k6, (S, A, S))
  r2 = alpha * r1 + cfg.gamma * phi[None, None, :] - phi[:, None, None] + noise
  pi1 = optimal_policy(r1, trans, cfg.gamma, cfg.vi_iters)
  pi2 = optimal_policy(r2, trans, cfg.gamma, cfg.vi_iters)
  worst = optimal_policy(-r1, trans, cfg.gamma, cfg.vi_iters)
  j = lambda pi: policy_return(pi, r1, trans, cfg.gamma)
  regret = (j(pi1) - j(pi2)) / (j(pi1) - j(worst))
  unit = lambda r: r / jnp.linalg.norm(r)
  return {"regret": regret,
          "l2": jnp.linalg.norm(r1 - r2),
          "l2_normalised": jnp.linalg.norm(unit(r1) - unit(r2)),
          "starc": starc.starc_distance(r1, r2, trans, cfg.gamma)}


def one_seed(rng, cfg):
  k_t, k_p = jax.random.split(rng)
  trans = jax.random.dirichlet(k_t, jnp.ones(cfg.n_states), (cfg.n_states, cfg.n_actions))
  d = jax.vmap(lambda k: one_pair(k, trans, cfg))(jax.random.split(k_p, cfg.pairs))
  out = {}
  for name in ("l2", "l2_normalised", "starc"):
    out[name] = {"pearson": pearson(d[name], d["regret"]),
                 "spearman": pearson(rank(d[name]), rank(d["regret"]))}
  return out, d


DIST = {"l2": "naive L2 ‖R1 − R2‖", "l2_normalised": "L2 of R/‖R‖", "starc": "STARC"}


def run(cfg):
  t0 = time.time()
  rngs = jax.random.split(jax.random.PRNGKey(8), cfg.seeds)
  # vmap over seeds in chunks of 5 (one program, called per chunk). Note: with
  # jnp.linalg.solve in `policy_return`, one vmap over 10×500 pairs deadlocked XLA:CPU
  # (jax 0.10.2, 2 cores); the iterative evaluation above avoids that.
  fn = jax.jit(jax.vmap(lambda r: one_seed(r, cfg)))
  chunks = [fn(rngs[i:i + 5]) for i in range(0, cfg.seeds, 5)]
  out, d = jax.tree.map(lambda *x: jnp.concatenate(x), *chunks)
  res = {name: {k: tl.mean_std(v) for k, v in m.items()} for name, m in out.items()}
  res["scatter"] = {k: np.asarray(v[0]) for k, v in d.items()}     # first seed, for the plot
  res["mean_regret"] = tl.mean_std(d["regret"])
  res["seconds"] = time.time() - t0
  return res


def report(res, cfg, png):
  tl.print_table(["distance", "Pearson r with regret", "Spearman ρ with regret"],
                 [[DIST[k], tl.fmt(res[k]["pearson"]), tl.fmt(res[k]["spearman"])] for k in DIST])
  print(f"mean normalised regret {tl.fmt(res['mean_regret'])}; {res['seconds']:.1f}s")
  plt = tl.pyplot()
  fig, ax = plt.subplots(1, 3, figsize=(9, 2.8))
  for a, k in zip(ax, DIST):
    a.scatter(res["scatter"][k], res["scatter"]["regret"], s=4)
    a.set_xlabel(DIST[k], fontsize=8)
  ax[0].set_ylabel("normalised regret")
  tl.save_fig(fig, png)


if __name__ == "__main__":
  tl.main(__file__, run, report)
