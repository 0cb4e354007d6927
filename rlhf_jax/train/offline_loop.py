"""The offline loop: SFT, preference optimisation or reward-model training from a config.

`train(config) -> summary`. Data comes from `config.data.source`:
- "synthetic": `config.task` (e.g. the preference task with a known reward; the eval
  pairs are generated without label noise, so eval accuracies are against true labels);
- "jsonl": `config.data.path` (and optional `config.data.eval_path`; default: the first
  10% of the training records), `config.data.format`, `config.data.skip_invalid`;
- "tfds": `config.data.name` / `split` / `eval_split` via `tfds.data_source`, with
  `config.data.fields` mapping record fields to TFDS features (e.g.
  `{"prompt": "question", "completion": "answer"}`).
`config.rm_head` (reward_model only) selects an ensemble / ArmoRM / GPM / HL-Gauss head
(`offline_heads`).
A listwise preference loss (PRO, TRPA) trains on ranked records ({"prompt", "responses":
[best, ..., worst]}, per-response fields such as "levels" via `config.data.passthrough`,
K = `config.data.num_responses`) or on pairs as lists of two.
A preference loss with an unpaired signature (KTO) trains on unpaired batches: pairs
are split into (prompt, chosen, True) and (prompt, rejected, False) records, or "kto"
JSONL records are used as they are. `config.precompute_ref=True` computes the
reference log-probs of every train and eval example once, saves them to
`<workdir>/ref_logps_*.safetensors` and feeds them through the batch (the reference
parameters are then not kept in the training state).
The per-step work is the jitted `offline.make_step`; evaluation, checkpoints,
resume and preemption are handled here and by `runner.Runner`. Every config, model and
data error (including sequences longer than the model's positions, fewer records than
one train or eval batch, a batch that does not divide over `config.mesh`) is raised
before anything is written to `config.workdir`.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from typing import Any, Dict

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import losses as losses_lib
from rlhf_jax import sharding as sharding_lib
from rlhf_jax.data import batching
from rlhf_jax.train import config_schema
from rlhf_jax.train.placement import check_batch_size, fetch, host_arrays, placement
from rlhf_jax.train import build, offline, optim
from rlhf_jax.train import offline_data as od
from rlhf_jax.train import degrees, loss_inputs, offline_heads
from rlhf_jax.train import relabel as relabel_lib
from rlhf_jax.train.metrics_io import MetricsWriter
from rlhf_jax.train.runner import Runner

SOURCES = od.SOURCES


def load_records(config):
  """(train records, eval records) from `config.data`."""
  return od.load_records(config, build_task=build.build_task)


@functools.lru_cache(maxsize=32)
def _compiled(paradigm: str, model, loss: str, loss_kwargs: str, optim_cfg: str, packed: bool,
              degree_tokens: tuple = ()):
  """Jitted (step, eval, ref_logps) shared by runs with the same settings (compiled once)."""
  loss_fn = losses_lib.get(loss) if loss else None
  kw = json.loads(loss_kwargs)
  optimizer = optim.make_optimizer(json.loads(optim_cfg))
  step = offline.make_step(paradigm, model, loss_fn, optimizer, loss_kwargs=kw, packed=packed,
                           degree_tokens=degree_tokens)
  evaluate = offline.make_eval(paradigm, model, loss_fn, loss_kwargs=kw, packed=packed,
                               degree_tokens=degree_tokens)
  ref = offline.make_ref_logps(model) if paradigm == "preference" else None
  return optimizer, step, evaluate, ref


def _check_config(config, paradigm: str) -> None:
  if paradigm not in offline.PARADIGMS:
    raise ValueError(f"config.paradigm={paradigm!r} is unknown; use one of "
                     f"{offline.PARADIGMS}")
  if paradigm != "sft" and not config.get("loss"):
    raise ValueError(f"config.loss is required for paradigm {paradigm!r}; one of "
                     f"{losses_lib.names(paradigm)}")
  if paradigm == "sft" and config.get("loss"):
    raise ValueError("config.loss is not used by paradigm 'sft' (masked NLL); leave it empty")
  if config.data.get("packing") and paradigm != "sft":
    raise ValueError("config.data.packing=True applies to paradigm 'sft' only")
  if config.get("precompute_ref") and paradigm != "preference":
    raise ValueError("config.precompute_ref=True applies to paradigm 'preference' only")
  if config.get("export_hf") and config.get("rm_head"):
    raise ValueError("config.export_hf cannot write config.rm_head models (no transformers "
                     "layout); unset one of them")
  if config.get("precompute_ref") and config.get("reference_free"):
    raise ValueError("config.precompute_ref and config.reference_free are exclusive")
  relabel_lib.check(config.data.get("relabel"), _goal_template(config), paradigm)
  degrees.check(config.data.get("degrees"), paradigm,
                _declares(config.get("loss"), "degree_logits"))
  if config.get("rm_head") or config.get("loss") == "vpl":
    offline_heads.check_config(od.plain(config.get("rm_head")), config.get("loss") or "")


def _goal_template(config) -> str:
  return config.data.get("goal_template") or relabel_lib.GOAL_TEMPLATE


def _declares(loss, *inputs: str) -> bool:
  """Whether the registered loss `loss` declares any of `inputs` (False for no/unknown loss)."""
  if not loss or loss not in losses_lib.names():
    return False
  return bool(set(inputs) & set(loss_inputs.parameter_names(losses_lib.get(loss))))


def _declares_targets(paradigm: str, loss) -> bool:
  """A reward-model loss whose declaration takes the records' scores as regression targets."""
  return paradigm == "reward_model" and _declares(loss, "chosen_targets", "rejected_targets")


