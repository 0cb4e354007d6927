"""LoRA in the online step: only the adapters train (gradient and optimiser state), the base
weights stay bit-identical and are the reference; config errors are named; the loop exports
PEFT adapters and merged weights and resumes from its checkpoint."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import models
from rlhf_jax.train import adapters, learn, online, optim, phases
from test_online import prompts, setup

LORA = dict(rank=2, alpha=4.0, targets=("q_proj", "v_proj", "down_proj"))


def _cfg(**lora):
  return {"lora": dict(LORA, **lora)}


@pytest.fixture(scope="module")
def run():
  """Two LoRA steps of the shared tiny setup with one compiled update (not donated)."""
  model, settings, sc, _, rewards, state0 = setup()
  base = state0.params  # per layer, as the step keeps them
  spec = adapters.from_config(_cfg(), model, settings)
  opt = optim.make_optimizer(dict(learning_rate=5e-2, max_grad_norm=1.0))
  state = online.init_state(adapters.init_adapters(spec, model, base), opt,
                            jax.random.PRNGKey(1), settings, ref_params=base)
  update = online.make_update(model, rewards, opt, settings, sc, donate=False, lora=spec)
  batch = prompts()
  s1, m1 = update(state, batch, jax.random.PRNGKey(7))
  s2, m2 = update(s1, batch, jax.random.PRNGKey(8))
  return dict(model=model, settings=settings, sc=sc, rewards=rewards, base=base, spec=spec,
              opt=opt, state=state, s1=s1, s2=s2, m1=jax.device_get(m1),
              m2=jax.device_get(m2), update=update, batch=batch)


def test_fresh_adapters_equal_the_base_model(run):
  model, base, state = run["model"], run["base"], run["state"]
  policy = adapters.merged(run["spec"], state.ref_params, state.params)
  ids = jnp.asarray(prompts()["prompt_ids"])
  np.testing.assert_array_equal(model.apply(policy, ids), model.apply(base, ids))
  # Step 1 samples from the merged policy = the reference: sampler-vs-reference KL is 0.
  assert abs(float(run["m1"]["seq_kl"])) < 1e-5


def test_reference_is_the_base_model_and_stays_bit_identical(run):
  base, s2 = run["base"], run["s2"]
  for a, b in zip(jax.tree.leaves(s2.ref_params), jax.tree.leaves(base)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The step's reference log-probs are the base model's: after the adapters moved, the
  # sampled (adapted) policy differs from the reference.
  assert float(run["m2"]["seq_kl"]) != 0.0
  model, spec = run["model"], run["spec"]

  @jax.jit
  def ref_logps(state, base, batch):
    ro = phases.rollout(model, adapters.merge(spec, state.ref_params, state.params), batch,
                        jax.random.PRNGKey(0), run["sc"])
    sig = phases.signals(model, state.ref_params, ro, jnp.zeros(ro.ids.shape[0]), 0.0,
                         group_size=4, kl_in_reward=False)
    want, _ = phases.completion_logps(model, models.stack_layers(base), ro.ids, ro.attn,
                                      ro.prompt_len, 4)
    return sig.ref_logps, want
  got, want = ref_logps(s2, base, {k: jnp.asarray(v) for k, v in run["batch"].items()})
  np.testing.assert_allclose(got, want, atol=1e-6)


def test_sampler_reads_attached_adapters_as_merged_weights(run):
  """The step's policy has its adapters attached (no merged kernels); sampling from it
  draws the same tokens with the same log-probs as sampling from merged kernels
  (`sample_merged=True`), with adapters that have moved away from zero."""
  model, spec, s2 = run["model"], run["spec"], run["s2"]
  assert not spec.sample_merged
  merged_spec = adapters.from_config(_cfg(sample_merged=True), model, run["settings"])
  attached = adapters.policy(spec, s2.ref_params, s2.params)
  assert any(k.endswith("_lora_a") for k in attached["layers"][0]["attn"])
  assert not any(k.endswith("_lora_a")
                 for k in adapters.policy(merged_spec, s2.ref_params, s2.params)["layers"][0]["attn"])
  batch = {k: jnp.asarray(v) for k, v in run["batch"].items()}

  @jax.jit
  def rollouts(state):
    return [phases.rollout(model, adapters.policy(sp, state.ref_params, state.params), batch,
                           jax.random.PRNGKey(3), run["sc"]) for sp in (spec, merged_spec)]
  a, m = rollouts(s2)
  np.testing.assert_array_equal(np.asarray(a.ids), np.asarray(m.ids))
  np.testing.assert_allclose(np.asarray(a.logps), np.asarray(m.logps), atol=1e-5, rtol=0)
  base = phases.rollout(model, s2.ref_params, batch, jax.random.PRNGKey(3), run["sc"])
  assert float(jnp.max(jnp.abs(a.logps - base.logps))) > 1e-4  # the adapters act


def test_only_adapters_train_and_hold_optimiser_state(run):
  state, s1 = run["state"], run["s1"]
  assert set(s1.params) == {"lora"}
  b0 = [ab["b"] for m in state.params["lora"]["layers"].values() for ab in m.values()]
  b1 = [ab["b"] for m in s1.params["lora"]["layers"].values() for ab in m.values()]
  assert all(float(jnp.abs(b).max()) == 0 for b in b0)
  assert all(float(jnp.abs(b).max()) > 0 for b in b1)
  assert run["m1"]["grad_norm"] > 0
  shapes = {x.shape for x in jax.tree.leaves(s1.params)}
  opt_leaves = [x for x in jax.tree.leaves(s1.opt_state) if x.ndim > 0]
  assert opt_leaves and {x.shape for x in opt_leaves} <= shapes
  n_adapter = sum(x.size for x in jax.tree.leaves(s1.params))
  assert sum(x.size for x in opt_leaves) <= 2 * n_adapter  # Adam's two moments at most


def test_gradient_tree_is_the_adapters_only(run):
  """`jax.grad` of the wrapped objective has the adapter tree's structure."""
  model, settings, spec, state = run["model"], run["settings"], run["spec"], run["state"]
  objective = adapters.wrap_objective(spec, learn.make_objective(model, settings),
                                      state.ref_params)
  batch = prompts()
  ids = jnp.repeat(jnp.asarray(batch["prompt_ids"][:2]), 4, axis=0)  # 2 groups of 4
  pmask = jnp.repeat(jnp.asarray(batch["prompt_mask"][:2]), 4, axis=0)
  t = 3
  mb = {"ids": jnp.concatenate([ids, ids[:, -t:]], 1),
        "attn": jnp.concatenate([pmask, jnp.ones((8, t), bool)], 1),
        "mask": jnp.ones((8, t), bool), "old_logps": jnp.zeros((8, t)),
        "ref_logps": jnp.zeros((8, t)), "advantages": jnp.linspace(-1, 1, 8), "prompt_len": 5}
  grad = jax.jit(lambda p, mb: jax.grad(objective, has_aux=True)(  # noqa: E731
      p, None, dict(mb, prompt_len=5), 8.0 * t, 0.1)[0])
  grads = grad(state.params, {k: v for k, v in mb.items() if k != "prompt_len"})
  assert jax.tree.structure(grads) == jax.tree.structure(state.params)


