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


def test_layer_layout_defaults_by_depth():
  from rlhf_jax import demo  # pylint: disable=g-import-not-at-top
  from rlhf_jax.train import online_loop  # pylint: disable=g-import-not-at-top
  layout = online_loop.layer_layout
  deep_layers = online_loop.SCAN_FROM_LAYERS
  shallow, deep = (models.from_config(dict(HF, num_hidden_layers=n))
                   for n in (deep_layers - 1, deep_layers))
  c = demo.get_config("runlocal")
  assert layout(c, shallow) == (True, False)  # per-layer weights
  assert layout(c, deep) == (False, True)      # stacked, scanned everywhere (multi-turn too)
  c.model.unroll_layers = True     # the config's values win
  c.sampling.scan_layers = False
  assert layout(c, deep) == (True, False)
  c.model.unroll_layers, c.sampling.scan_layers = False, True
  assert layout(c, shallow) == (False, True)


def test_deep_model_loop_runs_with_scanned_layers(tmp_path):
  from test_online import demo_loop  # pylint: disable=g-import-not-at-top
  from rlhf_jax import demo  # pylint: disable=g-import-not-at-top
  from rlhf_jax.train import online_loop  # pylint: disable=g-import-not-at-top
  hf = dict(demo.get_config("runlocal").model.hf_config, hidden_size=16, intermediate_size=32,
            num_attention_heads=2, num_key_value_heads=1,
            num_hidden_layers=online_loop.SCAN_FROM_LAYERS)
  summary, rows = demo_loop(tmp_path, model=dict(hf_config=hf))
  layers = summary["state"].params["layers"]
  assert isinstance(layers, dict)  # stacked: one array per weight, layers leading
  assert jax.tree.leaves(layers)[0].shape[0] == online_loop.SCAN_FROM_LAYERS
  assert len(rows) == 2 and all(np.isfinite(r["pg_loss"]) for r in rows)
