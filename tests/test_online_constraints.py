"""Constrained RLHF in the fused RL step: the mixed reward v_0 + Σ λ_i (v_i − θ_i) and the
multipliers' dual-descent update, against float64 numpy from the equations."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import models
from rlhf_jax.sampling.config import SamplingConfig
from rlhf_jax.train import online, optim
from rlhf_jax.train.rl_config import RLSettings
from test_online import EOS, HF, PAD, prompts


def _even(prompt_ids, completion_ids, completion_mask, extras):
  del prompt_ids, extras
  m = completion_mask.astype(jnp.float32)
  return jnp.sum((completion_ids % 2 == 0) * m, 1) / jnp.maximum(jnp.sum(m, 1), 1.0)


def _short(prompt_ids, completion_ids, completion_mask, extras):
  del prompt_ids, completion_ids, extras
  return 1.0 - jnp.sum(completion_mask, 1) / 4.0


def _setup(reward_fns, **rl):
  model = models.from_config(HF)
  params = model.init(jax.random.PRNGKey(0))
  settings = RLSettings.from_config(dict(group_size=4, **rl))
  sc = SamplingConfig(max_new_tokens=4, temperature=1.0, eos_ids=(EOS,), pad_id=PAD,
                      num_samples=4)
  opt = optim.make_optimizer(dict(learning_rate=1e-2))
  state = online.init_state(params, opt, jax.random.PRNGKey(1), settings)
  return state, online.make_update(model, reward_fns, opt, settings, sc, donate=False)


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


@pytest.mark.parametrize("equality", [False, True])
def test_mixed_reward_and_dual_descent_match_numpy(equality):
  theta, lr = 0.6, 0.5
  state, update = _setup([_even, _short], constraint_thresholds=(theta,), constraint_lr=lr,
                         constraint_equality=(equality,))
  raw = 0.0
  for i in range(3):
    state, m = update(state, prompts(), jax.random.PRNGKey(7 + i))
    lam = np.tanh(raw) if equality else _sigmoid(raw)
    v0, v1 = float(m["reward_0_mean"]), float(m["reward_1_mean"])
    np.testing.assert_allclose(float(m["reward_mean"]), v0 + lam * (v1 - theta), atol=1e-6)
    dlam = 1 - np.tanh(raw) ** 2 if equality else _sigmoid(raw) * (1 - _sigmoid(raw))
    raw = raw - lr * (v1 - theta) * dlam  # λ̃ ← λ̃ − lr (Ĵ − θ) ∂λ/∂λ̃
    np.testing.assert_allclose(float(state.reward_state.raw[0]), raw, rtol=1e-5, atol=1e-7)
    want = np.tanh(raw) if equality else _sigmoid(raw)
    np.testing.assert_allclose(float(m["lagrange_multiplier_0"]), want, rtol=1e-5)


def test_without_constraints_the_rewards_are_summed():
  state, update = _setup([_even, _short])
  assert state.reward_state is None
  _, m = update(state, prompts(), jax.random.PRNGKey(7))
  np.testing.assert_allclose(float(m["reward_mean"]),
                             float(m["reward_0_mean"]) + float(m["reward_1_mean"]), atol=1e-6)
  assert "lagrange_multiplier_0" not in m


def test_bad_constraint_settings_are_named():
  with pytest.raises(ValueError, match="constraint_thresholds and rl.reward_weights are "
                                       "exclusive"):
    RLSettings.from_config(dict(constraint_thresholds=(0.5,), reward_weights=(1.0, 1.0)))
  with pytest.raises(ValueError, match="constraint_equality has 2 entries but "
                                       "rl.constraint_thresholds has 1"):
    RLSettings.from_config(dict(constraint_thresholds=(0.5,), constraint_equality=(True, False)))
  state, update = _setup([_even], constraint_thresholds=(0.5,))
  with pytest.raises(ValueError, match=r"must return 1 \+ 1 rewards .* they return 1"):
    update(state, prompts(), jax.random.PRNGKey(7))
