"""One GRPO step: rlhf_jax's fused program vs TRL `GRPOTrainer` and tunix `GRPOLearner`.

All three libraries train the same random-init Llama (one set of weights written with
`rlhf_jax.models.save_hf` and loaded by each), on the same prompts, with the same group
size G, prompt length, number of new tokens (no early EOS: the end-of-sequence id lies
outside the model's vocabulary, so it is never sampled), reward, loss and optimiser. The
sizes (`SIZES`): tiny (0.9M, 1 prompt x G = 4, 16 + 32 tokens), 20m (20M, same batch) and
deep (SmolLM2-135M's architecture: hidden 576, 30 layers, 9 / 3 heads, FFN 1536, tied
vocabulary 49152; 2 prompts x G = 8, 64 + 128 tokens).

  * sampling at temperature 1, no top-k / top-p truncation;
  * GRPO group z-score advantages; PPO clipped surrogate (epsilon 0.2), one update per
    batch; token-mean aggregation (TRL `loss_type="dapo"`, tunix `loss_agg_mode="token-mean"`);
  * KL to the reference policy with the k3 estimator, beta = 0.04 (so every library runs
    a reference forward pass each step);
  * AdamW (lr 1e-5, betas 0.9/0.999, eps 1e-8, no weight decay, constant schedule) after
    clipping the gradient's global norm to 1.

A step is sample -> score -> reference log-probs -> advantages -> loss -> optimiser
update. The steady-state time is the median over `--steps` steps after `--warmup`
warm-up steps (which include JAX compilation). MFU divides the step's analytic matmul
FLOPs (sampling forward + reference forward + 3x policy forward for forward/backward,
plus causal attention) by a float32 matmul peak measured in the same run.

  python -m benchmarks.grpo_vs_peers [--peers=rlhf_jax,trl,tunix] [--sizes=tiny,20m,deep] \
      [--steps=10] [--warmup=2] [--rounds=1] [--torch-threads=1[,2]] \
      [--layouts=unrolled[,scanned]] \
      [--out=benchmarks/results/grpo_vs_peers.json]

With several torch thread counts TRL runs once per count (rows "trl/1t", "trl/2t"); compare
with the faster one.

A peer whose package is not installed is reported as "not installed" (the extra `bench`
in setup.cfg lists them); the library never needs either.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import tempfile
import time
import traceback
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.sampler import _cpu_name, matmul_peak
from rlhf_jax import models
from rlhf_jax.sampling import SamplingConfig
from rlhf_jax.train import online, optim
from rlhf_jax.train.rl_config import RLSettings

LR, BETA, EPSILON, MAX_GRAD_NORM, SEED = 1e-5, 0.04, 0.2, 1.0, 0
PAD_ID = 0


class Workload(NamedTuple):
  """One benchmark size: the Llama shape and the GRPO batch every library runs.

  The end-of-sequence id is `vocab` itself, outside the model's vocabulary, so it is never
  sampled and every completion has all `new_tokens` tokens.
  """
  arch: dict  # hidden_size, num_hidden_layers, num_attention_heads, intermediate_size, ...
  vocab: int = 1024
  num_prompts: int = 1
  group: int = 4
  prompt_len: int = 16
  new_tokens: int = 32
  tie: bool = False
  rope_theta: float = 10000.0
  rms_eps: float = 1e-6

  @property
  def eos_id(self) -> int:
    return self.vocab

  @property
  def rows(self) -> int:
    return self.num_prompts * self.group


SIZES = {
    "tiny": Workload(dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                          intermediate_size=256)),
    "20m": Workload(dict(hidden_size=512, num_hidden_layers=6, num_attention_heads=8,
                         intermediate_size=1376)),
    # SmolLM2-135M's architecture (tied embeddings, GQA 9 / 3 heads, vocabulary 49152) at
    # realistic lengths: 2 prompts x G = 8, 64 prompt + 128 new tokens.
    "deep": Workload(dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                          num_key_value_heads=3, intermediate_size=1536),
                     vocab=49152, num_prompts=2, group=8, prompt_len=64, new_tokens=128,
                     tie=True, rope_theta=100000.0, rms_eps=1e-5),
}
PEERS = ("rlhf_jax", "trl", "tunix")
# rlhf_jax's decoder layers: per-layer weights; stacked under lax.scan in the training
# passes; and also in the sampler's decode step (`SamplingConfig.scan_layers`).
LAYOUTS = ("unrolled", "scanned", "scanned_all")
LAYOUT_LABELS = {"unrolled": "rlhf_jax", "scanned": "rlhf_jax/scan",
                 "scanned_all": "rlhf_jax/scan+dec"}


def hf_config(size: str) -> dict:
  w = SIZES[size]
  arch = dict(w.arch)
  arch.setdefault("num_key_value_heads", arch["num_attention_heads"])
  return dict(model_type="llama", vocab_size=w.vocab, max_position_embeddings=512,
              rms_norm_eps=w.rms_eps, rope_theta=w.rope_theta, tie_word_embeddings=w.tie,
              hidden_act="silu", bos_token_id=None, eos_token_id=None, pad_token_id=PAD_ID,
              **arch)


def forward_flops(hf: dict, seq_len: int) -> float:
  """Matmul FLOPs of one causal forward over `seq_len` tokens (2 per MAC, with LM head)."""
  d, f, layers = hf["hidden_size"], hf["intermediate_size"], hf["num_hidden_layers"]
  kv = d * hf.get("num_key_value_heads", hf["num_attention_heads"]) // hf["num_attention_heads"]
  per_token = 2 * layers * (2 * d * d + 2 * d * kv + 3 * d * f) + 2 * d * hf["vocab_size"]
  attn = sum(4 * layers * d * (i + 1) for i in range(seq_len))  # q.k and p.v over the prefix
  return per_token * seq_len + attn


def step_flops(size: str) -> float:
  """One GRPO step: sampling (prefill + decode) + reference forward + policy fwd/bwd (3x)."""
  w, hf = SIZES[size], hf_config(size)
  seq = w.prompt_len + w.new_tokens
  return w.rows * (forward_flops(hf, seq - 1) + 4 * forward_flops(hf, seq))


def sampling_config(size: str) -> SamplingConfig:
  """The benchmark's sampling: G samples of `new_tokens` tokens, temperature 1, no EOS."""
  w = SIZES[size]
  return SamplingConfig(max_new_tokens=w.new_tokens, temperature=1.0, eos_ids=(),
                        pad_id=PAD_ID, num_samples=w.group)


