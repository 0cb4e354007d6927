"""Guess the number: GiGPO (step-level anchor groups) vs trajectory-level GRPO.

The model looks for a hidden number in [1, 8]; after each guess the environment
(`rlhf_jax.envs.guess_number`, JAX, inside the compiled step) answers "higher", "lower" or
"correct". Finding it on turn t (0-based) scores max(0, 1 − 0.2·t), so fewer turns are
worth more; 4 turns at most. A tiny Llama is warmed up on demonstrations that guess
uniformly inside the interval still consistent with the answers (valid, not optimal:
3.12 guesses on average, 84% found within 4 turns, where bisection needs 2.625), then
trained with the fused online step (`online.make_update` with the environment) under
each advantage at the same step budget, from the same warm start. Seeds run together:
their states are stacked and one `jit(vmap(update))` steps them all
(`rlhf_jax.train.seeds`, what `config.seeds` does in the online loop).

GiGPO: Group-in-Group Policy Optimization (Feng et al., 2025). Evaluation on held-out
episodes (fresh keys; every target 1..8): one greedy episode per target, and
`eval_samples` episodes per target at temperature 1; success rate and the mean number of
turns (an episode that never finds the number counts max_turns).
"""

from __future__ import annotations

import time
from typing import Any, Dict, List, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from experiments import _toylib as tl
from experiments._toylib.online_rl import _NullWriter
from rlhf_jax import envs
from rlhf_jax import models as models_lib
from rlhf_jax.data.tokenizer import CharTokenizer
from rlhf_jax.sampling.config import SamplingConfig
from rlhf_jax.train import multiturn, online, online_setup, optim, phases
from rlhf_jax.train import seeds as seeds_lib
from rlhf_jax.train.rl_config import RLSettings

NAMES = {"sft": "SFT model (before RL)", "grpo": "GRPO (trajectory)", "gigpo": "GiGPO (step groups)",
         "gigpo_gamma1": "GiGPO (step groups, γ = 1)", "igpo": "IGPO (information gain)"}


class Setup(NamedTuple):
  """What every seed and method shares."""
  cfg: Any
  tok: Any
  model: Any
  env: Any
  spec: Any


def make_setup(cfg) -> Setup:
  tok = CharTokenizer()
  model = models_lib.from_config(dict(cfg.model.hf_config, vocab_size=tok.vocab_size))
  env, spec = envs.make(tokenizer=tok, **dict(cfg.env))
  return Setup(cfg, tok, model, env, spec)


def demonstration(target: int, max_value: int, max_turns: int, rng) -> str | None:
  """Guesses drawn uniformly from the interval still consistent with the answers, with
  the environment's answers; None when the number is not found within `max_turns`."""
  lo, hi, text = 1, max_value, ""
  for _ in range(max_turns):
    g = int(rng.integers(lo, hi + 1))
    text += f"{g}\n"
    if g == target:
      return text + "correct\n"
    text += "higher\n" if g < target else "lower\n"
    lo, hi = (g + 1, hi) if g < target else (lo, g - 1)
  return None


def demonstrations(cfg, n: int, seed: int) -> List[Dict[str, str]]:
  rng = np.random.default_rng(seed)
  out = []
  while len(out) < n:
    d = demonstration(int(rng.integers(1, cfg.max_value + 1)), cfg.max_value, cfg.max_turns, rng)
    if d is not None:
      out.append({"prompt": cfg.prompt, "answer": d})
  return out


def prompt_batch(s: Setup, targets) -> Dict[str, np.ndarray]:
  """The prompts with their hidden numbers, and each number's digits as the ground-truth
  answer (`answer_ids` / `answer_mask`, right-padded: what IGPO's P_k scores)."""
  out = envs.prompt_batch(s.tok, [{"prompt": s.cfg.prompt, "target": int(t)} for t in targets],
                          int_keys=("target",))
  width = len(str(s.cfg.max_value))
  digits = [s.tok.encode(str(int(t))) for t in targets]
  out["answer_ids"] = np.asarray([d + [s.tok.pad_id] * (width - len(d)) for d in digits], np.int32)
  out["answer_mask"] = np.arange(width)[None, :] < np.asarray([len(d) for d in digits])[:, None]
  return out


