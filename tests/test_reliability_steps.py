"""Step-level reliability of the loops' train steps: NaN skipping, mesh restore.

- A poisoned batch (NaN reward in the online GRPO step, NaN reference
  log-probs in the offline DPO step) is skipped: the state is unchanged except
  the step counter, the skip is counted (`skipped`, `bad_steps_in_a_row`,
  `skipped_total`), the next good step trains, and `Runner` stops with a clear
  error after `max_bad_steps` consecutive skips.
- An online state checkpointed on 1 device restores onto a 2x2x2 mesh of 8 fake
  devices with the state shardings and continues with the same results as the
  unsharded run.
"""

from __future__ import annotations

import os
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from rlhf_jax import checkpoint as ckpt_lib
from rlhf_jax import data as data_lib
from rlhf_jax import losses as losses_lib
from rlhf_jax import models
from rlhf_jax import sharding as sharding_lib
from rlhf_jax.rewards import verifiers
from rlhf_jax.sampling.config import SamplingConfig
from rlhf_jax.train import offline, online, optim, placement
from rlhf_jax.train import offline_data as od
from rlhf_jax.train.offline_config import synthetic_config, tiny_llama
from rlhf_jax.train.rl_config import RLSettings
from rlhf_jax.train.runner import Runner

HF = dict(model_type="llama", vocab_size=16, hidden_size=16, num_hidden_layers=1,
          num_attention_heads=2, num_key_value_heads=1, intermediate_size=32,
          max_position_embeddings=32, tie_word_embeddings=True)
EOS, PAD = 2, 0


def poisonable_reward(prompt_ids, completion_ids, completion_mask, extras):
  """1 for an EOS-terminated completion plus a small length term; NaN where poisoned."""
  del prompt_ids
  r = (jnp.sum(completion_mask, axis=1) * 0.1 +
       jnp.any(completion_ids == EOS, axis=1).astype(jnp.float32))
  return jnp.where(extras["poison"] > 0, jnp.nan, r)


def online_setup(**rl):
  model = models.from_config(HF)
  params = model.init(jax.random.PRNGKey(0))
  settings = RLSettings.from_config(dict(group_size=4, kl_coef=0.05, entropy_coef=0.01, **rl))
  sc = SamplingConfig(max_new_tokens=4, temperature=1.0, eos_ids=(EOS,), pad_id=PAD,
                      num_samples=4)
  opt = optim.make_optimizer(dict(learning_rate=1e-2, max_grad_norm=1.0))
  state = online.init_state(params, opt, jax.random.PRNGKey(1), settings)
  return model, settings, sc, opt, state


def prompt_batch(poison: bool, n: int = 4):
  rng = np.random.default_rng(0)
  return {"prompt_ids": jnp.asarray(rng.integers(3, 16, size=(n, 5)), jnp.int32),
          "prompt_mask": jnp.ones((n, 5), bool),
          "poison": jnp.full((n,), float(poison), jnp.float32)}


def _leaves_equal(a, b):
  return all(np.array_equal(np.asarray(x), np.asarray(y))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _runner_stops_after(max_bad, bad_counts, tmp_path):
  c = ml_collections.ConfigDict(dict(workdir=str(tmp_path), resume="never",
                                     checkpoint=dict(every_steps=0), max_bad_steps=max_bad))
  run = Runner(c, state=None)
  for i, n in enumerate(bad_counts):
    run.after_step(i + 1, None, {"bad_steps_in_a_row": np.int32(n)})


@pytest.mark.parametrize("reference", [{}, {"ref_ema_decay": 0.5}, {"ref_update_every": 1}],
                         ids=["fixed_ref", "ema_ref", "synced_ref"])
def test_online_nan_batch_is_skipped_and_counted(tmp_path, reference):
  model, settings, sc, opt, state = online_setup(**reference)
  update = online.make_update(model, [poisonable_reward], opt, settings, sc, donate=False)
  rng = jax.random.PRNGKey(7)
  s1, m1 = update(state, prompt_batch(False), rng)
  assert float(m1["skipped"]) == 0 and np.isfinite(float(m1["pg_loss"]))
  assert not _leaves_equal(s1.params, state.params)  # a good step trains
  assert _leaves_equal(s1.ref_params, state.ref_params) == (not reference)
  s2, m2 = update(s1, prompt_batch(True), rng)
  assert float(m2["skipped"]) == 1
  assert int(m2["bad_steps_in_a_row"]) == 1 and int(m2["skipped_total"]) == 1
  assert int(s2.step) == 2  # the step counter advances (fresh randomness next step)
  for field in ("params", "opt_state", "ref_params", "kl_state"):
    assert _leaves_equal(getattr(s2, field), getattr(s1, field)), field
  s3, m3 = update(s2, prompt_batch(True), rng)
  assert int(m3["bad_steps_in_a_row"]) == 2 and int(m3["skipped_total"]) == 2
  s4, m4 = update(s3, prompt_batch(False), rng)
  assert float(m4["skipped"]) == 0 and int(m4["bad_steps_in_a_row"]) == 0
  assert int(m4["skipped_total"]) == 2
  assert not _leaves_equal(s4.params, s3.params)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(s4.params))
  # The loop's Runner stops after max_bad_steps consecutive skips, naming the limit.
  with pytest.raises(RuntimeError, match=r"2 consecutive train steps were skipped.*max_bad=2"):
    _runner_stops_after(2, [0, int(m2["bad_steps_in_a_row"]), int(m3["bad_steps_in_a_row"])],
                        tmp_path)
  _runner_stops_after(3, [1, 2, 0, 1, 2], tmp_path)  # a good step resets the count


