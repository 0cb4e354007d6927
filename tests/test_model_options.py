"""`config.model` options for real-size training (attention backend, remat, precision):
named errors, and the online step with the memory-saving options equal to the default."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from rlhf_jax.data import CharTokenizer
from rlhf_jax.train import build, online, optim
from test_online import prompts, setup

HF = dict(model_type="llama", hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
          num_key_value_heads=1, intermediate_size=32, max_position_embeddings=32,
          tie_word_embeddings=True)


@pytest.mark.parametrize("key,value,msg", [
    ("remat", "sometimes", r"config\.model .*remat='sometimes'"),
    ("attention", "splash", r"config\.model .*attention='splash'.*runs only on TPU"),
    ("attention", "flashy", r"config\.model .*attention='flashy'"),
    ("attention_chunk", 0, r"config\.model .*attention_chunk=0"),
    ("param_dtype", "float8", r"config\.model .*param_dtype='float8'"),
])
def test_bad_model_options_are_named(key, value, msg):
  with pytest.raises(ValueError, match=msg):
    build.build_model({"hf_config": HF, key: value}, CharTokenizer())


def test_online_step_with_chunked_attention_and_remat_equals_the_default():
  model, settings, sc, opt, rewards, state = setup()
  options, params = build.with_model_options(
      model, state.params, {"attention": "chunked", "attention_chunk": 4, "remat": "full"})
  assert options.remat == "full" and options.config.attention == "chunked"
  opt = optim.make_optimizer(dict(learning_rate=1e-2, max_grad_norm=1.0))
  batch = prompts(n=4)
  out = []
  for m in (model, options):
    st = online.init_state(params, opt, jax.random.PRNGKey(1), settings)
    update = online.make_update(m, rewards, opt, settings, sc, donate=False)
    st, metrics = update(st, batch, jax.random.PRNGKey(7))
    out.append((st, metrics))
  for k in ("reward_mean", "pg_loss", "kl", "entropy", "grad_norm"):
    np.testing.assert_allclose(float(out[0][1][k]), float(out[1][1][k]), atol=1e-5, err_msg=k)
  for a, b in zip(jax.tree.leaves(out[0][0].params), jax.tree.leaves(out[1][0].params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