def warm_start(s: Setup, seed: int):
  """Random init (seeded) + SFT on demonstrations."""
  cfg = s.cfg
  params = s.model.init(jax.random.PRNGKey(seed))
  if int(cfg.sft.steps) == 0:
    return params
  sft_cfg = tl.parse_arg(None)
  sft_cfg.update(dict(seed=seed, sft=dict(cfg.sft), data=dict(max_prompt_length=len(cfg.prompt)),
                      # a demonstration ends with the environment's "correct\n" and EOS
                      sampling=dict(max_new_tokens=s.spec.completion_tokens + s.spec.obs_tokens
                                    + 1)))
  records = demonstrations(cfg, 2000, seed)
  return online_setup.sft_warmup(sft_cfg, s.model, params, s.tok, records, writer=_NullWriter())


def make_method(s: Setup, rl: Dict[str, Any]):
  """(settings, optimizer, jit(vmap(update))) of one method."""
  settings = RLSettings.from_config(dict(rl))
  opt = optim.make_optimizer(dict(s.cfg.optim))
  sampling = SamplingConfig(max_new_tokens=s.spec.completion_tokens, temperature=1.0,
                            eos_ids=(s.tok.eos_id,), pad_id=s.tok.pad_id,
                            num_samples=settings.group_size)
  update = online.make_update(s.model, [multiturn.env_reward()], opt, settings, sampling,
                              env=s.env, env_spec=s.spec, jit=False)
  return settings, opt, seeds_lib.vmapped(update)


def train_batches(s: Setup, seeds: List[int]):
  """Stacked [S, B, ...] batches: per seed, B prompts with uniform hidden numbers."""
  rngs = [np.random.default_rng(10_000 + sd) for sd in seeds]
  while True:
    parts = [prompt_batch(s, r.integers(1, s.cfg.max_value + 1, s.cfg.prompts_per_step))
             for r in rngs]
    yield {k: np.stack([p[k] for p in parts]) for k in parts[0]}


def run_rl(s: Setup, method, params: List[Any], seeds: List[int], verbose: bool = False):
  """`cfg.steps` RL steps of every seed together; returns (params per seed, metrics [steps])."""
  settings, opt, update = method
  state = seeds_lib.stack([online.init_state(jax.tree.map(jnp.copy, p), opt,
                                             jax.random.fold_in(jax.random.PRNGKey(sd), 1), settings)
                           for p, sd in zip(params, seeds)])
  rng = jnp.stack([jax.random.PRNGKey(sd) for sd in seeds])
  batches = train_batches(s, seeds)
  history = []
  t0 = time.time()
  for step in range(int(s.cfg.steps)):
    state, m = update(state, {k: jnp.asarray(v) for k, v in next(batches).items()}, rng)
    history.append({k: np.asarray(v) for k, v in jax.device_get(m).items()})
    if verbose and (step + 1) % 10 == 0:
      print(f"  step {step + 1}: reward {history[-1]['env_reward_mean'].round(3)} turns "
            f"{history[-1]['num_turns'].round(2)} ({time.time() - t0:.0f}s)", flush=True)
  out = [seeds_lib.unstack(state.params, i) for i in range(len(seeds))]
  return out, history, state


def make_eval(s: Setup):
  """`evaluate(params) -> dict`: greedy and sampled held-out episodes on every target."""
  targets = np.arange(1, s.cfg.max_value + 1)
  batch = {k: jnp.asarray(v) for k, v in prompt_batch(s, targets).items()}
  n = int(s.cfg.eval_samples)

  def episodes(temperature, samples):
    cfg = SamplingConfig(max_new_tokens=1, temperature=temperature, eos_ids=(s.tok.eos_id,),
                         pad_id=s.tok.pad_id, num_samples=samples)
    return jax.jit(lambda p, rng: multiturn.rollout_multiturn(s.model, p, batch, rng, cfg, s.env,
                                                              s.spec)[1])
  greedy, sampled = episodes(0.0, 1), episodes(1.0, n)

  def stats(info, prefix):
    turns, done = np.asarray(info.num_turns, np.float64), np.asarray(info.done)
    return {f"{prefix}_success": float(done.mean()), f"{prefix}_turns": float(turns.mean()),
            f"{prefix}_turns_found": float(turns[done].mean()) if done.any() else float("nan"),
            f"{prefix}_reward": float(np.asarray(info.reward).mean())}

  def evaluate(params) -> Dict[str, float]:
    out = stats(jax.device_get(greedy(params, jax.random.PRNGKey(0))), "greedy")
    out.update(stats(jax.device_get(sampled(params, jax.random.PRNGKey(1))), "sampled"))
    return out
  return evaluate


