"""Estimators that need more than the sampled rewards, in the fused online step and loop:
ReMax's greedy baseline, PPO + GAE with a value model from the config, and clear errors."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import models, sampling
from rlhf_jax.sampling.config import SamplingConfig
from rlhf_jax.train import online, optim, phases
from rlhf_jax.train.rl_config import RLSettings
from test_online import EOS, HF, PAD, prompts


def _step(advantage, reward_fn, *, kl_coef=0.0, entropy_coef=0.0, **adv_kwargs):
  model = models.from_config(HF)
  params = model.init(jax.random.PRNGKey(0))
  settings = RLSettings.from_config(dict(group_size=4, advantage=advantage, kl_coef=kl_coef,
                                         entropy_coef=entropy_coef,
                                         advantage_kwargs=adv_kwargs))
  sc = SamplingConfig(max_new_tokens=4, temperature=1.0, eos_ids=(EOS,), pad_id=PAD,
                      num_samples=4)
  opt = optim.make_optimizer(dict(learning_rate=1e-2))
  state = online.init_state(params, opt, jax.random.PRNGKey(1), settings)
  update = online.make_update(model, [reward_fn], opt, settings, sc, donate=False)
  return model, params, sc, state, update


def _token_reward(prompt_ids, completion_ids, completion_mask, extras):
  """Fraction of completion tokens that are even (depends on what was sampled)."""
  del prompt_ids, extras
  m = completion_mask.astype(jnp.float32)
  return jnp.sum((completion_ids % 2 == 0) * m, 1) / jnp.maximum(jnp.sum(m, 1), 1.0)


def test_remax_baseline_is_the_greedy_decode_reward():
  model, params, sc, state, update = _step("remax", _token_reward)
  batch = prompts()
  _, m = update(state, batch, jax.random.PRNGKey(7))
  greedy_cfg = SamplingConfig(max_new_tokens=4, temperature=0.0, eos_ids=(EOS,), pad_id=PAD)
  g = sampling.sample(model, models.unstack_layers(params), jnp.asarray(batch["prompt_ids"]),
                      jnp.asarray(batch["prompt_mask"]), jax.random.PRNGKey(0), greedy_cfg)
  want = np.mean(np.asarray(_token_reward(None, g.completion_ids, g.completion_mask, None)))
  np.testing.assert_allclose(m["greedy_reward_mean"], want, rtol=1e-6)
  assert np.isfinite(m["pg_loss"]) and m["grad_norm"] > 0


def test_remax_with_a_constant_reward_has_no_policy_gradient():
  # r_i − r_greedy = 0 for every sample: nothing to learn (a zero baseline would give A = 1).
  ones = lambda p, c, m, e: jnp.ones(c.shape[0], jnp.float32)  # noqa: E731
  _, _, _, state, update = _step("remax", ones)
  _, m = update(state, prompts(), jax.random.PRNGKey(7))
  assert float(m["greedy_reward_mean"]) == 1.0 and float(m["grad_norm"]) == 0.0
  _, _, _, state, update = _step("rloo", ones, kl_coef=0.0)  # same here (leave-one-out)
  assert float(update(state, prompts(), jax.random.PRNGKey(7))[1]["grad_norm"]) == 0.0


def test_estimators_the_step_cannot_feed_are_named():
  with pytest.raises(ValueError, match="'gae' needs 'values'.*value_model"):
    _, _, _, state, update = _step("gae", _token_reward)
    update(state, prompts(), jax.random.PRNGKey(7))
  with pytest.raises(ValueError, match="'gigpo' needs 'step_rewards'"):
    _, _, _, state, update = _step("gigpo", _token_reward)
    update(state, prompts(), jax.random.PRNGKey(7))
  # ROVER's vocabulary-mean log-ratio is provided (0 at estimate time, θ = θ_old; the learn
  # phase adds it per update: tests/test_rover.py), so the step builds.
  _step("rover", _token_reward)


def test_hyper_parameters_without_defaults_come_from_advantage_kwargs():
  with pytest.raises(ValueError, match="'passk' needs 'k'.*rl.advantage_kwargs"):
    _step("passk", _token_reward)
  _, _, _, state, update = _step("passk", _token_reward, k=2)
  assert np.isfinite(update(state, prompts(), jax.random.PRNGKey(7))[1]["pg_loss"])


def test_an_estimator_error_names_the_rl_settings():
  with pytest.raises(ValueError, match=r"rl\.advantage='grpo' \(rl\.group_size=1, "
                     r"rl\.advantage_kwargs=\{'unbiased': True\}\): group_size must be >= 2"):
    est = phases.Estimator.build("grpo", dict(unbiased=True), group_size=1,
                                 provides=online.step_inputs(False))
    ro = phases.Rollout(prompt_ids=jnp.ones((4, 2), jnp.int32), prompt_mask=jnp.ones((4, 2), bool),
                        completion_ids=jnp.ones((4, 3), jnp.int32),
                        completion_mask=jnp.ones((4, 3), bool), loss_mask=jnp.ones((4, 3)),
                        logps=jnp.zeros((4, 3)), lengths=jnp.full((4,), 3),
                        finished=jnp.ones((4,), bool))
    sig = phases.Signals(ref_logps=jnp.zeros((4, 3)), kl=jnp.zeros((4, 3)),
                         token_rewards=jnp.zeros((4, 3)))
    est(phases.Scores(rewards=jnp.ones(4), each=jnp.ones((4, 1))), ro, sig, None)


def test_loop_ppo_gae_with_a_value_model_from_the_config(tmp_path):
  from rlhf_jax.train import online_loop  # pylint: disable=g-import-not-at-top
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("ppo", "experiments/ppo_gae_arithmetic.py")
  exp = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(exp)
  c = exp.get_config("runlocal")
  c.workdir = str(tmp_path / "ppo")
  c.sft.steps = 5
  s = online_loop.train(c)
  vp = s["state"].value_params
  assert vp["score"].shape == (c.model.hf_config.hidden_size, 1) and "lm_head" not in vp
  with open(tmp_path / "ppo" / "metrics.jsonl") as f:
    rows = [json.loads(l) for l in f if '"value_loss"' in l]
  assert len(rows) == c.train.steps and all(np.isfinite(r["value_loss"]) for r in rows)
  c2 = exp.get_config("runlocal")
  c2.workdir = str(tmp_path / "no_value")
  del c2["value"]
  with pytest.raises(ValueError, match="'gae' needs a value model: add config.value"):
    online_loop.train(c2)


def test_value_model_starts_from_the_policy():
  import ml_collections  # pylint: disable=g-import-not-at-top
  from rlhf_jax.train import online_loop  # pylint: disable=g-import-not-at-top
  model = models.from_config(HF)
  params = model.init(jax.random.PRNGKey(0))
  c = ml_collections.ConfigDict(dict(value=dict(optim=None), optim=dict(learning_rate=1e-3)))
  vm, vp, vopt = online_loop.value_setup(c, model, params, jax.random.PRNGKey(3))
  assert vm.head == "value" and vopt is not None
  for k, v in params.items():
    if k != "lm_head":
      for a, b in zip(jax.tree.leaves(v), jax.tree.leaves(vp[k])):
        np.testing.assert_array_equal(a, b)
        assert a is not b  # copies: the step donates both
  values = vm.apply(vp, jnp.ones((2, 3), jnp.int32))
  assert values.shape == (2, 3)
  assert online_loop.value_setup(ml_collections.ConfigDict(), model, params, None) == (
      None, None, None)


def test_answer_ids_equal_exactly_for_equal_completions():

  ids = jnp.asarray([[3, 4, 2, 0], [3, 4, 2, 0], [3, 4, 5, 2], [4, 3, 2, 0], [3, 4, 2, 9]])
  mask = jnp.asarray([[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 0]])
  a = np.asarray(phases.answer_ids(ids, mask))
  assert a[0] == a[1] == a[4]  # padding after the mask does not count
  assert len({a[0], a[2], a[3]}) == 3


def test_copo_step_blends_its_two_advantages():
  """The step's COPO advantage is (1 − w)·A_g + w·A_local of the library function."""
  from rlhf_jax import advantages

  r = jnp.asarray([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0])
  ids = jnp.asarray([1, 2, 1, 1, 3, 4, 5, 6], jnp.int32)
  out = advantages.get("copo")(r, answer_ids=ids, group_size=4)
  w = np.asarray(out.weight)
  want = (1 - w) * np.asarray(out.global_) + w * np.asarray(out.local)
  np.testing.assert_allclose(np.asarray(out.combine()), want, rtol=1e-6)
  est = phases.Estimator.build("copo", {}, group_size=4, provides=phases.STEP_INPUTS)
  assert "answer_ids" in est.needs
