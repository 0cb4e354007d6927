"""GPM vs Bradley-Terry on cyclic (intransitive) preferences over tabular items.

Every item i has a learnable embedding: a scalar reward r_i (BT) or a unit vector
v_i ∈ R^{2k} (GPM, "Beyond Bradley-Terry Models: A General Preference Model for
Language Model Alignment"). GPM scores s(i ≻ j) = ⟨R v_i, v_j⟩ with
R = blockdiag([[0,−1],[1,0]], …) and P(i ≻ j) = σ(s/β). Data: every pair of a
tournament, labelled by the winner. Two tournaments:

* cyclic: the regular tournament (i beats the next (n−1)/2 items mod n), where
  every item wins exactly half its games, so any BT ranking is at chance;
* random: each pair's winner drawn by a coin (a generic intransitive tournament).
Accuracy = fraction of pairs whose winner the model predicts.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import _toylib as tl
import rlhf_jax.losses as L
from rlhf_jax.losses.reward_model_latent import gpm_score

BT = L.get("bt")
GPM = L.get("gpm")


def tournament(rng, n, kind):
  """Returns (winner, loser) index arrays over all n(n−1)/2 pairs."""
  i, j = np.triu_indices(n, 1)
  i, j = jnp.asarray(i), jnp.asarray(j)
  if kind == "cyclic":
    i_wins = ((j - i) % n) <= (n - 1) // 2
  else:
    i_wins = jax.random.bernoulli(rng, 0.5, i.shape)
  return jnp.where(i_wins, i, j), jnp.where(i_wins, j, i)


def train(rng, n, kind, dim, beta, lr, steps):
  """dim = 0 trains BT; dim = 2k trains GPM. Returns pair accuracy."""
  k_data, k_init = jax.random.split(rng)
  w, l = tournament(k_data, n, kind)
  if dim == 0:
    params = 0.1 * jax.random.normal(k_init, (n,))
    def loss_fn(p):
      return BT(p[w], p[l])[0].mean()
    def acc_fn(p):
      return jnp.mean(p[w] > p[l])
  else:
    params = jax.random.normal(k_init, (n, dim))
    unit = lambda p: p / jnp.linalg.norm(p, axis=-1, keepdims=True)
    def loss_fn(p):
      v = unit(p)
      return GPM(v[w], v[l], beta=beta)[0].mean()
    def acc_fn(p):
      v = unit(p)
      return jnp.mean(gpm_score(v[w], v[l]) > 0)
  opt = optax.adam(lr)
  def step(carry, _):
    p, s = carry
    g = jax.grad(loss_fn)(p)
    u, s = opt.update(g, s, p)
    return (optax.apply_updates(p, u), s), None
  (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), None, length=steps)
  return acc_fn(params)


def run(cfg):
  t0 = time.time()
  dims = [0] + [int(d) for d in cfg.dims.split(",")]
  rngs = jax.random.split(jax.random.PRNGKey(1), cfg.seeds)
  table = {}
  for kind in ("cyclic", "random"):
    for dim in dims:
      fn = jax.jit(jax.vmap(lambda r: train(r, cfg.n_items, kind, dim, cfg.beta, cfg.lr,
                                            cfg.steps)))
      table[f"{kind}/{'bt' if dim == 0 else f'gpm{dim}'}"] = tl.mean_std(fn(rngs))
  return {"accuracy": table, "dims": dims, "seconds": time.time() - t0}


def report(res, cfg, png):
  rows = []
  for dim in res["dims"]:
    name = "BT (scalar)" if dim == 0 else f"GPM dim {dim}"
    key = "bt" if dim == 0 else f"gpm{dim}"
    rows.append([name] + [tl.fmt(res["accuracy"][f"{k}/{key}"]) for k in ("cyclic", "random")])
  tl.print_table(["model", "cyclic tournament acc.", "random tournament acc."], rows)
  print(f"{res['seconds']:.1f}s")
  plt = tl.pyplot()
  fig, ax = plt.subplots(figsize=(4.5, 3))
  labels = [r[0] for r in rows]
  x = np.arange(len(labels))
  for off, kind in ((-0.2, "cyclic"), (0.2, "random")):
    keys = ["bt" if d == 0 else f"gpm{d}" for d in res["dims"]]
    m = [res["accuracy"][f"{kind}/{k}"]["mean"] for k in keys]
    s = [res["accuracy"][f"{kind}/{k}"]["std"] for k in keys]
    ax.bar(x + off, m, 0.4, yerr=s, label=kind)
  ax.axhline(0.5, color="k", lw=0.5)
  ax.set_xticks(x); ax.set_xticklabels(labels, fontsize=7); ax.set_ylabel("pair accuracy")
  ax.legend(fontsize=7)
  tl.save_fig(fig, png)


if __name__ == "__main__":
  tl.main(__file__, run, report)
