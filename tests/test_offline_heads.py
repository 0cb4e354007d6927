"""Reward models with ensemble / GPM / ArmoRM / HL-Gauss heads in the offline step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import losses
from rlhf_jax.train import offline, offline_heads
from test_offline_step import B, LM, PAIRS, _log_sigmoid, _pref_batch


@pytest.mark.parametrize("head,loss,kw", [
    (dict(name="ensemble", num_members=3), "bt", {}),
    (dict(name="gpm", num_blocks=2), "gpm", {}),
    (dict(name="armorm", num_objectives=3, gate_hidden=(8,)), "bt", {}),
    (dict(name="hl_gauss", num_bins=8), "hl_gauss", dict(v_min=-3.0, v_max=8.0))])
def test_headed_reward_models(head, loss, kw):
  rm = offline_heads.HeadedRewardModel.from_config(LM.with_head("reward"), head)
  params = rm.init(jax.random.PRNGKey(5), LM.with_head("reward").init(jax.random.PRNGKey(2)))
  batch = _pref_batch()
  batch["chosen_reward"] = jnp.asarray([p["chosen_reward"] for p in PAIRS], jnp.float32)
  batch["rejected_reward"] = jnp.asarray([p["rejected_reward"] for p in PAIRS], jnp.float32)
  fn = offline.make_batch_loss("reward_model", rm, losses.get(loss), kw)
  (value, m), grads = jax.jit(jax.value_and_grad(fn, has_aux=True))(params, None, batch)
  assert np.isfinite(float(value))
  for part in ("backbone", "head"):
    assert sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(grads[part])) > 0
  if head["name"] == "ensemble":  # the loss is the member mean of BT
    ids = jnp.concatenate([batch["chosen_ids"], batch["rejected_ids"]])
    mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]])
    lm = jnp.concatenate([batch["chosen_loss_mask"], batch["rejected_loss_mask"]])
    out = np.asarray(rm.outputs(params, ids, mask, lm), np.float64)
    c, r = out[:B], out[B:]
    np.testing.assert_allclose(float(value), np.mean(-_log_sigmoid(c - r)), rtol=1e-5)
    np.testing.assert_allclose(float(m["accuracy"]), np.mean(c.mean(1) > r.mean(1)))
  if head["name"] == "armorm":  # stage 2: BT on β·gᵀr with the gate on the prompt's last token
    from test_reward_heads import _armorm_reference
    ids = jnp.concatenate([batch["chosen_ids"], batch["rejected_ids"]])
    mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]])
    lm = np.asarray(jnp.concatenate([batch["chosen_loss_mask"], batch["rejected_loss_mask"]]))
    h = np.asarray(rm.backbone.hidden(params["backbone"], ids, mask), np.float64)
    last = np.array([np.flatnonzero(row)[-1] for row in np.asarray(mask)])
    prompt_last = np.array([np.flatnonzero(row)[0] - 1 for row in lm])
    rows = np.arange(len(ids))
    s, _, _ = _armorm_reference(params["head"], h[rows, last], h[rows, prompt_last],
                                temperature=10.0)
    c, r = s[:B], s[B:]
    np.testing.assert_allclose(float(value), np.mean(-_log_sigmoid(c - r)), rtol=1e-5)
    np.testing.assert_allclose(float(m["accuracy"]), np.mean(c > r))


def test_headed_reward_model_config_errors():
  with pytest.raises(ValueError, match="rm_head.name='mlp' is unknown"):
    offline_heads.HeadedRewardModel.from_config(LM, dict(name="mlp"))
  with pytest.raises(ValueError, match="needs num_bins"):
    offline_heads.HeadedRewardModel.from_config(LM, dict(name="hl_gauss"))
