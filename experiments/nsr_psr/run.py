"""NSR vs PSR vs GRPO: pass@k of a small LM after RL on synthetic addition.

"The Surprising Effectiveness of Negative Reinforcement in LLM Reasoning" (Zhu et
al., 2025) splits the RLVR signal into Positive Sample Reinforcement (PSR: A = +1 on
correct samples only) and Negative Sample Reinforcement (NSR: A = −1 on wrong
samples only). Claim: NSR keeps (or improves) pass@k over the whole k range, while
PSR raises pass@1 but lowers pass@k at large k by collapsing diversity.

Set-up: the demo (tiny Llama, SFT warm-up, 2-digit addition). One SFT per seed is
shared by all methods; then RL with each advantage (same surrogate, token-mean
aggregation, no KL). Evaluation: n = 16 samples at temperature 1 per held-out
prompt; pass@k by the unbiased estimator 1 − C(n−c, k)/C(n, k); diversity = the
mean number of distinct completions among the 16.
"""

from __future__ import annotations

import time

import numpy as np

from experiments import _toylib as tl
from experiments._toylib import online_rl as orl
from rlhf_jax.advantages.outcome import pass_at_k

NAMES = {"base": "SFT model (before RL)", "grpo": "GRPO", "psr": "PSR (positive only)",
         "nsr": "NSR (negative only)", "w_reinforce": "W-REINFORCE"}


def distinct(ids: np.ndarray) -> float:
  """Mean number of distinct completions per prompt; ids [P, n, T]."""
  return float(np.mean([len({r.tobytes() for r in p}) for p in ids]))


def scores(correct: np.ndarray, ids: np.ndarray, ks) -> dict:
  c, n = correct.sum(1), correct.shape[1]
  out = {f"pass@{k}": float(np.mean(pass_at_k(n, c, k=k))) for k in ks}
  out["distinct"] = distinct(ids)
  return out


def run(cfg):
  t0 = time.time()
  env = orl.make_env(cfg.online)
  methods = {m: orl.make_method(env, ov) for m, ov in cfg.method_overrides.items()}
  evaluate = orl.make_sampler_eval(env, num_samples=cfg.num_samples, temperature=1.0)
  per_seed = {m: [] for m in ["base", *methods]}
  for seed in range(cfg.first_seed, cfg.first_seed + cfg.seeds):
    params, train_ex, eval_ex = orl.warm_start(env, seed)
    per_seed["base"].append(scores(*evaluate(params, eval_ex, 10_000 + seed), cfg.ks))
    for m, method in methods.items():
      final, hist = orl.run_rl(env, method, params, train_ex, seed)
      s = scores(*evaluate(final, eval_ex, 10_000 + seed), cfg.ks)
      s["train_reward_last20"] = float(np.mean([h["reward_mean"] for h in hist[-20:]]))
      s["entropy_last20"] = float(np.mean([h["entropy"] for h in hist[-20:]]))
      per_seed[m].append(s)
  res = summarise(per_seed, cfg.ks)
  res["seconds"] = time.time() - t0
  return res


def summarise(per_seed, ks):
  """{method: [per-seed scores]} -> mean ± std over seeds (rows kept under `per_seed`)."""
  res = {"seeds": len(per_seed["base"]), "ks": list(ks), "methods": {}}
  for m, rows in per_seed.items():
    res["methods"][m] = {k: tl.mean_std([r[k] for r in rows]) for k in rows[0]}
    res["methods"][m]["per_seed"] = rows
  return res


def report(res, cfg, png):
  ks = res["ks"]
  tl.print_table(["method"] + [f"pass@{k}" for k in ks] + ["distinct / 16"],
                 [[NAMES.get(m, m)] + [tl.fmt(v[f"pass@{k}"], 3) for k in ks]
                  + [tl.fmt(v["distinct"], 2)] for m, v in res["methods"].items()])
  print(f"{res['seeds']} seeds, {cfg.steps} RL steps, lr {cfg.lr:g}, KL {cfg.kl_coef:g}, "
        f"G={cfg.group_size}, n={cfg.num_samples}; "
        f"{res['seconds']:.0f}s")
  plt = tl.pyplot()
  fig, ax = plt.subplots(figsize=(4.5, 3.2))
  for m, v in res["methods"].items():
    ax.errorbar(ks, [v[f"pass@{k}"]["mean"] for k in ks], [v[f"pass@{k}"]["std"] for k in ks],
                label=NAMES.get(m, m), marker="o", ms=3, capsize=2,
                ls="--" if m == "base" else "-")
  ax.set_xscale("log", base=2); ax.set_xticks(ks); ax.set_xticklabels(ks)
  ax.set_xlabel("k"); ax.set_ylabel("pass@k (held-out)"); ax.legend(fontsize=7)
  tl.save_fig(fig, png)


if __name__ == "__main__":
  tl.main(__file__, run, report)