def prompt_ids(size: str, seed: int = SEED) -> np.ndarray:
  w = SIZES[size]
  return np.random.RandomState(seed).randint(
      2, w.vocab, (w.num_prompts, w.prompt_len)).astype(np.int32)


def prompt_texts(ids: np.ndarray) -> list:
  return [" ".join(f"t{i}" for i in row) for row in ids]


def low_token_fraction_text(completions, vocab: int) -> list:
  """Reward on text: fraction of completion tokens whose id is below vocab / 2."""
  out = []
  for text in completions:
    ids = [int(w[1:]) for w in str(text).split() if w.startswith("t") and w[1:].isdigit()]
    out.append(float(np.mean([i < vocab // 2 for i in ids])) if ids else 0.0)
  return out


def low_token_fraction(vocab: int):
  """The same reward on token ids, inside the jitted step."""

  def reward(prompt_ids_, completion_ids, completion_mask, extras):
    del prompt_ids_, extras
    m = completion_mask.astype(jnp.float32)
    low = (completion_ids < vocab // 2).astype(jnp.float32)
    return jnp.sum(low * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)

  reward.__name__ = "low_token_fraction"
  return reward


def hf_tokenizer(vocab: int):
  """Word-level tokenizer: id 0 "<pad>", ids 1..V-1 "t<i>", EOS "<eos>" = V (not in the model)."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  from transformers import PreTrainedTokenizerFast  # pylint: disable=g-import-not-at-top
  words = {"<pad>": PAD_ID, **{f"t{i}": i for i in range(1, vocab)}, "<eos>": vocab}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(words, unk_token="<pad>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  tok.decoder = tokenizers.decoders.WordPiece(prefix="##", cleanup=False)  # joins with spaces
  return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                 unk_token="<pad>")


def _summary(step_times, warmup_s, extra=None) -> dict:
  return dict(status="ok", step_s=statistics.median(step_times),
              step_s_mean=statistics.fmean(step_times), step_s_min=min(step_times),
              step_times=step_times, warmup_s=warmup_s, **(extra or {}))


# ----------------------------------------------------------------------------- rlhf_jax

def run_rlhf_jax(size: str, weights_dir: str, steps: int, warmup: int, option=None) -> dict:
  """`option`: the decoder layers' layout (`LAYOUTS`; default "unrolled")."""
  layout = option if option in LAYOUTS else "unrolled"
  w = SIZES[size]
  model, params = models.load_hf(weights_dir, dtype=jnp.float32)
  settings = RLSettings(group_size=w.group, advantage="grpo", surrogate="ppo_clip",
                        surrogate_kwargs=(("epsilon_low", EPSILON),), kl_coef=BETA,
                        kl_estimator="k3", aggregation="token_mean")
  sc = dataclasses.replace(sampling_config(size), scan_layers=layout == "scanned_all")
  opt = optim.make_optimizer(dict(name="adamw", learning_rate=LR, weight_decay=0.0,
                                  max_grad_norm=MAX_GRAD_NORM))
  update = online.make_update(model, [low_token_fraction(w.vocab)], opt, settings, sc)
  state = online.init_state(params, opt, jax.random.PRNGKey(SEED + 1), settings,
                            unroll_layers=layout == "unrolled")
  ids = jnp.asarray(prompt_ids(size))
  batch = {"prompt_ids": ids, "prompt_mask": jnp.ones_like(ids, bool)}
  rng = jax.random.PRNGKey(SEED + 2)
  t0 = time.perf_counter()
  compiled = update.lower(state, batch, rng).compile()
  compile_s = time.perf_counter() - t0
  times = []
  for i in range(warmup + steps):  # the step folds state.step into rng: new samples each step
    t0 = time.perf_counter()
    state, metrics = compiled(state, batch, rng)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - t0)
  m = jax.device_get(metrics)
  return _summary(times[warmup:], sum(times[:warmup]) + compile_s,
                  dict(compile_s=compile_s, tokens_per_step=float(m["num_tokens"]),
                       reward_mean=float(m["reward_mean"]), layout=layout))


# ----------------------------------------------------------------------------- TRL

def run_trl(size: str, weights_dir: str, steps: int, warmup: int, option=1) -> dict:
  """`option`: torch's intra-op thread count."""
  threads, w = int(option), SIZES[size]
  try:
    import torch  # pylint: disable=g-import-not-at-top
    import datasets  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
    from trl import GRPOConfig, GRPOTrainer  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    return dict(status="not installed", error=str(e))
  torch.set_num_threads(threads)
  torch.manual_seed(SEED)
  model = transformers.AutoModelForCausalLM.from_pretrained(weights_dir, dtype=torch.float32)
  model.generation_config.eos_token_id = w.eos_id
  model.generation_config.pad_token_id = PAD_ID
  tok = hf_tokenizer(w.vocab)
  total = warmup + steps
  data = datasets.Dataset.from_dict({"prompt": prompt_texts(prompt_ids(size)) * total})
  stamps = {"begin": [], "end": []}

  class Timer(transformers.TrainerCallback):

    def on_step_begin(self, args, state, control, **kw):
      stamps["begin"].append(time.perf_counter())

    def on_step_end(self, args, state, control, **kw):
      stamps["end"].append(time.perf_counter())

  def reward(completions, **kw):
    del kw
    return low_token_fraction_text(completions, w.vocab)

  with tempfile.TemporaryDirectory() as out:
    cfg = GRPOConfig(
        output_dir=out, use_cpu=True, bf16=False, fp16=False, seed=SEED,
        per_device_train_batch_size=w.rows, gradient_accumulation_steps=1,
        num_generations=w.group, generation_batch_size=w.rows,
        max_completion_length=w.new_tokens, temperature=1.0, top_p=1.0, top_k=0,
        num_iterations=1, beta=BETA, epsilon=EPSILON, loss_type="dapo", scale_rewards="group",
        learning_rate=LR, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999,
        adam_epsilon=1e-8, max_grad_norm=MAX_GRAD_NORM, lr_scheduler_type="constant",
        warmup_steps=0, max_steps=total, logging_steps=10 ** 6, save_strategy="no",
        report_to="none", disable_tqdm=True, shuffle_dataset=False, log_completions=False,
        dataloader_num_workers=0)
    trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=cfg, train_dataset=data,
                          processing_class=tok, callbacks=[Timer()])
    trainer.train()
  times = [e - b for b, e in zip(stamps["begin"], stamps["end"])]
  return _summary(times[warmup:], sum(times[:warmup]), dict(torch=torch.__version__))


# ----------------------------------------------------------------------------- tunix

def run_tunix(size: str, weights_dir: str, steps: int, warmup: int, option=None) -> dict:
  del option  # XLA's own CPU thread pool
  w = SIZES[size]
  try:
    import optax  # pylint: disable=g-import-not-at-top
    from tunix.models.llama3 import model as llama_lib  # pylint: disable=g-import-not-at-top
    from tunix.models.llama3 import params as llama_params  # pylint: disable=g-import-not-at-top
    from tunix.rl import rl_cluster as rl_cluster_lib  # pylint: disable=g-import-not-at-top
    from tunix.rl.grpo import grpo_learner  # pylint: disable=g-import-not-at-top
    from tunix.rl.rollout import base_rollout  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    return dict(status="not installed", error=str(e))
  hf = hf_config(size)
  d, h = hf["hidden_size"], hf["num_attention_heads"]
  cfg = llama_lib.ModelConfig(
      num_layers=hf["num_hidden_layers"], vocab_size=w.vocab, embed_dim=d,
      hidden_dim=hf["intermediate_size"], num_heads=h, head_dim=d // h,
      num_kv_heads=hf["num_key_value_heads"], rope_theta=int(hf["rope_theta"]),
      norm_eps=hf["rms_norm_eps"], weight_tying=w.tie)
  mesh = jax.make_mesh((1, 1), ("fsdp", "tp"), devices=jax.devices()[:1],
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  load = lambda: llama_params.create_model_from_safe_tensors(weights_dir, cfg, mesh,
                                                             dtype=jnp.float32)
  policy, reference = load(), load()
  total = warmup + steps
  optimizer = optax.chain(optax.clip_by_global_norm(MAX_GRAD_NORM),
                          optax.adamw(LR, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0))
  rollout = base_rollout.RolloutConfig(
      max_tokens_to_generate=w.new_tokens, max_prompt_length=w.prompt_len,
      kv_cache_size=w.prompt_len + w.new_tokens, temperature=1.0, top_p=1.0, top_k=None,
      eos_tokens=[w.eos_id], seed=SEED)
  role = rl_cluster_lib.Role
  cluster_cfg = rl_cluster_lib.ClusterConfig(
      role_to_mesh={role.ACTOR: mesh, role.REFERENCE: mesh, role.ROLLOUT: mesh},
      rollout_engine="vanilla", offload_to_cpu=False,
      training_config=rl_cluster_lib.RLTrainingConfig(
          actor_optimizer=optimizer, eval_every_n_steps=10 ** 6, max_steps=total),
      rollout_config=rollout)
  cluster = rl_cluster_lib.RLCluster(actor=policy, reference=reference, tokenizer=hf_tokenizer(w.vocab),
                                     cluster_config=cluster_cfg)
  kl = dict(kl_loss_mode="low_var_kl")  # k3; 0.1.5 has no such field and always uses k3
  if "kl_loss_mode" not in {f.name for f in dataclasses.fields(grpo_learner.GRPOConfig)}:
    kl = {}
  algo = grpo_learner.GRPOConfig(num_generations=w.group, num_iterations=1, beta=BETA,
                                 epsilon=EPSILON, loss_agg_mode="token-mean", **kl)

  def reward(prompts, completions, **kw):
    del prompts, kw
    return low_token_fraction_text(completions, w.vocab)

  learner = grpo_learner.GRPOLearner(rl_cluster=cluster, algo_config=algo, reward_fns=[reward])
  stamps = []
  texts = prompt_texts(prompt_ids(size))

  def data():
    for i in range(total):
      cluster.cluster_config.rollout_config.seed = SEED + i  # a fresh rollout key per step
      stamps.append(time.perf_counter())
      yield {"prompts": np.array(texts)}

  learner.train(data())
  jax.block_until_ready(jax.tree.leaves(cluster.actor_trainer.model))
  stamps.append(time.perf_counter())
  times = list(np.diff(stamps))
  return _summary(times[warmup:], sum(times[:warmup]))


RUNNERS = {"rlhf_jax": run_rlhf_jax, "trl": run_trl, "tunix": run_tunix}


def _safe_run(peer, size, weights_dir, steps, warmup, option) -> dict:
  try:
    return RUNNERS[peer](size, weights_dir, steps, warmup, option)
  except Exception as e:  # pylint: disable=broad-except
    traceback.print_exc()
    error = f"{type(e).__name__}: {e}"
    if peer == "trl" and "revision or a version must be specified" in str(e):
      import transformers  # pylint: disable=g-import-not-at-top
      error += (f" [transformers {transformers.__version__} does not work with the `kernels` "
                "package that trl installs: `pip install -U transformers`, or `pip uninstall "
                "kernels`]")
    return dict(status="failed", error=error)


def _versions() -> dict:
  """Installed versions of the libraries that take part (None: not installed)."""
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  out = {}
  for dist in ("jax", "flax", "optax", "torch", "transformers", "trl", "google-tunix"):
    try:
      out[dist] = metadata.version(dist)
    except metadata.PackageNotFoundError:
      out[dist] = None
  return out


def _parse_list(value: str, known, flag: str) -> list:
  items = [v.strip() for v in value.split(",") if v.strip()]
  bad = [v for v in items if v not in known]
  if bad or not items:
    raise SystemExit(f"{flag}: unknown value(s) {bad or value!r}; choose from {', '.join(known)}")
  return items


def _combine(runs: list, peak: float, ours_label: str = "rlhf_jax") -> list:
  """One row per (size, peer): step times pooled over rounds; rlhf_jax's speed-up (the row
  `ours_label`) is the median over rounds of the per-round ratio (each ratio from runs
  minutes apart)."""
  rows = []
  for size in dict.fromkeys(r["size"] for r in runs):
    ours = {r["round"]: r for r in runs
            if r["size"] == size and r["peer"] == ours_label and r["status"] == "ok"}
    for peer in dict.fromkeys(r["peer"] for r in runs if r["size"] == size):
      mine = [r for r in runs if r["size"] == size and r["peer"] == peer]
      ok = [r for r in mine if r["status"] == "ok"]
      if not ok:
        rows.append(dict(mine[0], rounds=mine))
        continue
      times = [t for r in ok for t in r["step_times"]]
      row = dict(_summary(times, statistics.median(r["warmup_s"] for r in ok)),
                 peer=peer, size=size, params=ok[0]["params"], step_flops=ok[0]["step_flops"],
                 round_medians=[r["step_s"] for r in ok])
      if "compile_s" in ok[0]:
        row["compile_s"] = statistics.median(r["compile_s"] for r in ok)
      row["mfu"] = row["step_flops"] / row["step_s"] / peak
      row["mfu_min"] = row["step_flops"] / row["step_s_min"] / peak
      ratios = [r["step_s"] / ours[r["round"]]["step_s"] for r in ok if r["round"] in ours]
      if peer != ours_label and ratios:
        row["rlhf_jax_speedup"] = statistics.median(ratios)
        row["rlhf_jax_speedup_rounds"] = ratios
        row["rlhf_jax_speedup_min"] = row["step_s_min"] / min(
            o["step_s_min"] for o in ours.values())
      rows.append(row)
  return rows


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--peers", default=",".join(PEERS), help="comma list of " + ", ".join(PEERS))
  ap.add_argument("--sizes", default=",".join(SIZES), help="comma list of " + ", ".join(SIZES))
  ap.add_argument("--steps", type=int, default=10, help="timed steps after warm-up")
  ap.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps (compilation)")
  ap.add_argument("--rounds", type=int, default=1,
                  help="run every library this many times, round-robin; speed-ups are the "
                       "median of the per-round ratios (robust to a shared machine)")
  ap.add_argument("--layouts", default="unrolled",
                  help="comma list of rlhf_jax layer layouts (" + ", ".join(LAYOUTS) + "): "
                       "per-layer weights (row rlhf_jax), stacked under lax.scan in the "
                       "training passes (rlhf_jax/scan) or also in the decode step "
                       "(rlhf_jax/scan+dec); speed-ups are against the first one listed")
  ap.add_argument("--torch-threads", default="1",
                  help="comma list of torch intra-op thread counts for TRL (each runs as its "
                       "own row; on a shared machine more threads can spin-wait: a 4x128 "
                       "linear took 23 us at 1 thread, 8.7 ms at 2)")
  ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                "grpo_vs_peers.json"))
  args = ap.parse_args()
  peers = _parse_list(args.peers, PEERS, "--peers")
  sizes = _parse_list(args.sizes, tuple(SIZES), "--sizes")
  layouts = _parse_list(args.layouts, LAYOUTS, "--layouts")
  if args.steps < 1 or args.warmup < 1 or args.rounds < 1:
    raise SystemExit("--steps, --warmup and --rounds must be >= 1")

  try:
    thread_counts = [int(t) for t in args.torch_threads.split(",") if t.strip()]
  except ValueError:
    raise SystemExit(f"--torch-threads: expected a comma list of ints, got {args.torch_threads!r}")
  if not thread_counts or min(thread_counts) < 1:
    raise SystemExit("--torch-threads: give at least one count >= 1")
  jobs = []  # (runner, row label, option: torch threads for TRL, layer layout for rlhf_jax)
  for peer in peers:
    if peer == "rlhf_jax":
      jobs += [(peer, LAYOUT_LABELS[lay], lay) for lay in layouts]
    elif peer == "trl" and len(thread_counts) > 1:
      jobs += [(peer, f"trl/{t}t", t) for t in thread_counts]
    else:
      jobs.append((peer, peer, thread_counts[0]))
  peak = max(matmul_peak(1024), matmul_peak(2048, repeats=3))
  runs = []  # one entry per (size, round, peer)
  for size in sizes:
    hf = hf_config(size)
    model = models.from_config(hf)
    params = model.init(jax.random.PRNGKey(SEED))
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    flops = step_flops(size)
    with tempfile.TemporaryDirectory() as weights_dir:
      models.save_hf(weights_dir, model, params)
      for rnd in range(args.rounds):  # round-robin: every round runs each library once
        for peer, label, threads in jobs:
          print(f"[{size}] round {rnd + 1}/{args.rounds} {label} ...", flush=True)
          r = _safe_run(peer, size, weights_dir, args.steps, args.warmup, threads)
          r.update(peer=label, size=size, round=rnd, params=n_params, step_flops=flops)
          if r["status"] == "ok":
            print(f"[{size}] {peer}: {r['step_s']:.4f} s/step (median of {args.steps}), "
                  f"warm-up {r['warmup_s']:.1f} s", flush=True)
          else:
            print(f"[{size}] {peer}: {r['status']} ({r.get('error', '')})", flush=True)
          runs.append(r)
  peak = max(peak, matmul_peak(1024))  # re-measured: the machine may be shared
  ours_label = next((label for peer, label, _ in jobs if peer == "rlhf_jax"), "rlhf_jax")
  rows = _combine(runs, peak, ours_label)

  print(f"\nfloat32 matmul peak (JAX, best of 1024^3 / 2048^3): {peak / 1e9:.1f} GFLOP/s")
  for size in sizes:
    w = SIZES[size]
    print(f"{size}: {w.num_prompts} prompt(s) x G={w.group}, prompt {w.prompt_len} + "
          f"{w.new_tokens} new tokens, vocab {w.vocab}{' (tied)' if w.tie else ''}")
  print(f"beta={BETA}, AdamW lr={LR}; {args.steps} timed steps after "
        f"{args.warmup} warm-up, x {args.rounds} round(s); s/step = median of all timed steps, "
        f"rlhf_jax x = median of the per-round ratios against {ours_label}, x (min) = ratio "
        f"of the fastest steps")
  print(f"{'size':5} {'params':>7} {'peer':17} {'s/step':>8} {'min':>8} {'warm-up s':>9} "
        f"{'compile s':>9} {'GFLOP/step':>10} {'MFU':>6} {'MFU min':>7} {'rlhf_jax x':>10} "
        f"{'x (min)':>8}")
  for r in rows:
    if r["status"] != "ok":
      print(f"{r['size']:5} {r['params'] / 1e6:6.2f}M {r['peer']:17} {r['status']}")
      continue
    comp = f"{r['compile_s']:9.2f}" if "compile_s" in r else f"{'-':>9}"
    sp = f"{r['rlhf_jax_speedup']:9.2f}x" if "rlhf_jax_speedup" in r else f"{'-':>10}"
    spm = f"{r['rlhf_jax_speedup_min']:7.2f}x" if "rlhf_jax_speedup" in r else f"{'-':>8}"
    print(f"{r['size']:5} {r['params'] / 1e6:6.2f}M {r['peer']:17} {r['step_s']:8.4f} "
          f"{r['step_s_min']:8.4f} {r['warmup_s']:9.2f} {comp} {r['step_flops'] / 1e9:10.2f} "
          f"{100 * r['mfu']:5.1f}% {100 * r['mfu_min']:6.1f}% {sp} {spm}")
  for r in rows:
    if len(r.get("rlhf_jax_speedup_rounds", ())) > 1:
      each = ", ".join(f"{x:.2f}" for x in r["rlhf_jax_speedup_rounds"])
      print(f"{r['size']} {r['peer']}: per-round rlhf_jax speed-up {each}")
  meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              cpu=_cpu_name(), cores=os.cpu_count(), load_avg=os.getloadavg(),
              jax=jax.__version__, matmul_peak_flop_s=peak,
              workloads={size: dict(SIZES[size]._asdict()) for size in sizes},
              layouts=layouts, versions=_versions(), beta=BETA, lr=LR, epsilon=EPSILON, steps=args.steps, warmup=args.warmup,
              torch_threads=thread_counts, rounds=args.rounds)
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as fh:
    json.dump(dict(meta=meta, rows=rows, runs=runs), fh, indent=2, default=float)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