def binary_search_turns(max_value: int) -> float:
  """Mean guesses of midpoint bisection over targets 1..max_value (the optimum)."""
  total = 0
  for t in range(1, max_value + 1):
    lo, hi, k = 1, max_value, 0
    while True:
      k += 1
      g = (lo + hi) // 2
      if g == t:
        break
      lo, hi = (g + 1, hi) if g < t else (lo, g - 1)
    total += k
  return total / max_value


def step_advantages(s: Setup, params, batch, rng):
  """GRPO's and GiGPO's per-token advantages [N, T] on the same multi-turn rollout."""
  g = s.cfg.group_size
  sampling = SamplingConfig(max_new_tokens=s.spec.completion_tokens, temperature=1.0,
                            eos_ids=(s.tok.eos_id,), pad_id=s.tok.pad_id, num_samples=g)
  ro, info = multiturn.rollout_multiturn(s.model, params, batch, rng, sampling, s.env, s.spec)
  scores = phases.Scores(rewards=info.reward, each=info.reward[:, None])
  sig = phases.Signals(ref_logps=ro.logps, kl=jnp.zeros_like(ro.logps),
                       token_rewards=jnp.zeros_like(ro.logps))
  out = {}
  for name in ("grpo", "gigpo"):
    est = phases.Estimator.build(name, {}, group_size=g, provides=multiturn.STEP_INPUTS)
    adv, _ = multiturn.estimate(est, scores, ro, sig, None, info)
    out[name] = jnp.broadcast_to(adv[:, None], ro.logps.shape) if adv.ndim == 1 else adv
    out[name] = out[name] * ro.loss_mask
  return out, info


def run(cfg) -> Dict[str, Any]:
  t0 = time.time()
  s = make_setup(cfg)
  seeds = list(range(cfg.first_seed, cfg.first_seed + cfg.seeds))
  sft = [warm_start(s, sd) for sd in seeds]
  t_sft = time.time() - t0
  evaluate = make_eval(s)
  per_seed = {"sft": [evaluate(p) for p in sft]}
  print(f"SFT ({t_sft:.0f}s):", per_seed["sft"], flush=True)
  curves, seconds = {}, {}
  for name, rl in cfg.methods.items():
    t1 = time.time()
    print(f"{name}:", flush=True)
    final, hist, _ = run_rl(s, make_method(s, rl), sft, seeds, verbose=True)
    seconds[name] = time.time() - t1
    per_seed[name] = [evaluate(p) for p in final]
    curves[name] = {k: np.stack([h[k] for h in hist]).tolist()  # [steps, seeds]
                    for k in ("env_reward_mean", "num_turns", "env_done_fraction")}
    for i, row in enumerate(per_seed[name]):
      row["train_reward_last10"] = float(np.mean(curves[name]["env_reward_mean"][-10:], 0)[i])
  res = {"seeds": seeds, "steps": int(cfg.steps), "binary_search_turns":
         binary_search_turns(cfg.max_value), "methods": {}, "curves": curves,
         "seconds": {"sft": t_sft, **seconds, "total": time.time() - t0}}
  for m, rows in per_seed.items():
    res["methods"][m] = {k: tl.mean_std([r[k] for r in rows]) for k in rows[0]}
    res["methods"][m]["per_seed"] = rows
  return res


def report(res, cfg, png):
  cols = ["greedy_success", "greedy_turns", "sampled_success", "sampled_turns",
          "sampled_turns_found"]
  tl.print_table(["method"] + cols,
                 [[NAMES.get(m, m)] + [tl.fmt(v[c], 3) for c in cols]
                  for m, v in res["methods"].items()])
  for m, v in res["methods"].items():
    print(m, "per seed:", [{c: round(r[c], 3) for c in cols} for r in v["per_seed"]])
  print(f"seeds {res['seeds']}, {res['steps']} RL steps; binary search needs "
        f"{res['binary_search_turns']:.3f} turns; {res['seconds']}")
  plt = tl.pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
  for m, c in res["curves"].items():
    for ax, key in zip(axes, ("env_reward_mean", "num_turns")):
      y = np.asarray(c[key])
      ax.plot(y.mean(1), label=NAMES.get(m, m))
      ax.fill_between(np.arange(len(y)), y.mean(1) - y.std(1), y.mean(1) + y.std(1), alpha=0.2)
      ax.set_xlabel("RL step")
      ax.set_title(key)
  axes[0].legend()
  tl.save_fig(fig, png)


if __name__ == "__main__":
  tl.main(__file__, run, report)
