"""The multi-turn online step (the JAX guess_number environment inside the program, GiGPO
credit) on a 2x2x2 mesh of 8 fake CPU devices equals the same step on one device.

tests/conftest.py sets `XLA_FLAGS=--xla_force_host_platform_device_count=8` before jax is
imported, so this process has 8 CPU devices; the unsharded run places everything on the
default device, the sharded one shards the state by the logical-axis rules and the
prompts over data x fsdp.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlhf_jax import envs
from rlhf_jax import models as M
from rlhf_jax import sharding as sharding_lib
from rlhf_jax.data.tokenizer import CharTokenizer
from rlhf_jax.sampling import SamplingConfig
from rlhf_jax.train import multiturn, online, placement
from rlhf_jax.train.rl_config import RLSettings

TOK = CharTokenizer()
G = 4
TINY = dict(model_type="llama", vocab_size=TOK.vocab_size, hidden_size=16, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=2, intermediate_size=32,
            max_position_embeddings=64, tie_word_embeddings=True)
# One token per turn: any digit is a guess, so a random model finds the number now and then.
ENV, SPEC = envs.make("guess_number", TOK, max_turns=4, turn_tokens=1, obs_tokens=8, max_value=9)
TARGETS = [3, 7, 1, 9, 5, 2, 8, 4]


def _setup():
  model = M.from_config(TINY)
  settings = RLSettings.from_config(dict(group_size=G, advantage="gigpo", entropy_coef=0.01))
  opt = optax.adam(1e-2)
  state = online.init_state(model.init(jax.random.PRNGKey(0)), opt, jax.random.PRNGKey(1),
                            settings)
  sampling = SamplingConfig(max_new_tokens=1, temperature=1.0, eos_ids=(TOK.eos_id,),
                            pad_id=TOK.pad_id, num_samples=G)
  return model, settings, opt, sampling, state


def _steps(update, state, batch, n=2):
  out = []
  for _ in range(n):
    state, m = update(state, batch, jax.random.PRNGKey(5))
    out.append(jax.device_get(m))
  return state, out


def test_multi_turn_step_sharded_equals_unsharded():
  assert jax.device_count() == 8
  batch = envs.prompt_batch(TOK, [{"prompt": "guess 1-9:\n", "target": t} for t in TARGETS],
                            int_keys=("target",))
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  model, settings, opt, sampling, state = _setup()
  init = np.asarray(jax.tree.leaves(state.params)[0])
  update = online.make_update(model, [multiturn.env_reward()], opt, settings, sampling,
                              env=ENV, env_spec=SPEC, donate=False)
  ref_state, ref_ms = _steps(update, state, batch)
  assert not np.allclose(np.asarray(jax.tree.leaves(ref_state.params)[0]), init)  # it trained
  assert max(m["env_reward_mean"] for m in ref_ms) > 0  # some episode found its number
  assert min(m["num_turns"] for m in ref_ms) > 1

  mesh = sharding_lib.make_mesh(data=2, fsdp=2, tensor=2)
  model, settings, opt, sampling, state = _setup()
  sh = placement.state_shardings(state, mesh)
  state = jax.device_put(state, sh)
  assert any(len(x.sharding.device_set) > 1 and not x.sharding.is_fully_replicated
             for x in jax.tree.leaves(state.params))
  update = online.make_update(model, [multiturn.env_reward()], opt, settings, sampling,
                              env=ENV, env_spec=SPEC, out_shardings=(sh, None))
  new_state, ms = _steps(update, state, sharding_lib.shard_batch(batch, mesh))
  for x, y in zip(jax.tree.leaves(ref_state.params), jax.tree.leaves(new_state.params)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5, rtol=0)
  for a, b in zip(ref_ms, ms):
    assert set(a) == set(b)
    for k in a:
      np.testing.assert_allclose(a[k], b[k], atol=1e-5, rtol=1e-5, err_msg=k)
