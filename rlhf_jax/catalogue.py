"""The method catalogue: every Tier A/B method, the config that runs it, and its test.

    python -m rlhf_jax.catalogue            # the markdown table of docs/methods.md

Each `Entry` names a method of the catalogue (docs/methods.md), how it runs: "online" (the
fused RL step, `python -m rlhf_jax.train` with `paradigm="online"`), "offline" (the
offline loop), "experiment" (a reproduction under experiments/ with its own runner) or
None (a library function the loops do not call, with the reason), the config keys that
select it (dotted paths into the experiment config, set on top of the demo config for
online methods or the synthetic preference config for offline ones) and the registered
function that must run (`spy`: (registry, name)). `tests/test_catalogue.py` runs every
online and offline entry from its config for two steps on a tiny model and checks that
the spied function ran and the metrics are finite.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Optional, Tuple


class Entry(NamedTuple):
  method: str
  tier: str                      # "A", "B" or "5" (family 5: data and compute allocation)
  family: str
  run: Optional[str]             # "online", "offline", "experiment" or None
  config: Mapping[str, Any]      # dotted config keys -> values
  spy: Optional[Tuple[str, str]] = None   # (registry, name): "loss", "advantage", "transform", "reward"
  test: str = "tests/test_catalogue.py"
  note: str = ""
  config_file: str = ""          # the experiment config, when not the family's default

  @property
  def base(self) -> str:
    """The experiment config the overrides apply to."""
    if self.config_file:
      return self.config_file
    if self.run == "online":
      return "experiments/grpo_arithmetic.py"
    if self.run == "offline":
      return {"kto": "experiments/kto_synthetic.py"}.get(
          self.config.get("loss"), "experiments/rm_bt_synthetic.py"
          if self.family == "reward model" else "experiments/dpo_synthetic.py")
    return ""


def _pref(loss, **kw):
  """Online preference optimisation with `loss` (rl.* keys)."""
  cfg = {"rl.objective": "preference", "rl.preference_loss": loss}
  cfg.update({f"rl.{k}": v for k, v in kw.items()})
  return cfg


def _pg(**kw):
  return {f"rl.{k}": v for k, v in kw.items()}


def _off(loss, **kw):
  cfg = {"loss": loss}
  cfg.update(kw)
  return cfg


P, G, R, S = "preference", "policy gradient", "reward model", "shaping"
CATALOGUE: Tuple[Entry, ...] = (
    # 1. Preference optimisation
    Entry("DPO", "A", P, "online", _pref("dpo"), ("loss", "dpo")),
    Entry("DPO (offline)", "A", P, "offline", _off("dpo"), ("loss", "dpo")),
    Entry("cDPO", "A", P, "online", _pref("cdpo", preference_loss_kwargs={"eps": 0.1}),
          ("loss", "cdpo")),
    Entry("rDPO", "B", P, "online", _pref("rdpo", preference_loss_kwargs={"eps": 0.1}),
          ("loss", "rdpo")),
    Entry("IPO", "A", P, "online", _pref("ipo"), ("loss", "ipo")),
    Entry("RSO", "B", P, "online", _pref("hinge", pairs="rso"), ("loss", "hinge"),
          note="pairs drawn by statistical rejection sampling (`rso_sample`)"),
    Entry("PRO", "B", P, "online", _pref("pro"), ("loss", "pro"), note="listwise, group ranked by reward"),
    Entry("CPL", "B", P, "online", _pref("cpl"), ("loss", "cpl")),
    Entry("RPO", "B", P, "online", _pref("rpo"), ("loss", "rpo")),
    Entry("VPO", "B", P, "online", _pref("vpo"), ("loss", "vpo"),
          note="pessimistic sign, calibration = chosen; the optimistic form needs reference samples"),
    Entry("SimPO", "A", P, "online", _pref("simpo"), ("loss", "simpo")),
    Entry("ORPO", "A", P, "online", _pref("orpo"), ("loss", "orpo")),
    Entry("KTO", "A", P, "offline", _off("kto"), ("loss", "kto"),
          note="unpaired records (label per completion)"),
    Entry("CoPG", "B", P, "online", _pref("copg"), ("loss", "copg"),
          note="the pair's two rewards from the score phase"),
    Entry("DNO", "B", P, "online", _pref("dno", ref_update_every=1), ("loss", "dno"),
          note="reference = previous iterate (`rl.ref_update_every`)"),
    Entry("INPO", "B", P, "online", _pref("inpo", iterate_every=1), ("loss", "inpo"),
          note="kept iterate π_t (`rl.iterate_every`)"),
    Entry("Nash-MD", "B", P, "online", _pref("nash_md", mixture_beta=0.125), ("loss", "nash_md"),
          note="opponents sampled from the geometric mixture π^(1−β) π_ref^β in the sampler"),
    Entry("Nash-MP", "B", P, "experiment", {}, None, "tests/test_nash_tabular.py",
          "tabular Nash Mirror Prox (`losses.nash_tabular`); experiments/nash_md_mp"),
    Entry("SPO (self-play)", "B", P, "online", {"reward_shaping": ("spo_win_rate",)},
          ("transform", "spo_win_rate"), note="win-rate rewards, then any policy gradient"),
    Entry("SSPO", "B", P, "offline",
          _off("sspo", **{"data.degrees": {"max_removed": 2, "key": "a"}}), ("loss", "sspo"),
          note="variants of the chosen response with k key parts removed; the policy's "
               "logits at the class tokens classify k (tests/test_degrees.py)"),
    Entry("OSP", "B", P, "online", _pref("osp"), ("loss", "osp"),
          note="strength σ((r_w − r_l)/T) from the reward gap"),
    Entry("T-REG", "B", P, "online",
          _pref("treg", token_reward_prompts=("good: ", "bad: ")), ("loss", "treg"),
          note="token rewards σ(log π(y_t|better + x) − log π(y_t|worse + x)) − ½ from "
          "rl.token_reward_prompts"),
    Entry("GRAO", "B", P, "online", _pref("grao"), ("loss", "grao"),
          note="the prompt's reference answer (+ EOS) scored and its policy log-prob"),
    Entry("TRPA", "B", P, "online", _pref("trpa"), ("loss", "trpa"),
          note="levels = distinct rewards in the group"),
    Entry("POWER-DL", "B", P, "online", _pref("power_dl"), ("loss", "power_dl")),
    Entry("RA-DPO", "B", P, "offline",
          _off("dpo", **{"data.relabel": "ra_dpo", "data.max_prompt_length": 24,
                         "data.max_length": 36}),
          ("loss", "ra_dpo_relabel"),
          note="each scored pair becomes two pairs conditioned on a goal score before the "
               "prompt (data.goal_template), then DPO (tests/test_relabel.py)"),
    # 2. Policy gradient and advantage estimators
    Entry("PPO (GAE, value model)", "A", G, "online",
          dict(_pg(advantage="gae", kl_in_reward=True), value={"optim": None}), ("advantage", "gae")),
    Entry("GRPO", "A", G, "online", _pg(advantage="grpo"), ("advantage", "grpo")),
    Entry("Dr. GRPO", "A", G, "online", _pg(advantage="dr_grpo", aggregation="seq_mean_token_sum_norm"),
          ("advantage", "dr_grpo")),
    Entry("DAPO", "A", G, "online",
          _pg(surrogate_kwargs={"epsilon_low": 0.2, "epsilon_high": 0.28}, dynamic_sampling=2,
              aggregation="token_mean"), ("loss", "ppo_clip"),
          note="clip-higher + dynamic sampling + token mean; overlong shaping: rewards `overlong`"),
    Entry("RLOO", "A", G, "online", _pg(advantage="rloo"), ("advantage", "rloo")),
    Entry("REINFORCE++", "A", G, "online", _pg(advantage="reinforce_pp"),
          ("advantage", "reinforce_pp")),
    Entry("ReMax", "A", G, "online", _pg(advantage="remax"), ("advantage", "remax")),
    Entry("GSPO", "A", G, "online", _pg(surrogate="gspo"), ("loss", "gspo")),
    Entry("BNPO", "B", G, "online", _pg(advantage="bnpo"), ("advantage", "bnpo")),
    Entry("GDPO", "B", G, "online", dict(_pg(advantage="gdpo"), rewards=("exact_match", "terminated")),
          ("advantage", "gdpo"),
          note="one group normalisation per reward"),
    Entry("TOPR", "B", G, "online", _pg(surrogate="topr"), ("loss", "topr")),
    Entry("REC", "B", G, "online", _pg(advantage="rec", surrogate="reinforce"), ("advantage", "rec")),
    Entry("OPMD", "B", G, "online", _pg(advantage="rec", surrogate="opmd"), ("loss", "opmd")),
    Entry("AsymRE", "B", G, "online", _pg(advantage="asymre", surrogate="reinforce"),
          ("advantage", "asymre")),
    Entry("NSR", "B", G, "online", _pg(advantage="nsr"), ("advantage", "nsr")),
    Entry("PSR", "B", G, "online", _pg(advantage="psr"), ("advantage", "psr")),
    Entry("W-REINFORCE", "B", G, "online", _pg(advantage="w_reinforce"),
          ("advantage", "w_reinforce")),
    Entry("ROVER", "B", G, "online", _pg(advantage="rover", surrogate="rover", epochs=2),
          ("loss", "rover"),
          note="targets use mean_vocab(log π_θ − log π_old) of the learn phase's logits "
               "(tests/test_rover.py)"),
    Entry("ADORA", "B", G, "online", _pg(advantage="adora"), ("advantage", "adora")),
    Entry("THR", "B", G, "online", _pg(advantage="grpo_thr", advantage_kwargs={"p": 0.1}),
          ("advantage", "grpo_thr"),
          note="THR_t = A·⟨∇_W ℓ_t, Σ_correct ∇_W ℓ⟩ through the LM head, from the sampling "
               "policy in the signals phase; A_t = A(1 + p·sign THR_t) (tests/test_thr.py)"),
    Entry("COPO", "B", G, "online", _pg(advantage="copo"), ("advantage", "copo"),
          note="blended advantage (1 − w)·A_g + w·A_local; answers = completions"),
    Entry("GiGPO", "B", G, "experiment", {}, ("advantage", "gigpo"), "tests/test_exp_guess_number.py",
          "multi-turn: config.env + rl.advantage=gigpo; experiments/guess_number (docs/agentic.md)"),
    Entry("IGPO", "B", G, "online", _pg(advantage="igpo"), ("advantage", "igpo"),
          note="multi-turn: information gain of each turn (`multiturn.answer_probs`)",
          config_file="experiments/agentic_calculator.py"),
    Entry("B-Coder", "B", G, "online", dict(_pg(surrogate="bcoder"), value={"optim": None}),
          ("loss", "bcoder"),
          note="Q = α(ℓ − max ℓ) + V from the policy's logits and the value model; the "
               "reference is the frozen LM of the conservative target (tests/test_bcoder_step.py)"),
    Entry("CISPO", "B", G, "online", _pg(surrogate="cispo"), ("loss", "cispo")),
    Entry("SAPO", "B", G, "online", _pg(surrogate="sapo"), ("loss", "sapo")),
    # 3. Reward models
    Entry("Bradley-Terry RM", "A", R, "offline", _off("bt"), ("loss", "bt")),
    Entry("Margin / label smoothing RM", "B", R, "offline",
          _off("bt_margin", loss_kwargs={"margin": 0.5, "label_smoothing": 0.1}),
          ("loss", "bt_margin")),
    Entry("HelpSteer2-Pref", "B", R, "offline",
          _off("bt_regression", loss_kwargs={"regression_coef": 0.5}),
          ("loss", "bt_regression"), note="regression targets: the records' chosen_reward / "
          "rejected_reward scores"),
    Entry("ArmoRM", "B", R, "offline",
          _off("bt", rm_head={"name": "armorm", "num_objectives": 3,
                                              "gate_hidden": (8,)}), ("loss", "bt")),
    Entry("GPM", "B", R, "offline",
          _off("gpm", rm_head={"name": "gpm", "num_blocks": 2}), ("loss", "gpm")),
    Entry("HL-Gauss", "B", R, "offline",
          _off("hl_gauss", rm_head={"name": "hl_gauss", "num_bins": 8},
               loss_kwargs={"v_min": -3.0, "v_max": 8.0}), ("loss", "hl_gauss")),
    Entry("Regret preference model", "B", R, "experiment", {}, ("loss", "regret_preference"),
          "tests/test_exp_regret_preference.py", "gridworld reproduction"),
    Entry("STARC", "B", R, "experiment", {}, None, "tests/test_exp_starc.py",
          "reward distances: experiments/starc"),
    Entry("VPL", "B", R, "offline",
          {"loss": "vpl", "rm_head": {"name": "vpl", "latent_dim": 4},
           "task.user_targets": "ab"}, ("loss", "vpl"),
          note="records carry user_id; a user's pairs in the batch are the encoder's context "
               "(tests/test_vpl_head.py)"),
    Entry("MaxMin-RLHF", "B", R, "experiment", {}, ("loss", "maxmin_em"),
          "tests/test_exp_maxmin_rlhf.py", "EM mixture: experiments/maxmin_rlhf"),
    Entry("RM ensembles WCO / UWO", "B", R, "online",
          {"rewards": ("exact_match", "terminated"),
           "reward_shaping": ({"name": "ensemble", "mode": "uwo"},)}, ("transform", "ensemble"),
          note="ensemble members as reward columns"),
    Entry("PURE", "B", R, "online", _pg(advantage="pure"), ("advantage", "pure"),
          note="process rewards = the environment's per-turn rewards; min-form returns + "
          "outcome, RLOO baselines (multi-turn)", config_file="experiments/agentic_calculator.py"),
    # 4. Reward shaping and combination
    Entry("KL in reward", "A", S, "online", _pg(kl_in_reward=True, kl_coef=0.05), None,
          note="r − β·k1 per token (`losses.kl.kl_in_reward`), adaptive β with rl.kl_target"),
    Entry("LSC", "B", S, "online", {"reward_shaping": ("lsc",)}, ("transform", "lsc")),
    Entry("PAR", "B", S, "online", {"reward_shaping": ("par",)}, ("transform", "par")),
    Entry("Constrained RLHF", "B", S, "online",
          dict(_pg(constraint_thresholds=(0.5,)), rewards=("exact_match", "terminated")), None,
          note="task reward first, then constraints"),
    Entry("Noisy-verifier correction", "B", S, "online",
          {"reward_shaping": ({"name": "noisy_verifier", "rho0": 0.1, "rho1": 0.1},)},
          ("transform", "noisy_verifier")),
    Entry("Dynamic reward weighting", "B", S, "online",
          {"rewards": ("exact_match", "terminated"),
           "reward_shaping": ({"name": "dynamic_weights"},)}, ("transform", "dynamic_weights")),
    Entry("Length / format / tool rewards", "A", S, "online",
          {"rewards": ("exact_match", {"name": "length_penalty", "coef": 0.01})},
          ("reward", "length_penalty")),
    Entry("Log-prob of reference / SAR / FLR / cosine", "B", S, "online",
          {"reward_shaping": ("reference_logprob", "sar")}, ("transform", "reference_logprob"),
          note="new reward columns from policy passes (tests/test_shaping_inputs.py); cosine "
          "similarity needs an encoder model: library only"),
    # 5. Data and compute allocation
    Entry("DAPO dynamic sampling", "5", "allocation", "online", _pg(dynamic_sampling=2), None),
    Entry("PF-PPO", "5", "allocation", "online", _pg(sample_filter={"num_best": 1, "num_worst": 1}),
          None, note="policy filtration as a phase: only the kept samples train "
          "(tests/test_pf_ppo.py)"),
    Entry("Reinforce-Ada", "5", "allocation", "online",
          _pg(advantage="reinforce_ada", adaptive_sampling={"rounds": 2}),
          ("advantage", "reinforce_ada"),
          note="rounds of G samples drawn at once, each prompt's used rounds and balanced "
          "G kept at a fixed shape (tests/test_reinforce_ada.py)"),
    Entry("Knapsack RL", "5", "allocation", "online",
          _pg(advantage="grpo_ragged", knapsack={"min_samples": 2}),
          ("advantage", "grpo_ragged"),
          note="the B·G samples split among the prompts by value(N, p) on each record's last "
               "success rate (`state.alloc_state`); ragged groups at a fixed shape "
               "(tests/test_knapsack_step.py)"),
)


def runnable(entry: Entry) -> bool:
  return entry.run in ("online", "offline", "experiment")


def snippet(entry: Entry) -> str:
  """The command-line flags that run the entry with `python -m rlhf_jax.train`."""
  if entry.run not in ("online", "offline"):
    return ""
  flags = [f"--config.{k}={v}" for k, v in overrides(entry)]
  flags = [f'"{f}"' if any(c in f for c in " '{(") else f for f in flags]
  return " ".join([f"--config={entry.base}"] + flags)


def overrides(entry: Entry):
  """`(dotted key, text)` pairs as the command line gives them (`config_utils.apply_overrides`)."""
  return [(k, v if isinstance(v, str) else repr(v)) for k, v in entry.config.items()]


def markdown() -> str:
  rows = ["| method | tier | runs | `python -m rlhf_jax.train` flags | test | notes |",
          "|---|---|---|---|---|---|"]
  for e in CATALOGUE:
    cfg = snippet(e)
    rows.append(f"| {e.method} | {e.tier} | {e.run or 'library'} | "
                f"{'`' + cfg + '`' if cfg else ''} | {e.test} | {e.note} |")
  counts = count()
  rows.append("")
  rows.append(f"Runnable from a config: {counts['runnable']} of {counts['total']} Tier A/B "
              f"entries; family 5: {counts['family5_runnable']} of {counts['family5']}.")
  return "\n".join(rows)


def count() -> dict:
  ab = [e for e in CATALOGUE if e.tier in ("A", "B")]
  f5 = [e for e in CATALOGUE if e.tier == "5"]
  return {"total": len(ab), "runnable": sum(runnable(e) for e in ab),
          "family5": len(f5), "family5_runnable": sum(runnable(e) for e in f5)}


if __name__ == "__main__":
  print(markdown())
