"""DAPO dynamic sampling at a fixed compiled shape: the learn phase sees only groups whose
rewards are not all equal."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.train import online, phases
from rlhf_jax.train.rl_config import RLSettings
from test_online import prompts, setup


def _half_constant(prompt_ids, completion_ids, completion_mask, extras):
  """Rows of prompts flagged `constant` always score 1 (zero-variance groups); the others
  score the fraction of even completion tokens (varies within a group)."""
  m = completion_mask.astype(jnp.float32)
  even = jnp.sum((completion_ids % 2 == 0) * m, 1) / jnp.maximum(jnp.sum(m, 1), 1.0)
  return jnp.where(extras["constant"] > 0, 1.0, even)


def test_select_groups_keeps_informative_groups_in_order():
  g = 2
  rewards = jnp.asarray([1., 1., 0., 1., 2., 2., 3., 0.])  # groups: const, varied, const, varied
  n, t = 8, 3
  ro = phases.Rollout(prompt_ids=jnp.arange(n)[:, None], prompt_mask=jnp.ones((n, 1), bool),
                      completion_ids=jnp.arange(n * t).reshape(n, t),
                      completion_mask=jnp.ones((n, t), bool), loss_mask=jnp.ones((n, t)),
                      logps=jnp.zeros((n, t)), lengths=jnp.full((n,), t),
                      finished=jnp.ones((n,), bool))
  sc = phases.Scores(rewards=rewards, each=rewards[:, None])
  ro2, sc2, ex2, chosen, informative = phases.select_groups(
      ro, sc, {"x": jnp.arange(n)}, group_size=g, keep=2)
  np.testing.assert_array_equal(np.asarray(chosen), [1, 3])
  np.testing.assert_array_equal(np.asarray(sc2.rewards), [0., 1., 3., 0.])
  np.testing.assert_array_equal(np.asarray(ro2.prompt_ids[:, 0]), [2, 3, 6, 7])
  np.testing.assert_array_equal(np.asarray(ex2["x"]), [2, 3, 6, 7])
  assert bool(jnp.all(informative))
  # Not enough informative groups: the rest are filled with equal-reward ones.
  _, _, _, chosen, informative = phases.select_groups(ro, sc, {}, group_size=g, keep=3)
  np.testing.assert_array_equal(np.asarray(chosen), [1, 3, 0])
  np.testing.assert_array_equal(np.asarray(informative), [True, True, False])


def test_step_learns_only_on_non_zero_variance_groups_at_one_compiled_shape():
  model, _, sc, opt, _, state = setup()
  settings = RLSettings.from_config(dict(group_size=4, dynamic_sampling=2, kl_coef=0.0))
  state = online.init_state(state.params, opt, jax.random.PRNGKey(1), settings)
  update = online.make_update(model, [_half_constant], opt, settings, sc, donate=False)
  for seed in range(2):
    batch = prompts(n=8, seed=seed)  # 2 x 4 prompts sampled, 4 learnt on
    batch["constant"] = np.asarray([1, 0, 1, 0, 1, 0, 1, 0], np.float32)
    state, m = update(state, batch, jax.random.PRNGKey(seed))
    assert float(m["zero_variance_groups"]) == 0.0  # of the groups the learn phase saw
    assert float(m["selected_informative_groups"]) == 1.0
    assert float(m["num_tokens"]) <= 4 * 4 * 4  # 4 groups of 4 samples, 4 tokens at most
  assert update._cache_size() == 1  # pylint: disable=protected-access


def test_bad_dynamic_sampling_is_named():
  with pytest.raises(ValueError, match=r"rl\.dynamic_sampling"):
    RLSettings.from_config(dict(group_size=1, dynamic_sampling=2))
  with pytest.raises(ValueError, match=r"rl\.dynamic_sampling"):
    RLSettings.from_config(dict(group_size=4, dynamic_sampling=-1))
