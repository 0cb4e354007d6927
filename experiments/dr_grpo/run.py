"""Dr. GRPO vs GRPO: the length of wrong responses under per-sequence normalisation.

GRPO ("DeepSeekMath", Shao et al., 2024) averages each sequence's token losses
(1/|o_i|) Σ_t and divides advantages by the group std; Dr. GRPO ("Understanding
R1-Zero-Like Training: A Critical Perspective", Liu et al., 2025) drops both: A_i =
r_i − mean_G r and Σ_{i,t} / (G·L_max). With 1/|o_i|, a wrong (A < 0) response's
tokens are pushed down less the longer it is, so long wrong responses are the
cheapest to keep.

Set-up: the demo's tiny Llama on 2-digit addition with room for long responses
(`max_new_tokens` 16). The SFT targets carry a uniform 0..`filler_max` neutral
filler tokens (".") after the answer ("42...", or before it with
`filler_position=before`); the reward (`exact_match` with `ignore="."`) grades the
number alone, so the filler count is free and only the aggregation's 1/|o_i| can
make it depend on correctness. One SFT per seed is shared by both methods; then RL
with each. Logged per RL step (from the sampled batch): `wrong_response_length`
(mean length of samples with reward ≤ 0.5), `correct_response_length`, `reward_mean`.
"""

from __future__ import annotations

import time

import numpy as np

from experiments import _toylib as tl
from experiments._toylib import online_rl as orl

KEYS = ("wrong_response_length", "correct_response_length", "reward_mean", "response_length")
METHODS = {"grpo": "GRPO (grpo + seq_mean_token_mean)",
           "dr_grpo": "Dr. GRPO (dr_grpo + seq_mean_token_sum_norm)"}


def filler_sft_targets(cfg):
  """SFT targets with a uniform 0..`filler_max` filler tokens after (or before) the answer."""
  def rewrite(examples, rng):
    out = []
    for e in examples:
      pad = cfg.filler * int(rng.integers(0, cfg.filler_max + 1))
      text = e["answer"] + pad if cfg.filler_position == "after" else pad + e["answer"]
      out.append(dict(e, completion=text))
    return out
  return rewrite


def run(cfg):
  t0 = time.time()
  env = orl.make_env(cfg.online)
  methods = {m: orl.make_method(env, cfg.methods[m]) for m in cfg.methods}
  curves = {m: {k: [] for k in KEYS} for m in methods}
  for seed in range(cfg.first_seed, cfg.first_seed + cfg.seeds):
    params, train_ex, _ = orl.warm_start(env, seed, filler_sft_targets(cfg))
    for m, method in methods.items():
      _, hist = orl.run_rl(env, method, params, train_ex, seed)
      for k in KEYS:
        curves[m][k].append([h[k] for h in hist])
  w = cfg.window
  res = {"steps": list(range(1, cfg.steps + 1)), "seeds": cfg.seeds, "methods": {}}
  for m, c in curves.items():
    arr = {k: np.asarray(v) for k, v in c.items()}  # [seeds, steps]
    wrong = arr["wrong_response_length"]
    start, end = wrong[:, :w].mean(1), wrong[:, -w:].mean(1)
    right = arr["correct_response_length"]
    gap = wrong - right  # (a step without right or wrong samples logs 0 for that length)
    res["methods"][m] = {
        "wrong_len_start": tl.mean_std(start), "wrong_len_end": tl.mean_std(end),
        "wrong_len_change": tl.mean_std(end - start),
        "correct_len_start": tl.mean_std(right[:, :w].mean(1)),
        "correct_len_end": tl.mean_std(right[:, -w:].mean(1)),
        "correct_len_change": tl.mean_std(right[:, -w:].mean(1) - right[:, :w].mean(1)),
        "gap_start": tl.mean_std(gap[:, :w].mean(1)), "gap_end": tl.mean_std(gap[:, -w:].mean(1)),
        "wrong_len_end_per_seed": end.tolist(),
        "reward_start": tl.mean_std(arr["reward_mean"][:, :w].mean(1)),
        "reward_end": tl.mean_std(arr["reward_mean"][:, -w:].mean(1)),
        "curves": {k: {"mean": v.mean(0), "std": v.std(0)} for k, v in arr.items()},
    }
  wl = {m: np.asarray(c["wrong_response_length"])[:, -w:].mean(1) for m, c in curves.items()}
  res["wrong_len_end_grpo_minus_dr_grpo"] = tl.mean_std(wl["grpo"] - wl["dr_grpo"])
  res["seconds"] = time.time() - t0
  return res


def report(res, cfg, png):
  w = cfg.window
  tl.print_table(
      ["method", f"wrong len (first {w})", f"wrong len (last {w})", "wrong change",
       "correct change", f"wrong − correct (first → last {w})", "reward first→last"],
      [[METHODS[m], tl.fmt(v["wrong_len_start"], 2), tl.fmt(v["wrong_len_end"], 2),
        tl.fmt(v["wrong_len_change"], 2), tl.fmt(v["correct_len_change"], 2),
        f"{tl.fmt(v['gap_start'], 2)} → {tl.fmt(v['gap_end'], 2)}",
        f"{v['reward_start']['mean']:.2f} → {v['reward_end']['mean']:.2f}"]
       for m, v in res["methods"].items()])
  print("wrong length at the end, GRPO − Dr. GRPO (paired by seed): "
        + tl.fmt(res["wrong_len_end_grpo_minus_dr_grpo"], 2))
  print(f"{res['seeds']} seeds, {cfg.steps} RL steps; {res['seconds']:.0f}s")
  plt = tl.pyplot()
  fig, ax = plt.subplots(figsize=(5, 3.2))
  smooth = lambda x: np.convolve(x, np.ones(w) / w, mode="valid")  # noqa: E731
  for m, v in res["methods"].items():
    col = {"grpo": "C3", "dr_grpo": "C0"}.get(m, "C2")
    steps = res["steps"][w - 1:]
    ax.plot(steps, smooth(v["curves"]["wrong_response_length"]["mean"]), col, label=f"{m}: wrong")
    ax.plot(steps, smooth(v["curves"]["correct_response_length"]["mean"]), col + "--",
            label=f"{m}: correct")
  ax.set_xlabel("RL step"); ax.set_ylabel(f"response length (tokens, {w}-step mean)")
  ax.legend(fontsize=7)
  tl.save_fig(fig, png)


if __name__ == "__main__":
  tl.main(__file__, run, report)