def _is_ranked(records) -> bool:
  """Whether the records are ranked response lists ({"prompt", "responses"})."""
  return len(records) > 0 and isinstance(records[0], dict) and "responses" in records[0]


def _sources(config, paradigm: str, unpaired: bool, train_records, eval_records, tok):
  """(train iterator, eval-iterator factory, train example_fn/collate) for the paradigm."""
  d = config.data
  kind = "sft" if paradigm == "sft" else ("unpaired" if unpaired else "preference")
  precompute = bool(config.get("precompute_ref"))
  if _is_ranked(train_records):
    loss = config.get("loss")
    if paradigm != "preference" or not loss or not offline.is_list_loss(losses_lib.get(loss)):
      raise ValueError(f"records with a 'responses' list need a listwise preference loss "
                       f"(e.g. 'pro', 'trpa'); got paradigm={paradigm!r}, "
                       f"loss={config.get('loss')!r}")
    kind = "list"
  passthrough = ((od.INDEX_KEY,) if precompute else ()) + tuple(d.get("passthrough") or ())
  if (od.plain(config.get("rm_head")).get("name") == "hl_gauss"
      or _declares_targets(paradigm, config.get("loss"))):
    passthrough += offline_heads.TARGET_KEYS
  if od.plain(config.get("rm_head")).get("name") == "vpl":
    passthrough += (offline_heads.USER_KEY,)
  if paradigm == "sft":
    train_records, eval_records = od.to_sft(train_records), od.to_sft(eval_records)
  train_src = od.to_unpaired(train_records) if unpaired else train_records
  if precompute:
    train_src = od.with_index(train_src)
  train_fns = od.batch_fns(kind, tok, d, passthrough=passthrough)
  deg = degrees.settings(d.get("degrees"))
  if deg:  # SSPO: the chosen response's preference-degree variants ride along
    train_src = degrees.attach(train_src, deg, int(config.seed))
    eval_records = degrees.attach(eval_records, deg, int(config.seed))
    encode = batching.make_response_encoder(
        tok, max_prompt_length=int(d.max_prompt_length), max_length=int(d.max_length),
        truncation=d.get("truncation", "error"))
    wrap = lambda fns: degrees.wrap(*fns, encode, tok.pad_id, int(d.max_length))  # noqa: E731
    train_fns = wrap(train_fns)
  seed = int(config.seed)
  pack = int(d.max_length) if d.get("packing") else None
  batches = od.iterator(train_src, *train_fns, batch_size=int(config.train.batch_size),
                        seed=seed, train=True, pack_max_length=pack, pad_id=tok.pad_id)
  eval_kind = "sft" if paradigm == "sft" else ("list" if _is_ranked(eval_records) else
                                                "preference")
  eval_src = od.with_index(eval_records) if precompute else eval_records
  eval_fns = od.batch_fns(eval_kind, tok, d, passthrough=passthrough)
  if deg:
    eval_fns = wrap(eval_fns)
  eval_bs = int(d.get("eval_batch_size") or config.train.batch_size)
  make_eval_iter = lambda: od.iterator(eval_src, *eval_fns, batch_size=eval_bs,  # noqa: E731
                                       seed=seed, train=False)
  return batches, make_eval_iter, (train_src, train_fns), (eval_src, eval_fns, eval_bs)


