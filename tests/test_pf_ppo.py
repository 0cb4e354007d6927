"""PF-PPO policy filtration in the fused step (`rl.sample_filter`): the filter phase against
numpy, keeping every sample equals no filter, and the step trains on the kept samples only."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.train import online, phases
from rlhf_jax.train.rl_config import RLSettings
from test_online import prompts, setup


def _rollout_and_scores(rewards, t=3):
  n = rewards.shape[0]
  ro = phases.Rollout(prompt_ids=jnp.ones((n, 2), jnp.int32), prompt_mask=jnp.ones((n, 2), bool),
                      completion_ids=jnp.ones((n, t), jnp.int32),
                      completion_mask=jnp.ones((n, t), bool), loss_mask=jnp.ones((n, t)),
                      logps=jnp.zeros((n, t)), lengths=jnp.full((n,), t),
                      finished=jnp.ones((n,), bool))
  sc = phases.Scores(rewards=jnp.asarray(rewards, jnp.float32),
                     each=jnp.asarray(rewards, jnp.float32)[:, None])
  return ro, sc


@pytest.mark.parametrize("kw", [dict(num_best=1), dict(num_best=1, num_worst=1),
                                dict(num_best=2, num_worst=1)])
def test_filter_keeps_the_best_and_worst_of_each_group(kw):
  rng = np.random.default_rng(0)
  g = 5
  rewards = rng.permutation(20).astype(np.float64)  # distinct: no ties
  ro, sc = _rollout_and_scores(rewards)
  new, kept = phases.filter_samples(ro, sc, jax.random.PRNGKey(0), group_size=g, **kw)
  want = np.zeros(20, bool)
  for s in range(0, 20, g):
    order = np.argsort(rewards[s:s + g])
    want[s + order[g - kw.get("num_best", 0):]] = True
    want[s + order[:kw.get("num_worst", 0)]] = True
  np.testing.assert_array_equal(np.asarray(kept), want)
  np.testing.assert_array_equal(np.asarray(new.loss_mask), np.repeat(want[:, None], 3, 1) * 1.0)


def test_best_random_keeps_the_best_and_one_other():
  rewards = np.arange(12, dtype=np.float64)[::-1].copy()
  ro, sc = _rollout_and_scores(rewards)
  counts = np.zeros(12)
  for seed in range(20):
    _, kept = phases.filter_samples(ro, sc, jax.random.PRNGKey(seed), group_size=4, num_best=1,
                                    num_random=1)
    kept = np.asarray(kept).reshape(3, 4)
    assert (kept.sum(1) == 2).all() and kept[:, 0].all()  # the best is first in each group
    counts += kept.reshape(-1)
  assert (counts.reshape(3, 4)[:, 1:] > 0).all()  # every other sample is drawn sometimes


def _step(**filt):
  model, settings, sc, opt, rewards, state = setup(sample_filter=filt)
  update = online.make_update(model, rewards, opt, settings, sc, donate=False)
  return update(state, prompts(), jax.random.PRNGKey(3))


def test_keeping_every_sample_equals_no_filter_and_best_of_n_differs():
  plain, m0 = _step()
  all_kept, m1 = _step(num_best=4)
  assert float(m1["kept_fraction"]) == 1.0 and "kept_fraction" not in m0
  for a, b in zip(jax.tree.leaves(plain.params), jax.tree.leaves(all_kept.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)
  best, m2 = _step(num_best=1)
  assert float(m2["kept_fraction"]) == 0.25
  moved = max(float(jnp.max(jnp.abs(a - b)))
              for a, b in zip(jax.tree.leaves(plain.params), jax.tree.leaves(best.params)))
  assert moved > 1e-6


def test_bad_sample_filter_is_named():
  with pytest.raises(ValueError, match="rl.sample_filter has unknown keys"):
    RLSettings.from_config(dict(group_size=4, sample_filter={"best": 1}))
  with pytest.raises(ValueError, match="keeps 5 samples per group, more than rl.group_size=4"):
    RLSettings.from_config(dict(group_size=4, sample_filter={"num_best": 3, "num_worst": 2}))
  with pytest.raises(ValueError, match="rl.objective='preference' builds its own pairs"):
    RLSettings.from_config(dict(group_size=4, objective="preference",
                                sample_filter={"num_best": 1}))
