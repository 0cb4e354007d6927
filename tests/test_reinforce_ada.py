"""Reinforce-Ada in the fused step (`rl.adaptive_sampling`, `rl.advantage="reinforce_ada"`):
the selection rule against a plain-Python reference, the estimator, the step's one
compilation and its selected rows, and the named config errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.advantages import allocation
from rlhf_jax.train import online
from rlhf_jax.train.rl_config import RLSettings
from test_online import prompts, setup


def _reference(rewards, g, rounds, threshold, balanced):
  """Reinforce-Ada round by round in Python: sample rounds until done, then keep G."""
  rows, means, used = [], [], []
  for i, r in enumerate(np.asarray(rewards, np.float64).reshape(-1, rounds * g)):
    k = rounds
    for j in range(1, rounds + 1):
      pool = r[:j * g]
      npos, nneg = int(np.sum(pool > threshold)), int(np.sum(pool <= threshold))
      done = (npos >= g // 2 and nneg >= g - g // 2) if balanced else npos >= 1
      if done:
        k = j
        break
    pool = r[:k * g]
    pos = [t for t in range(k * g) if pool[t] > threshold]
    neg = [t for t in range(k * g) if pool[t] <= threshold]
    take_pos = min(len(pos), max(g // 2, g - len(neg)))
    kept = sorted(pos[:take_pos] + neg[:g - take_pos])
    assert len(kept) == g
    rows += [i * rounds * g + t for t in kept]
    means.append(pool.mean())
    used.append(k)
  return np.asarray(rows), np.asarray(means), np.asarray(used)


@pytest.mark.parametrize("balanced", [True, False])
@pytest.mark.parametrize("g,rounds", [(4, 3), (5, 2)])
def test_selection_matches_a_round_by_round_reference(g, rounds, balanced):
  rng = np.random.default_rng(g * 10 + rounds)
  probs = np.repeat([0.0, 1.0, 0.1, 0.5, 0.9, 0.3], rounds * g)  # all-fail, all-pass, mixed
  rewards = (rng.random(probs.shape) < probs).astype(np.float32)
  rewards[2 * rounds * g::7] = 0.8  # just above the threshold: positive (not in the first two)
  sel = jax.jit(lambda r: allocation.reinforce_ada_select(
      r, group_size=g, rounds=rounds, balanced=balanced))(jnp.asarray(rewards))
  rows, means, used = _reference(rewards, g, rounds, 0.7, balanced)
  np.testing.assert_array_equal(np.asarray(sel.rows), rows)
  np.testing.assert_allclose(np.asarray(sel.prompt_means), means, rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(sel.rounds_used), used)
  assert len(set(used.tolist())) > 1  # some prompts stop early, others use every round


def test_estimator_subtracts_the_pool_mean_and_defaults_to_the_group_mean():
  r = jnp.asarray([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
  out = allocation.reinforce_ada(r, group_size=3, prompt_means=jnp.asarray([0.25, 0.5]))
  np.testing.assert_allclose(np.asarray(out), [0.75, -0.25, -0.25, 0.5, 0.5, 0.5])


def test_step_learns_on_the_selected_rows_with_one_compilation():
  model, _, sc, opt, rewards, _ = setup()
  settings = RLSettings.from_config(dict(group_size=4, advantage="reinforce_ada",
                                         adaptive_sampling={"rounds": 3}))
  state = online.init_state(model.init(jax.random.PRNGKey(0)), opt, jax.random.PRNGKey(1),
                            settings)
  update = online.make_update(model, rewards, opt, settings, sc)
  batch = {k: jnp.asarray(v) for k, v in prompts().items()}
  for step in range(2):
    state, m = update(state, batch, jax.random.PRNGKey(step))
  m = jax.device_get(m)
  assert 1.0 <= float(m["adaptive_rounds_used"]) <= 3.0
  assert np.isfinite(float(m["loss"])) and int(state.step) == 2
  assert update._cache_size() == 1  # pylint: disable=protected-access


@pytest.mark.parametrize("rl, match", [
    (dict(adaptive_sampling={"rounds": 1}), r"rounds=1: give an int >= 2"),
    (dict(adaptive_sampling={"rounds": 2, "rnds": 3}), r"unknown keys \['rnds'\]"),
    (dict(adaptive_sampling={"rounds": 2}, dynamic_sampling=2), r"rl\.dynamic_sampling"),
    (dict(adaptive_sampling={"rounds": 2}, sample_filter={"num_best": 1}),
     r"rl\.sample_filter"),
    (dict(adaptive_sampling={"rounds": 2, "balanced": "yes"}), r"balanced a bool"),
])
def test_bad_adaptive_configs_are_named(rl, match):
  with pytest.raises(ValueError, match=match):
    RLSettings.from_config(dict(dict(group_size=4), **rl))