def _ref_tables(config, ref_fn, ref_params, train, evals, batch_size: int):
  """Reference log-probs for the train and eval sets, cached in the workdir."""
  key = od.fingerprint(od.plain(config.model), od.plain(config.data),
                       od.plain(config.get("task")), config.get("tokenizer", "char"),
                       int(config.seed), config.get("loss"), len(train[0]), len(evals[0]))
  out = []
  run = lambda b: jax.device_get(ref_fn(ref_params, host_arrays(b)))  # noqa: E731
  for name, (src, (fn, collate)), bs in (("train", train, batch_size),
                                         ("eval", evals[:2], evals[2])):
    path = os.path.join(config.workdir, f"ref_logps_{name}_{key}.safetensors")
    out.append(od.RefTable.build(path, src, fn, collate, run, batch_size=bs))
  return out


def _train_fix(d) -> str:
  source = d.get("source", "synthetic")
  if source == "synthetic":
    return f"raise data.train_size (now {d.get('train_size')})"
  if source == "jsonl":
    return f"add records to data.path={d.get('path')!r}"
  return f"use a larger data.split of {d.get('name')!r}"


def _eval_fix(d) -> str:
  source = d.get("source", "synthetic")
  if source == "synthetic":
    return f"raise data.eval_size (now {d.get('eval_size')})"
  if source == "jsonl":
    return (f"add records to data.eval_path={d.eval_path!r}" if d.get("eval_path") else
            "set data.eval_path (without it the eval set is the first 10% of data.path)")
  return f"use a larger data.eval_split of {d.get('name')!r}"


def _check_data_sizes(config, batches, make_eval_iter, train_src, eval_src, eval_bs: int):
  """Raises ValueError (naming the keys) when the training set is smaller than one step's
  `train.batch_size` or the eval set smaller than one eval batch; with `data.precheck`
  only records that are not skipped (truncation="skip") count. Returns the precheck info."""
  d = config.data
  bs = int(config.train.batch_size)
  eval_key = "data.eval_batch_size" if d.get("eval_batch_size") else "train.batch_size"
  packed = bool(d.get("packing"))  # a packed row holds several records
  if not packed and len(train_src) < bs:
    raise ValueError(f"the training set has {len(train_src)} examples, fewer than one step's "
                     f"train.batch_size={bs}; lower train.batch_size or {_train_fix(d)}")
  if len(eval_src) < eval_bs:
    raise ValueError(f"the eval set has {len(eval_src)} records, fewer than one eval batch "
                     f"({eval_key}={eval_bs}); lower {eval_key} or {_eval_fix(d)}")
  info = {"records": len(train_src), "skipped": 0}
  if not d.get("precheck", True):
    return info
  info = batches.precheck()
  kept = info["records"] - info["skipped"]
  if not packed and kept < bs:
    raise ValueError(f"only {kept} of {info['records']} training examples fit "
                     f"data.max_length={d.max_length} (truncation={d.get('truncation')!r}), "
                     f"fewer than one step's train.batch_size={bs}; raise data.max_length, "
                     "lower train.batch_size or add records")
  ev = make_eval_iter().precheck()
  kept = ev["records"] - ev["skipped"]
  if kept < eval_bs:
    raise ValueError(f"only {kept} of {ev['records']} eval records fit data.max_length="
                     f"{d.max_length} (truncation={d.get('truncation')!r}), fewer than one "
                     f"eval batch ({eval_key}={eval_bs}); lower {eval_key} or {_eval_fix(d)}")
  return info


