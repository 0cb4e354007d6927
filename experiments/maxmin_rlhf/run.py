"""MaxMin-RLHF vs single-reward RLHF with a majority and a minority user group.

Responses y ∈ {1..K}; two groups g ∈ {maj, min} with standardised true rewards
r_g (zero mean, unit std over responses; correlation `corr`). Each of U users
belongs to one group (a fraction `minority_frac` to the minority) and labels
`pairs_per_user` uniform pairs by Bradley-Terry on reward_scale·r_g.

* single-reward RLHF: one BT reward r̂ on all data; policy π ∝ μ·exp(r̂/β).
* MaxMin-RLHF ("MaxMin-RLHF: Alignment with Diverse Human Preferences"):
  EM over users with 2 BT reward models (E-step: user → argmax_u Σ log σ(r̂_u(y_w) −
  r̂_u(y_l)); M-step: BT fit per cluster), then the egalitarian policy
  max_π min_u E_π[r̂_u] − β·KL(π‖μ) by gradient ascent on the logits.
Reported: each group's true utility E_π[r_g] (0 = the reference policy).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import _toylib as tl
import rlhf_jax.losses as L
from rlhf_jax.losses.reward_model_latent import maxmin_e_step
from rlhf_jax.rewards import ensemble

BT = L.get("bt")
MAXMIN_M_STEP = L.get("maxmin_em")


def standardise(x):
  return (x - x.mean()) / x.std()


def make_data(rng, cfg):
  k1, k2, k3, k4, k5 = jax.random.split(rng, 5)
  k = cfg.n_responses
  z1, z2 = jax.random.normal(k1, (2, k))
  r_maj = standardise(z1)
  r_min = standardise(cfg.corr * r_maj + np.sqrt(1 - cfg.corr ** 2) * standardise(z2))
  n_min = int(round(cfg.minority_frac * cfg.n_users))
  group = (jnp.arange(cfg.n_users) < n_min).astype(jnp.int32)      # 1 = minority
  shape = (cfg.n_users, cfg.pairs_per_user)
  a = jax.random.randint(k3, shape, 0, k)
  b = (a + jax.random.randint(k4, shape, 1, k)) % k
  r_user = cfg.reward_scale * jnp.where(group[:, None] == 1, r_min[None], r_maj[None])  # [U, K]
  ra, rb = jnp.take_along_axis(r_user, a, 1), jnp.take_along_axis(r_user, b, 1)
  a_wins = jax.random.bernoulli(k5, jax.nn.sigmoid(ra - rb))
  w, l = jnp.where(a_wins, a, b), jnp.where(a_wins, b, a)
  return jnp.stack([r_maj, r_min]), group, w, l


def adam_fit(loss_fn, x0, steps, lr):
  """Full-batch Adam on `loss_fn` from `x0` (jitted inside the caller's trace)."""
  opt = optax.adam(lr)
  def step(carry, _):
    x, s = carry
    u, s = opt.update(jax.grad(loss_fn)(x), s, x)
    return (optax.apply_updates(x, u), s), None
  (x, _), _ = jax.lax.scan(step, (x0, opt.init(x0)), None, length=steps)
  return x


def fit_single(w, l, cfg):
  """One BT reward on everybody's pairs; w, l: [U·M]."""
  loss_fn = lambda r: BT(r[w], r[l])[0].mean()
  r = adam_fit(loss_fn, jnp.zeros((cfg.n_responses,)), cfg.em_iters * cfg.m_steps, cfg.lr)
  return r - r.mean()


def maxmin_em(rng, w, l, user, cfg):
  """Hard EM over users with two BT reward models (library E- and M-step).

  w, l, user: [U·M]. Returns (rewards [2, K] centred, assignment [U]).
  """
  def e_step(r):
    return maxmin_e_step(r[:, w].T, r[:, l].T, user, num_users=cfg.n_users, hard=True)
  def em_step(r, _):
    resp = e_step(r)                                    # [U, 2]
    loss_fn = lambda x: MAXMIN_M_STEP(x[:, w].T, x[:, l].T, weights=resp[user])[0].mean()
    return adam_fit(loss_fn, r, cfg.m_steps, cfg.lr), None
  r, _ = jax.lax.scan(em_step, jax.random.normal(rng, (2, cfg.n_responses)), None,
                      length=cfg.em_iters)
  return r - r.mean(1, keepdims=True), jnp.argmax(e_step(r), -1)


def maxmin_policy(rewards, cfg):
  """argmax_π min_u E_π[r_u] − β KL(π‖μ), μ uniform, by Adam on the logits."""
  def objective(theta):
    pi = jax.nn.softmax(theta)
    kl = jnp.sum(pi * (jnp.log(pi) + jnp.log(cfg.n_responses)))
    return -(ensemble.wco((rewards @ pi)[None])[0] - cfg.beta * kl)   # min over groups
  th = adam_fit(objective, jnp.zeros((cfg.n_responses,)), cfg.policy_steps, cfg.lr)
  return jax.nn.softmax(th)


def one_seed(rng, cfg):
  k_data, k_em = jax.random.split(rng)
  r_true, group, w, l = make_data(k_data, cfg)
  user = jnp.repeat(jnp.arange(cfg.n_users), cfg.pairs_per_user)
  w, l = w.reshape(-1), l.reshape(-1)
  pi_single = jax.nn.softmax(fit_single(w, l, cfg) / cfg.beta)
  r_em, assign = maxmin_em(k_em, w, l, user, cfg)
  pi_maxmin = maxmin_policy(r_em, cfg)
  # cluster purity up to a label permutation
  purity = jnp.maximum(jnp.mean(assign == group), jnp.mean(assign != group))
  return {"single": r_true @ pi_single, "maxmin": r_true @ pi_maxmin, "purity": purity}


def run(cfg):
  t0 = time.time()
  rngs = jax.random.split(jax.random.PRNGKey(3), cfg.seeds)
  out = jax.jit(jax.vmap(lambda r: one_seed(r, cfg)))(rngs)
  res = {}
  for m in ("single", "maxmin"):
    u = np.asarray(out[m])
    res[m] = {"majority": tl.mean_std(u[:, 0]), "minority": tl.mean_std(u[:, 1]),
              "min_group": tl.mean_std(u.min(1))}
  res["cluster_purity"] = tl.mean_std(out["purity"])
  res.update(seconds=time.time() - t0)
  return res


def report(res, cfg, png):
  names = {"single": "single BT reward", "maxmin": "MaxMin-RLHF (EM, 2 groups)"}
  tl.print_table(["policy", "majority utility", "minority utility", "min over groups"],
                 [[names[m], tl.fmt(res[m]["majority"]), tl.fmt(res[m]["minority"]),
                   tl.fmt(res[m]["min_group"])] for m in ("single", "maxmin")])
  print(f"EM cluster purity {tl.fmt(res['cluster_purity'])}; "
        f"{res['seconds']:.1f}s")
  plt = tl.pyplot()
  fig, ax = plt.subplots(figsize=(4.5, 3))
  x = np.arange(2)
  for off, g in ((-0.2, "majority"), (0.2, "minority")):
    ax.bar(x + off, [res[m][g]["mean"] for m in ("single", "maxmin")], 0.4,
           yerr=[res[m][g]["std"] for m in ("single", "maxmin")], label=g)
  ax.set_xticks(x); ax.set_xticklabels(["single BT", "MaxMin"]); ax.axhline(0, color="k", lw=0.5)
  ax.set_ylabel("true utility E_π[r_g]"); ax.legend(fontsize=7)
  tl.save_fig(fig, png)


if __name__ == "__main__":
  tl.main(__file__, run, report)