def test_offline_dpo_nan_batch_is_skipped_and_counted():
  c = synthetic_config("preference", loss="dpo", arg="fast")
  tok = data_lib.CharTokenizer()
  model = models.from_config(dict(tiny_llama(16, 1), vocab_size=tok.vocab_size))
  params = model.init(jax.random.PRNGKey(0))
  opt = optim.make_optimizer(dict(learning_rate=1e-2))
  step = offline.make_step("preference", model, losses_lib.get("dpo"), opt,
                           loss_kwargs=dict(beta=0.1), donate=False)
  records = data_lib.make_task("preference").generate(16, seed=0)
  it = od.iterator(records, *od.batch_fns("preference", tok, c.data), batch_size=4, seed=0,
                   train=True)

  def batch(poison):
    b = {k: jnp.asarray(v) for k, v in next(it).items()
         if isinstance(v, np.ndarray) and v.dtype != object}
    n = b["chosen_input_ids"].shape[0] if "chosen_input_ids" in b else 4
    ref = jnp.full((n,), -5.0)
    b["ref_chosen_logps"] = ref.at[0].set(jnp.nan) if poison else ref
    b["ref_rejected_logps"] = ref
    return b

  state = offline.init_state(params, opt, rng=jax.random.PRNGKey(0))
  s1, m1 = step(state, batch(False))
  s2, m2 = step(s1, batch(True))
  assert float(m1["skipped"]) == 0 and float(m2["skipped"]) == 1
  assert not np.isfinite(float(m2["loss"]))
  assert _leaves_equal(s2.params, s1.params) and _leaves_equal(s2.opt_state, s1.opt_state)
  assert int(s2.step) == 2
  assert int(s2.guard.consecutive) == 1 and int(s2.guard.total) == 1
  s3, m3 = step(s2, batch(False))
  assert float(m3["skipped"]) == 0 and int(s3.guard.consecutive) == 0
  assert int(s3.guard.total) == 1 and not _leaves_equal(s3.params, s2.params)


def test_online_checkpoint_from_one_device_continues_on_8_device_mesh(tmp_path):
  assert jax.device_count() == 8
  batch = {k: v for k, v in prompt_batch(False).items() if k != "poison"}
  reward = verifiers.terminated(EOS)
  model, settings, sc, opt, state = online_setup()
  update = online.make_update(model, [reward], opt, settings, sc, donate=False)
  rng = jax.random.PRNGKey(7)
  state, _ = update(state, batch, rng)
  ck = ckpt_lib.Checkpointer(tmp_path, async_save=False)
  ck.save(1, state, force=True)
  ck.wait()
  ref_metrics = []
  ref_state = state
  for _ in range(2):
    ref_state, m = update(ref_state, batch, rng)
    ref_metrics.append(jax.device_get(m))

  mesh = sharding_lib.make_mesh(data=2, fsdp=2, tensor=2)
  abstract = jax.eval_shape(lambda: state)
  sh = placement.state_shardings(state, mesh)
  restored, _, _, step = ck.restore(abstract, shardings=sh)
  assert step == 1
  assert any(len(x.sharding.device_set) > 1 and not x.sharding.is_fully_replicated
             for x in jax.tree.leaves(restored.params))
  assert _leaves_equal(restored, state)
  supdate = online.make_update(model, [reward], opt, settings, sc, out_shardings=(sh, None))
  sbatch = sharding_lib.shard_batch(batch, mesh)
  for m_ref in ref_metrics:
    restored, m = supdate(restored, sbatch, rng)
    m = jax.device_get(m)
    for k in m_ref:
      np.testing.assert_allclose(m[k], m_ref[k], atol=1e-5, rtol=1e-5, err_msg=k)
  assert int(restored.step) == int(ref_state.step) == 3
  for a, b in zip(jax.tree.leaves(ref_state.params), jax.tree.leaves(restored.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)


UNSAFE = re.compile(r"\bimport pickle\b|\bpickle\.|\bcloudpickle\b|\bdill\b|(?<![\w.])eval\(|"
                    r"(?<![\w.])exec\(|allow_pickle\s*=\s*True|torch\.load\(|yaml\.load\(|"
                    r"yaml\.unsafe_load|marshal\.loads|shell\s*=\s*True|trust_remote_code\s*=\s*True")


# The code sandbox runs generated code (and its tests) with `exec`, by design, inside its
# isolated worker and judge processes (docs/reliability.md, "Code-execution sandbox").
EXEC_BY_DESIGN = ("rewards/sandbox.py",)


def test_package_never_unpickles_or_evals_user_files():
  """Only safetensors / GGUF / Orbax / JSON are read; no pickle, eval, exec or shell."""
  root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "rlhf_jax")
  hits = []
  for dirpath, _, names in os.walk(root):
    for name in names:
      if name.endswith(".py") and os.path.relpath(os.path.join(dirpath, name),
                                                  root) not in EXEC_BY_DESIGN:
        path = os.path.join(dirpath, name)
        with open(path, encoding="utf-8") as f:
          for i, line in enumerate(f, 1):
            if UNSAFE.search(line.split("#")[0]):
              hits.append(f"{os.path.relpath(path, root)}:{i}: {line.strip()}")
  assert not hits, "\n".join(hits)
  assert UNSAFE.search("pickle.loads(blob)") and UNSAFE.search("x = eval(s)")
  assert not UNSAFE.search("model.eval()")
