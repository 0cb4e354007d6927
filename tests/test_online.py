"""The fused online RL step: one program, sharding-, micro-batch- and host-invariant (multi-host:
tests/test_multihost_loops.py)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import models
from rlhf_jax import sharding as sharding_lib
from rlhf_jax.rewards import verifiers
from rlhf_jax.sampling.config import SamplingConfig
from rlhf_jax.train import online, optim, placement
from rlhf_jax.train.rl_config import RLSettings

HF = dict(model_type="llama", vocab_size=16, hidden_size=16, num_hidden_layers=1,
          num_attention_heads=2, num_key_value_heads=1, intermediate_size=32,
          max_position_embeddings=32, tie_word_embeddings=True)
EOS, PAD = 2, 0


def setup(micro_batches=1, num_minibatches=1, epochs=1, surrogate="ppo_clip", **rl):
  model = models.from_config(HF)
  params = model.init(jax.random.PRNGKey(0))
  settings = RLSettings.from_config(dict(
      group_size=4, kl_coef=0.05, entropy_coef=0.01, micro_batches=micro_batches,
      num_minibatches=num_minibatches, epochs=epochs, surrogate=surrogate, **rl))
  sc = SamplingConfig(max_new_tokens=4, temperature=1.0, eos_ids=(EOS,), pad_id=PAD,
                      num_samples=4)
  opt = optim.make_optimizer(dict(learning_rate=1e-2, max_grad_norm=1.0))
  rewards = [verifiers.exact_match(pad_id=PAD, eos_id=EOS), verifiers.terminated(EOS)]
  state = online.init_state(params, opt, jax.random.PRNGKey(1), settings)
  return model, settings, sc, opt, rewards, state


def prompts(n=4, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, 16, size=(n, 5)).astype(np.int32)
  mask = np.ones((n, 5), bool)
  mask[0, :2] = False  # a left-padded prompt
  ids[0, :2] = PAD
  ans = rng.integers(3, 16, size=(n, 2)).astype(np.int32)
  return {"prompt_ids": ids, "prompt_mask": mask, "answer_ids": ans,
          "answer_mask": np.ones_like(ans, bool)}


def run_steps(update, state, batch, n, rng=jax.random.PRNGKey(7)):
  out = []
  for _ in range(n):
    state, m = update(state, batch, rng)
    out.append(jax.device_get(m))
  return state, out


def test_metrics_and_learning_signal():
  model, settings, sc, opt, rewards, state = setup()
  update = online.make_update(model, rewards, opt, settings, sc)
  state, ms = run_steps(update, state, prompts(), 2)
  m = ms[-1]
  for key in ("reward_mean", "reward_std", "reward_0_mean", "reward_1_mean", "kl", "entropy",
              "clip_fraction", "response_length", "zero_variance_groups", "grad_norm",
              "num_tokens", "pg_loss"):
    assert key in m and np.isfinite(m[key]), key
  assert int(state.step) == 2
  assert m["grad_norm"] > 0


def test_one_compilation_and_no_host_transfer():
  model, settings, sc, opt, rewards, state = setup()
  update = online.make_update(model, rewards, opt, settings, sc)
  batch = jax.device_put({k: jnp.asarray(v) for k, v in prompts().items()})
  rng = jax.device_put(jax.random.PRNGKey(3))
  state, _ = update(state, batch, rng)
  state, _ = update(state, batch, rng)
  jax.block_until_ready(state)
  assert update._cache_size() == 1  # pylint: disable=protected-access
  with jax.transfer_guard("disallow"):
    state, m = update(state, batch, rng)
    jax.block_until_ready((state, m))
  assert update._cache_size() == 1  # pylint: disable=protected-access


def _params_close(a, b, atol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0)


def test_micro_batch_invariance():
  batch = prompts()
  results = []
  for k in (1, 4):
    model, settings, sc, opt, rewards, state = setup(micro_batches=k)
    update = online.make_update(model, rewards, opt, settings, sc, donate=False)
    new, _ = update(state, batch, jax.random.PRNGKey(3))
    results.append(new.params)
  _params_close(results[0], results[1], atol=1e-6)


def test_minibatches_and_epochs_run():
  model, settings, sc, opt, rewards, state = setup(num_minibatches=2, epochs=2)
  update = online.make_update(model, rewards, opt, settings, sc)
  state, ms = run_steps(update, state, prompts(), 1)
  assert np.isfinite(ms[0]["pg_loss"])


def test_sharded_equals_unsharded():
  batch = prompts(n=4)
  model, settings, sc, opt, rewards, state = setup()
  update = online.make_update(model, rewards, opt, settings, sc, donate=False)
  ref_state, ref_ms = run_steps(update, state, batch, 3)

  mesh = sharding_lib.make_mesh(data=2, fsdp=2, tensor=2)
  model, settings, sc, opt, rewards, state = setup()
  sh = placement.state_shardings(state, mesh)
  state = jax.device_put(state, sh)
  assert any(len(x.sharding.device_set) > 1 and not x.sharding.is_fully_replicated
             for x in jax.tree.leaves(state.params))
  update = online.make_update(model, rewards, opt, settings, sc, out_shardings=(sh, None))
  sbatch = sharding_lib.shard_batch({k: jnp.asarray(v) for k, v in batch.items()}, mesh)
  new_state, ms = run_steps(update, state, sbatch, 3)
  _params_close(ref_state.params, new_state.params, atol=1e-5)
  for a, b in zip(ref_ms, ms):
    for k in a:
      np.testing.assert_allclose(a[k], b[k], atol=1e-5, rtol=1e-5, err_msg=k)


def test_bad_settings_are_named():
  with pytest.raises(ValueError, match="rl.advantage"):
    RLSettings.from_config(dict(advantage="grpoo"))
  with pytest.raises(ValueError, match="unknown rl config keys"):
    RLSettings.from_config(dict(group_sise=4))
  with pytest.raises(ValueError, match="rl.surrogate"):
    RLSettings.from_config(dict(surrogate="dpo"))
  with pytest.raises(ValueError, match="num_minibatches"):
    RLSettings.from_config(dict(group_size=4, num_minibatches=3)).check_batch(4)
  model, settings, sc, opt, rewards, state = setup()
  with pytest.raises(ValueError, match="num_samples"):
    online.make_update(model, rewards, opt, settings,
                       SamplingConfig(max_new_tokens=4, num_samples=2))


@pytest.mark.parametrize("advantage", ["rloo", "reinforce_pp", "gdpo"])
def test_estimator_families_plug_in(advantage):
  model, settings, sc, opt, rewards, state = setup(advantage=advantage)
  update = online.make_update(model, rewards, opt, settings, sc)
  state, ms = run_steps(update, state, prompts(), 1)
  assert np.isfinite(ms[0]["pg_loss"]) and np.isfinite(ms[0]["grad_norm"])


def test_ppo_with_value_model_and_gae():
  model, settings, sc, opt, rewards, _ = setup(
      advantage="gae", advantage_kwargs=dict(gamma=1.0, lam=0.95), kl_in_reward=True)
  params = model.init(jax.random.PRNGKey(0))
  value_model = models.ValueModel(HF)
  vparams = value_model.init(jax.random.PRNGKey(5))
  vopt = optim.make_optimizer(dict(learning_rate=1e-2))
  state = online.init_state(params, opt, jax.random.PRNGKey(1), settings, value_params=vparams,
                            value_optimizer=vopt)
  update = online.make_update(model, rewards, opt, settings, sc, value_model=value_model,
                              value_optimizer=vopt)
  before = jax.tree.map(np.asarray, vparams)  # the state is donated
  new, ms = run_steps(update, state, prompts(), 1)
  assert np.isfinite(ms[0]["value_loss"]) and ms[0]["value_loss"] > 0
  moved = [np.abs(np.asarray(a) - np.asarray(b)).max()
           for a, b in zip(jax.tree.leaves(new.value_params), jax.tree.leaves(before))]
  assert max(moved) > 0


def demo_loop(workdir, **changes):
  """Runs the `runlocal` demo for 2 steps with `changes` (section -> dict of keys to set):
  (summary, the steps' metric rows)."""
  from rlhf_jax import demo  # pylint: disable=g-import-not-at-top
  from rlhf_jax.train import online_loop  # pylint: disable=g-import-not-at-top
  c = demo.get_config("runlocal")
  c.workdir = str(workdir)
  c.sft.steps, c.train.steps, c.train.prompts_per_step = 5, 2, 8
  for section, keys in changes.items():
    if c.get(section) is None:
      c[section] = keys
    else:
      c[section].update(keys)
  summary = online_loop.train(c)
  with open(f"{workdir}/metrics.jsonl") as f:
    return summary, [json.loads(l) for l in f if '"reward_mean"' in l]


def assert_same_steps(rows_a, rows_b):
  assert len(rows_a) == len(rows_b) == 2
  for a, b in zip(rows_a, rows_b):
    for k in ("reward_mean", "kl", "pg_loss", "grad_norm"):
      np.testing.assert_allclose(a[k], b[k], atol=1e-5, rtol=1e-5, err_msg=k)


@pytest.fixture(scope="module")
def default_loop(tmp_path_factory):
  """The `runlocal` demo's 2 steps on one device with per-layer params: the reference run."""
  return demo_loop(tmp_path_factory.mktemp("default"))


def test_loop_on_a_mesh_matches_one_device(tmp_path, default_loop):
  summary, mesh = demo_loop(tmp_path / "mesh", mesh=dict(data=2, fsdp=2, tensor=2))
  leaf = jax.tree.leaves(summary["state"].params)[0]
  assert len(leaf.sharding.device_set) == 8
  assert_same_steps(default_loop[1], mesh)


def test_loop_with_stacked_layers_on_a_mesh_matches_the_default(tmp_path, default_loop):
  """Stacked layers in every pass (the decode's in-place stacked cache included) on a
  2x2x2 mesh take the same steps as per-layer weights on one device."""
  default, rows = default_loop
  stacked, stacked_rows = demo_loop(tmp_path / "stacked", model=dict(unroll_layers=False),
                                    sampling=dict(scan_layers=True),
                                    mesh=dict(data=2, fsdp=2, tensor=2))
  assert isinstance(default["state"].params["layers"], tuple)
  assert isinstance(stacked["state"].params["layers"], dict)
  assert_same_steps(rows, stacked_rows)