def test_one_compilation(run):
  assert run["update"]._cache_size() == 1  # pylint: disable=protected-access


def test_micro_batch_invariance(run):
  model, settings, sc, _, rewards, _ = setup(micro_batches=4)
  spec, opt, base = run["spec"], run["opt"], run["base"]
  state = online.init_state(adapters.init_adapters(spec, model, base), opt,
                            jax.random.PRNGKey(1), settings, ref_params=base)
  update = online.make_update(model, rewards, opt, settings, sc, donate=False, lora=spec)
  new, _ = update(state, run["batch"], jax.random.PRNGKey(7))
  for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(run["s1"].params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)


def test_bad_lora_config_is_named(run):
  model, settings = run["model"], run["settings"]
  with pytest.raises(ValueError, match=r"config\.lora\.targets=.*'qq_proj'.*valid targets: "
                                       r"q_kernel.*q_proj"):
    adapters.from_config(_cfg(targets=("q_proj", "qq_proj")), model, settings)
  with pytest.raises(ValueError, match=r"config\.lora \(rank=0"):
    adapters.from_config(_cfg(rank=0), model, settings)
  with pytest.raises(ValueError, match=r"config\.lora\.export='hf'"):
    adapters.from_config(_cfg(export="hf"), model, settings)
  with pytest.raises(ValueError, match=r"config\.lora\.sample_merged='yes': use True or False"):
    adapters.from_config(_cfg(sample_merged="yes"), model, settings)
  with pytest.raises(ValueError, match=r"config\.lora has unknown keys \['ranks'\]"):
    adapters.from_config(_cfg(ranks=2), model, settings)
  moving = settings.__class__.from_config(dict(group_size=4, ref_update_every=2))
  with pytest.raises(ValueError, match="rl.ref_update_every"):
    adapters.from_config(_cfg(), model, moving)
  assert adapters.from_config({}, model, settings) is None


def test_loop_exports_and_resumes(tmp_path):
  from test_online import demo_loop  # pylint: disable=g-import-not-at-top
  changes = dict(lora=dict(LORA, export="both", sample_merged=False),
                 checkpoint=dict(every_steps=1),
                 sft=dict(steps=0), data=dict(eval_size=8))
  summary, rows = demo_loop(tmp_path, **changes)
  assert len(rows) == 2
  peft = summary["lora_peft"]
  with open(os.path.join(peft, "adapter_config.json")) as f:
    assert json.load(f)["r"] == LORA["rank"]
  assert os.path.isfile(os.path.join(peft, "adapter_model.safetensors"))
  assert os.path.isfile(os.path.join(summary["lora_merged"], "config.json"))
  assert set(summary["state"].params) == {"lora"}
  # A second run in the same workdir resumes from the saved step-2 state (nothing to do).
  again, _ = demo_loop(tmp_path, **changes)
  assert again["resumed_from"] == 2
  for a, b in zip(jax.tree.leaves(again["state"].params), jax.tree.leaves(summary["state"].params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_non_finite_step_keeps_the_adapters(run):
  from test_reliability_steps import poisonable_reward, prompt_batch  # pylint: disable=g-import-not-at-top
  model, settings, sc, spec, opt = run["model"], run["settings"], run["sc"], run["spec"], run["opt"]
  update = online.make_update(model, [poisonable_reward], opt, settings, sc, donate=False,
                              lora=spec)
  s1, m1 = update(run["state"], prompt_batch(False), jax.random.PRNGKey(7))
  s2, m2 = update(s1, prompt_batch(True), jax.random.PRNGKey(7))
  assert float(m1["skipped"]) == 0 and float(m2["skipped"]) == 1
  for field in ("params", "opt_state", "ref_params"):
    for a, b in zip(jax.tree.leaves(getattr(s2, field)), jax.tree.leaves(getattr(s1, field))):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=field)
