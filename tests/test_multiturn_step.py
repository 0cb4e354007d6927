"""The multi-turn rollout as the online step's rollout phase: one compiled program with an
environment, turn-level credit, and no gradient on observation tokens."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax.train import learn, multiturn, online
from rlhf_jax.train.rl_config import RLSettings
from test_multiturn import G, MODEL, PARAMS, SAMPLING, SPEC, ScriptedEnv, _batch


def _step(advantage):
  settings = RLSettings.from_config(dict(group_size=G, advantage=advantage, kl_coef=0.01))
  opt = optax.adam(1e-3)
  state = online.init_state(PARAMS, opt, jax.random.PRNGKey(1), settings)
  update = online.make_update(MODEL, [multiturn.env_reward()], opt, settings, SAMPLING,
                              env=ScriptedEnv(), env_spec=SPEC, donate=False)
  return state, update


def test_multi_turn_step_compiles_once_and_credits_turns():
  state, update = _step("turn_returns")
  for seed in range(2):
    batch = {k: jnp.asarray(v) for k, v in _batch(seed).items()}
    state, m = update(state, batch, jax.random.PRNGKey(seed))
    assert np.isfinite(float(m["pg_loss"])) and float(m["num_turns"]) > 1.0
    assert float(m["reward_mean"]) == float(m["env_reward_mean"])  # env_reward() is the score
  assert update._cache_size() == 1  # pylint: disable=protected-access
  # A trajectory-level estimator runs on the same rollout phase.
  state, update = _step("grpo")
  _, m = update(state, {k: jnp.asarray(v) for k, v in _batch(0).items()}, jax.random.PRNGKey(0))
  assert np.isfinite(float(m["pg_loss"]))


def test_no_observation_token_receives_gradient():
  batch = {k: jnp.asarray(v) for k, v in _batch(0).items()}
  ro, info = multiturn.rollout_multiturn(MODEL, PARAMS, batch, jax.random.PRNGKey(0), SAMPLING,
                                         ScriptedEnv(), SPEC)
  obs = np.asarray(info.obs_mask)
  assert obs.any() and not (obs & (np.asarray(ro.loss_mask) > 0)).any()
  settings = RLSettings.from_config(dict(group_size=G, kl_coef=0.1, entropy_coef=0.1))
  # A policy whose log-probs are free variables: the objective's gradient is non-zero on
  # every token it trains, so a zero there can only come from the mask.
  objective = learn.make_objective(None, settings, policy_logps=lambda p, mb: (p, -p))
  data = online.learn_data(ro, online.phases.Signals(
      ref_logps=jnp.zeros_like(ro.logps), kl=jnp.zeros_like(ro.logps),
      token_rewards=jnp.zeros_like(ro.logps)), jnp.ones(ro.logps.shape[0]))
  mb = dict(data, prompt_len=ro.prompt_len)
  lp = jnp.full(ro.logps.shape, -1.0)
  grad = np.asarray(jax.grad(lambda p: objective(p, None, mb, jnp.sum(ro.loss_mask), 0.1)[0])(lp))
  assert np.all(grad[obs] == 0.0)
  assert np.all(grad[np.asarray(ro.loss_mask) > 0] != 0.0)


@pytest.mark.parametrize("ordered", [True, False])
def test_host_tool_under_vmapped_seeds_equals_single_seed_steps(ordered):
  """JAX cannot vmap the decode loop holding a host callback; the step runs the seeds'
  rollouts one after another (`multiturn.in_sequence_under_vmap`) and equals single steps."""
  from rlhf_jax import envs
  from rlhf_jax.train import seeds
  from test_multiturn import CALC_MODEL, EOS, TOK, _calculator_user
  from rlhf_jax.sampling import SamplingConfig
  calls = []

  def tool(call):
    calls.append((call.prompt, call.action, call.turn, call.row))
    return envs.python_calculator(call)
  env, spec = envs.make("host", TOK, tool=tool, max_turns=2, turn_tokens=18, obs_tokens=8,
                        stop_strings=["</calc>"], ordered=ordered)
  assert env.ordered == ordered and env.host_callbacks
  sampling = SamplingConfig(max_new_tokens=1, temperature=0.5, eos_ids=(EOS,), num_samples=G)
  settings = RLSettings.from_config(dict(group_size=G, advantage="turn_returns"))
  opt = optax.adam(1e-3)
  make = lambda jit: online.make_update(CALC_MODEL, [multiturn.env_reward()], opt,  # noqa: E731
                                        settings, sampling, env=env, env_spec=spec,
                                        donate=False, jit=jit)
  params = _calculator_user()
  states = [online.init_state(params, opt, jax.random.PRNGKey(s), settings) for s in (0, 1)]
  prompts = [["23*45=", "7+8="], ["7+8=", "23*45="]]
  batches = [{k: jnp.asarray(v) for k, v in envs.prompt_batch(
      TOK, [{"prompt": p} for p in ps]).items()} for ps in prompts]
  keys = [jax.random.PRNGKey(10 + s) for s in (0, 1)]
  single = make(True)
  want, single_calls = [], []
  for st, b, k in zip(states, batches, keys):
    calls.clear()
    want.append(jax.block_until_ready(single(st, b, k)))
    single_calls += calls
  calls.clear()
  swept = seeds.vmapped(make(False), donate=False)
  stacked, metrics = swept(seeds.stack(states), seeds.stack(batches), jnp.stack(keys))
  jax.block_until_ready(metrics)
  for i, (st, m) in enumerate(want):
    for k in ("reward_mean", "num_turns", "pg_loss", "grad_norm"):
      np.testing.assert_allclose(np.asarray(metrics[k])[i], np.asarray(m[k]), atol=1e-5,
                                 err_msg=k)
    for a, b in zip(jax.tree.leaves(seeds.unstack(stacked.params, i)),
                    jax.tree.leaves(st.params)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
  assert float(np.max(metrics["num_turns"])) > 1.0  # the tool was called and answered
  # The host saw the same calls in the same order: seed 0's turns, then seed 1's.
  assert calls == single_calls and {c[2] for c in calls} == {0, 1}
