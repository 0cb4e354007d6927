"""Regret vs partial-return preference models on a random gridworld.

After "Models of human preference for learning reward functions" (Knox et al.):
a size×size grid, 4 moves (walls: stay), every cell has one of `n_types` types,
`n_terminal` random cells are absorbing (the episode ends on entering them), and
every step pays w*[type(s′)] + w*_step (w* ~ N(0, I) per seed), discount γ.
Segments of `seg_len` uniformly random steps from uniform start states are
compared by a simulated human who follows the REGRET model:
  P(σ1 ≻ σ2) = σ(Σ_t A*(σ1) − Σ_t A*(σ2)),  A* = Q*_{w*} − V*_{w*}.
We learn ŵ ∈ R^{n_types} with the library's `regret_preference` loss, feeding it
either Σ A*_ŵ (regret model, Q* by differentiable value iteration) or the
per-step rewards ŵ[c_t] (partial-return model). Evaluation: the greedy policy of
Q*_ŵ, scored under w* as (V^π − V^unif)/(V* − V^unif) averaged over start states
(1 = optimal, 0 = uniformly random), and cos(ŵ, w*).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import _toylib as tl
import rlhf_jax.losses as L

PREF = L.get("regret_preference")
MOVES = np.array([[-1, 0], [1, 0], [0, -1], [0, 1]])


def transitions(size):
  """next_state [S, 4] of the deterministic grid."""
  rc = np.stack(np.unravel_index(np.arange(size * size), (size, size)), -1)
  nxt = np.clip(rc[:, None, :] + MOVES[None], 0, size - 1)
  return jnp.asarray(nxt[..., 0] * size + nxt[..., 1])


def reward_table(w, cell_type, nxt, is_term):
  """r(s, a) = w[type(s′)] + w[-1] (step term); 0 from absorbing terminal cells."""
  r = w[cell_type][nxt] + w[-1]
  return jnp.where(is_term[:, None], 0.0, r)


def q_star(w, cell_type, nxt, is_term, gamma, iters):
  """Q*(s, a) = r(s, a) + γ·V*(s′) by value iteration (differentiable in w)."""
  r_sa = reward_table(w, cell_type, nxt, is_term)              # [S, 4]
  def body(v, _):
    return jnp.max(r_sa + gamma * v[nxt], -1), None
  v, _ = jax.lax.scan(body, jnp.zeros(nxt.shape[0]), None, length=iters)
  return r_sa + gamma * v[nxt]


def policy_value(pi, w, cell_type, nxt, is_term, gamma, iters):
  """V^π under reward w for a stochastic policy pi [S, 4]."""
  r_sa = reward_table(w, cell_type, nxt, is_term)
  def body(v, _):
    return jnp.sum(pi * (r_sa + gamma * v[nxt]), -1), None
  v, _ = jax.lax.scan(body, jnp.zeros(nxt.shape[0]), None, length=iters)
  return v


def segments(rng, n, seg_len, nxt, is_term):
  """Random-action segments from non-terminal starts: states [n, T], actions [n, T]."""
  k_s, k_a = jax.random.split(rng)
  s0 = jax.random.categorical(k_s, jnp.where(is_term, -jnp.inf, 0.0), shape=(n,))
  acts = jax.random.randint(k_a, (n, seg_len), 0, 4)
  def body(s, a):
    return nxt[s, a], s
  _, states = jax.lax.scan(body, s0, acts.T)
  return states.T, acts


def seg_sum(table, states, acts):
  """Per-step values table[s_t, a_t], [n, T]."""
  return table[states, acts]


def one_seed(rng, cfg, n_pairs):
  k_w, k_t, k_term, k_1, k_2, k_lab = jax.random.split(rng, 6)
  S = cfg.size * cfg.size
  is_term = jnp.zeros((S,), bool).at[
      jax.random.choice(k_term, S, (cfg.n_terminal,), replace=False)].set(True)
  nxt = jnp.where(is_term[:, None], jnp.arange(S)[:, None], transitions(cfg.size))
  w_true = jax.random.normal(k_w, (cfg.n_types + 1,))
  cell_type = jax.random.randint(k_t, (S,), 0, cfg.n_types)
  vi = lambda w: q_star(w, cell_type, nxt, is_term, cfg.gamma, cfg.vi_iters)
  adv = lambda q: q - q.max(-1, keepdims=True)
  s1, a1 = segments(k_1, n_pairs, cfg.seg_len, nxt, is_term)
  s2, a2 = segments(k_2, n_pairs, cfg.seg_len, nxt, is_term)
  A_true = adv(vi(w_true))
  p1 = jax.nn.sigmoid(seg_sum(A_true, s1, a1).sum(-1) - seg_sum(A_true, s2, a2).sum(-1))
  labels = jax.random.bernoulli(k_lab, p1).astype(jnp.float32)

  def regret_loss(w):
    A = adv(vi(w))
    return PREF(seg_sum(A, s1, a1), seg_sum(A, s2, a2), labels=labels)[0].mean()

  def partial_return_loss(w):
    r_sa = reward_table(w, cell_type, nxt, is_term)
    return PREF(seg_sum(r_sa, s1, a1), seg_sum(r_sa, s2, a2), labels=labels)[0].mean()

  def fit(loss_fn):
    opt = optax.adam(cfg.lr)
    def step(carry, _):
      w, s = carry
      u, s = opt.update(jax.grad(loss_fn)(w), s, w)
      return (optax.apply_updates(w, u), s), None
    w0 = jnp.zeros((cfg.n_types + 1,))
    (w, _), _ = jax.lax.scan(step, (w0, opt.init(w0)), None, length=cfg.steps)
    return w

  start = (~is_term) / jnp.sum(~is_term)
  v_of = lambda pi: policy_value(pi, w_true, cell_type, nxt, is_term, cfg.gamma,
                                 3 * cfg.vi_iters) @ start
  greedy = lambda w: jax.nn.one_hot(jnp.argmax(vi(w), -1), 4)
  v_opt = v_of(greedy(w_true))
  v_unif = v_of(jnp.full((S, 4), 0.25))
  out = {}
  for name, loss_fn in (("regret", regret_loss), ("partial_return", partial_return_loss)):
    w = fit(loss_fn)
    out[name] = {"perf": (v_of(greedy(w)) - v_unif) / (v_opt - v_unif),
                 "cos": w @ w_true / (jnp.linalg.norm(w) * jnp.linalg.norm(w_true) + 1e-12)}
  return out


def run(cfg):
  t0 = time.time()
  rngs = jax.random.split(jax.random.PRNGKey(7), cfg.seeds)
  res = {"pairs": [int(p) for p in cfg.pairs.split(",")], "by_pairs": {}}
  for n in res["pairs"]:
    out = jax.jit(jax.vmap(lambda r: one_seed(r, cfg, n)))(rngs)
    res["by_pairs"][str(n)] = {m: {k: tl.mean_std(v) for k, v in d.items()}
                               for m, d in out.items()}
  res["seconds"] = time.time() - t0
  return res


NAMES = {"regret": "regret model", "partial_return": "partial-return model"}


def report(res, cfg, png):
  rows = []
  for n in res["pairs"]:
    d = res["by_pairs"][str(n)]
    rows.append([str(n)] + [tl.fmt(d[m]["cos"]) for m in NAMES]
                + [tl.fmt(d[m]["perf"]) for m in NAMES])
  tl.print_table(["pairs", "cos(ŵ,w*) regret", "cos(ŵ,w*) partial return",
                  "norm. return regret", "norm. return partial return"], rows)
  print(f"{res['seconds']:.1f}s")
  plt = tl.pyplot()
  fig, ax = plt.subplots(1, 2, figsize=(8, 3))
  for m in NAMES:
    for i, key in enumerate(("cos", "perf")):
      mean = [res["by_pairs"][str(n)][m][key]["mean"] for n in res["pairs"]]
      std = [res["by_pairs"][str(n)][m][key]["std"] for n in res["pairs"]]
      ax[i].errorbar(res["pairs"], mean, yerr=std, marker="o", capsize=3, label=NAMES[m])
  ax[0].set_ylabel("cos(ŵ, w*)"); ax[1].set_ylabel("normalised return of greedy π")
  for a in ax:
    a.set_xscale("log"); a.set_xlabel("preference pairs")
  ax[0].legend(fontsize=7)
  tl.save_fig(fig, png)


if __name__ == "__main__":
  tl.main(__file__, run, report)