def evaluate(evaluate_fn, state, make_eval_iter, table=None) -> Dict[str, float]:
  """Mean of the eval metrics over one pass of the eval records (full batches)."""
  rows = []
  for batch in make_eval_iter():
    if table is not None:
      batch = table.lookup(batch)
    rows.append(fetch(evaluate_fn(state, host_arrays(batch))))
  if not rows:
    raise ValueError("the eval set is smaller than one batch; add records or lower "
                     "data.eval_batch_size")
  return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def train(config) -> Dict[str, Any]:
  """Runs the configured offline experiment; returns a summary dict."""
  config_schema.check(config, "offline")
  sharding_lib.init_distributed(config.get("distributed"))
  t_start = time.time()
  paradigm = config.paradigm
  _check_config(config, paradigm)
  tok = build.build_tokenizer(config)
  head = "reward" if paradigm == "reward_model" else "lm"
  model, params = build.build_model(config.model, tok, head=head)
  if config.data.get("max_length") is not None:
    build.check_positions(model, int(config.data.max_length), what="data.max_length",
                          fix="lower data.max_length or use a model with more positions")
  if config.get("rm_head"):
    if paradigm != "reward_model":
      raise ValueError("config.rm_head applies to paradigm 'reward_model' only")
    model = offline_heads.HeadedRewardModel.from_config(model, od.plain(config.rm_head))
    params = model.init(jax.random.PRNGKey(int(config.model.get("init_seed", 0)) + 1), params)
  loss = config.get("loss") or ""
  loss_fn = losses_lib.get(loss) if loss else None
  if loss:
    family = losses_lib.names(paradigm)
    if loss not in family:
      raise ValueError(f"config.loss={loss!r} is not a {paradigm!r} loss; use one of {family}")
  unpaired = offline.is_unpaired_loss(loss_fn)
  check_batch_size(config, "train.batch_size")
  optimizer, step_fn, eval_fn, ref_fn = _compiled(
      paradigm, model, loss, json.dumps(od.plain(config.get("loss_kwargs")), sort_keys=True),
      json.dumps(od.plain(config.optim), sort_keys=True), bool(config.data.get("packing")),
      degrees.class_ids(tok, degrees.settings(config.data.get("degrees")).get("class_tokens", ())))
  precompute = bool(config.get("precompute_ref"))
  keep_ref = paradigm == "preference" and not config.get("reference_free", False)
  train_records, eval_records = load_records(config)
  if config.data.get("relabel"):  # RA-DPO: two goal-conditioned pairs per scored pair
    train_records = relabel_lib.ra_dpo(train_records, _goal_template(config), what="training")
    eval_records = relabel_lib.ra_dpo(eval_records, _goal_template(config), what="eval")
  for what, recs in (("training", train_records), ("eval", eval_records)):
    offline_heads.check_records(od.plain(config.get("rm_head")), recs, what)
  batches, make_eval_iter, train_parts, eval_parts = _sources(
      config, paradigm, unpaired, train_records, eval_records, tok)
  info = _check_data_sizes(config, batches, make_eval_iter, train_parts[0], eval_parts[0],
                           eval_parts[2])
  if info["skipped"]:
    logging.warning("%d of %d training records will be skipped (truncation=%r)",
                    info["skipped"], info["records"], config.data.get("truncation"))
  ref = jax.tree.map(jnp.copy, params) if keep_ref and not precompute else None
  state = offline.init_state(params, optimizer, ref_params=ref,
                             rng=jax.random.PRNGKey(int(config.seed)))
  put_state, put_batch, _ = placement(config, model, state, batch_key_name="train.batch_size")
  # Everything is built and checked: from here on files are written to config.workdir.
  eval_table = None
  if precompute:
    train_table, eval_table = _ref_tables(config, ref_fn, params, train_parts,
                                          eval_parts, int(config.train.batch_size))
    batches = od.WithRef(batches, train_table)
  steps = int(config.train.steps)
  eval_every = int(config.train.get("eval_every", 0) or 0)
  run = Runner(config, state, batches)
  writer = MetricsWriter(config.workdir, total_steps=steps, desc=paradigm,
                         show=("loss",), progress=config.get("progress", True))
  state = put_state(run.state)
  do_eval = lambda s: evaluate(eval_fn, s, make_eval_iter, eval_table)  # noqa: E731
  summary: Dict[str, Any] = {"start_step": run.start_step}
  if run.start_step == 0:
    summary["eval_before"] = do_eval(state)
  t_first, last_loss = None, None
  for step in range(run.start_step, steps):
    state, metrics = step_fn(state, put_batch(host_arrays(next(batches))))
    metrics = dict(fetch(metrics))
    last_loss = float(metrics["loss"])
    if t_first is None:
      t_first = time.time()
    metrics["bad_steps_in_a_row"] = int(fetch(state.guard.consecutive))
    writer.write(step + 1, metrics)
    if eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
      writer.write(step + 1, do_eval(state), prefix="eval/")
    if run.after_step(step + 1, state, metrics):
      writer.close()
      return dict(summary, stopped_at=step + 1, state=state)
  summary["eval_after"] = do_eval(state)
  writer.write(steps, summary["eval_after"], prefix="eval/")
  summary["final_train_loss"] = last_loss
  if config.get("export_hf"):
    summary["hf_model"] = build.export_hf(config, model, state.params)
  summary["plot"] = writer.plot(["loss", "eval/loss"], name="loss_curve")
  run.finish(steps, state)
  writer.close()
  summary["skipped_records"] = int(batches.get_state().get("skipped", 0))
  summary["train_seconds"] = time.time() - (t_first or time.time())
  summary["total_seconds"] = time.time() - t_start
  summary["state"] = state
  logging.info("offline %s done: %s", paradigm, summary["eval_after"])
  return summary

