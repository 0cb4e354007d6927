"""DPO vs rDPO with flipped preference labels on a tabular bandit.

Responses y ∈ {1..K} with true reward r*(y) ~ N(0, s²); uniform reference μ.
Pairs (y, y′) ~ μ×μ (y ≠ y′) are labelled by Bradley-Terry on r*, then each
label is flipped with probability ε. A tabular policy π_θ = softmax(θ) is trained
full-batch on the noisy data with DPO (−log σ(βh)) or rDPO
("Provably Robust DPO: Aligning Language Models with Noisy Feedback"):
  ℓ = [(1−ε)·(−log σ(βh)) − ε·(−log σ(−βh))] / (1 − 2ε),
h = log π(y_w)/μ(y_w) − log π(y_l)/μ(y_l). With clean data and infinite pairs,
the DPO optimum is π* ∝ μ·exp(r*/β).

Reported, on clean ground truth:
* reward recovery = (E_π r* − E_μ r*) / (E_π* r* − E_μ r*)  (1 = the clean optimum);
* ranking accuracy = fraction of response pairs ordered like r* by log π/μ.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import _toylib as tl
import rlhf_jax.losses as L


DPO = L.get("dpo")
RDPO = L.get("rdpo")


def make_data(rng, k, n_pairs, scale, eps):
  k_r, k_a, k_b, k_lab, k_flip = jax.random.split(rng, 5)
  r = scale * jax.random.normal(k_r, (k,))
  a = jax.random.randint(k_a, (n_pairs,), 0, k)
  b = (a + jax.random.randint(k_b, (n_pairs,), 1, k)) % k     # b ≠ a, uniform
  a_wins = jax.random.bernoulli(k_lab, jax.nn.sigmoid(r[a] - r[b]))
  a_wins = a_wins ^ jax.random.bernoulli(k_flip, eps, (n_pairs,))
  return r, jnp.where(a_wins, a, b), jnp.where(a_wins, b, a)


def train(rng, eps, cfg, loss_eps=None):
  """Data flipped at rate `eps` (may be traced); DPO if loss_eps is None else rDPO(ε)."""
  r, w, l = make_data(rng, cfg.n_responses, cfg.n_pairs, cfg.reward_scale, eps)
  log_mu = jnp.full((cfg.n_responses,), -jnp.log(cfg.n_responses))
  def loss_fn(theta):
    lp = jax.nn.log_softmax(theta)
    args = (lp[w], lp[l], log_mu[w], log_mu[l])
    losses = (DPO(*args, beta=cfg.beta)[0] if loss_eps is None
              else RDPO(*args, beta=cfg.beta, eps=loss_eps)[0])
    return losses.mean()
  opt = optax.adam(cfg.lr)
  def step(carry, _):
    th, s = carry
    u, s = opt.update(jax.grad(loss_fn)(th), s, th)
    return (optax.apply_updates(th, u), s), None
  theta0 = jnp.zeros((cfg.n_responses,))
  (theta, _), _ = jax.lax.scan(step, (theta0, opt.init(theta0)), None, length=cfg.steps)
  pi = jax.nn.softmax(theta)
  pi_star = jax.nn.softmax(r / cfg.beta)
  recovery = (pi @ r - r.mean()) / (pi_star @ r - r.mean())
  i, j = np.triu_indices(cfg.n_responses, 1)
  acc = jnp.mean(jnp.sign(theta[i] - theta[j]) == jnp.sign(r[i] - r[j]))
  return recovery, acc


def run(cfg):
  t0 = time.time()
  rngs = jax.random.split(jax.random.PRNGKey(2), cfg.seeds)
  eps_list = [float(e) for e in cfg.eps.split(",")]
  out = {"eps": eps_list, "dpo": {}, "rdpo": {}}
  # Same seeds (same true rewards and data) for both losses. DPO vmaps over ε;
  # rDPO's ε is a static hyper-parameter of the loss, so one program per ε.
  dpo = jax.jit(jax.vmap(jax.vmap(lambda rng, e: train(rng, e, cfg), (0, None)), (None, 0)))
  rec, acc = dpo(rngs, jnp.asarray(eps_list))
  for i, e in enumerate(eps_list):
    out["dpo"][str(e)] = {"recovery": tl.mean_std(rec[i]), "accuracy": tl.mean_std(acc[i])}
  for e in eps_list:
    rdpo = jax.jit(jax.vmap(lambda rng: train(rng, e, cfg, loss_eps=e)))  # pylint: disable=cell-var-from-loop
    rec, acc = rdpo(rngs)
    out["rdpo"][str(e)] = {"recovery": tl.mean_std(rec), "accuracy": tl.mean_std(acc)}
  out.update(seconds=time.time() - t0)
  return out


def report(res, cfg, png):
  rows = []
  for e in res["eps"]:
    d, r = res["dpo"][str(e)], res["rdpo"][str(e)]
    rows.append([f"{e:.1f}", tl.fmt(d["recovery"]), tl.fmt(r["recovery"]),
                 tl.fmt(d["accuracy"]), tl.fmt(r["accuracy"])])
  tl.print_table(["ε", "DPO reward recovery", "rDPO reward recovery", "DPO rank acc.",
                  "rDPO rank acc."], rows)
  print(f"{res['seconds']:.1f}s")
  plt = tl.pyplot()
  fig, ax = plt.subplots(figsize=(4.5, 3))
  for name in ("dpo", "rdpo"):
    m = np.array([res[name][str(e)]["recovery"]["mean"] for e in res["eps"]])
    s = np.array([res[name][str(e)]["recovery"]["std"] for e in res["eps"]])
    ax.errorbar(res["eps"], m, yerr=s, marker="o", capsize=3, label=name.upper().replace("R", "r"))
  ax.axhline(1.0, color="k", lw=0.5)
  ax.set_xlabel("label flip rate ε"); ax.set_ylabel("true-reward recovery"); ax.legend()
  tl.save_fig(fig, png)


if __name__ == "__main__":
  tl.main(__file__, run, report)
