"""The online step with stacked layers (`unroll_layers=False`) equals the per-layer default."""

import jax
import numpy as np

from rlhf_jax import models
from rlhf_jax.train import online
from test_online import HF, prompts, run_steps, setup

HF2 = dict(HF, num_hidden_layers=2)


def _run(unroll_layers, steps=2):
  _, settings, sc, opt, rewards, _ = setup()
  model = models.from_config(HF2)
  params = model.init(jax.random.PRNGKey(0))
  state = online.init_state(params, opt, jax.random.PRNGKey(1), settings,
                            unroll_layers=unroll_layers)
  update = online.make_update(model, rewards, opt, settings, sc)
  return run_steps(update, state, prompts(), steps)


def test_stacked_layers_equal_per_layer():
  per_layer, m_per_layer = _run(True)
  stacked, m_stacked = _run(False)
  assert isinstance(per_layer.params["layers"], tuple)
  assert isinstance(stacked.params["layers"], dict)  # one array per weight, layers leading
  assert isinstance(stacked.ref_params["layers"], dict)
  for a, b in zip(m_per_layer, m_stacked):
    for k in ("reward_mean", "kl", "pg_loss", "grad_norm", "entropy"):
      np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)
  want = jax.tree.leaves(models.stack_layers(per_layer.params))
  for x, y in zip(want, jax.tree.leaves(stacked.params)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5)
  start = jax.tree.leaves(models.from_config(HF2).init(jax.random.PRNGKey(0)))
  assert max(np.abs(np.asarray(x) - np.asarray(y)).max() for x, y in zip(want, start)) > 0
