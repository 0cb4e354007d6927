"""Knapsack RL in the online step (`rl.knapsack`): the ragged GRPO estimator against float64,
the allocation and success-rate table against numpy, the step at a fixed shape, named errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax import advantages
from rlhf_jax.advantages import allocation
from rlhf_jax.train import knapsack, online
from rlhf_jax.train.rl_config import RLSettings
from test_online import prompts, setup

G = 4


def _ragged_reference(r, ids, eps=1e-6):
  out = np.zeros_like(r)
  for g in np.unique(ids):
    sel = ids == g
    if sel.sum() > 1:
      x = r[sel]
      out[sel] = (x - x.mean()) / (x.std(ddof=1) + eps)
  return out


def test_grpo_ragged_matches_a_float64_reference_and_grpo_on_equal_groups():
  rng = np.random.default_rng(0)
  r = rng.normal(size=13)
  ids = rng.permutation(np.repeat([0, 1, 2, 3, 4], [5, 1, 3, 2, 2]))  # any order, one single
  r[ids == 3] = 0.7  # an all-equal group
  got = jax.jit(advantages.get("grpo_ragged"))(jnp.asarray(r, jnp.float32),
                                              group_ids=jnp.asarray(ids))
  want = _ragged_reference(r, ids)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
  assert not np.any(np.asarray(got)[(ids == 1) | (ids == 3)])
  flat = rng.normal(size=12).astype(np.float32)
  np.testing.assert_allclose(
      np.asarray(advantages.get("grpo_ragged")(jnp.asarray(flat),
                                               group_ids=jnp.asarray(np.arange(12) // 4))),
      np.asarray(advantages.get("grpo")(jnp.asarray(flat), group_size=4)), rtol=1e-5, atol=1e-6)


def _table(rates, seen, size=8):
  st = knapsack.init(size)
  idx = np.arange(len(rates))
  return knapsack.AllocState(rates=st.rates.at[idx].set(jnp.asarray(rates, jnp.float32)),
                             seen=st.seen.at[idx].set(jnp.asarray(seen)))


def test_allocation_reads_each_records_last_success_rate():
  st = _table([0.0, 0.3, 1.0, 0.9, 0.6], [True, True, True, False, True])
  batch = {"record_index": jnp.asarray([2, 0, 1, 3, 4], jnp.int32)}
  alloc = jax.jit(lambda s, b: knapsack.allocate(s, b, group_size=G, min_samples=2,
                                                 max_samples=8))(st, batch)
  p = np.asarray([1.0, 0.0, 0.3, 0.5, 0.6], np.float32)  # record 3 unseen: 0.5
  want = np.asarray(allocation.knapsack_allocate(jnp.asarray(p), budget=5 * G, min_samples=2,
                                                 max_samples=8))
  np.testing.assert_array_equal(np.asarray(alloc.counts), want)
  assert want.sum() == 5 * G and want[0] == want[1] == 2  # solved / failed: the minimum
  np.testing.assert_array_equal(np.asarray(alloc.rows), np.repeat(np.arange(5), want))
  gathered = knapsack.gather({"prompt_ids": jnp.arange(5)[:, None] * 10}, alloc.rows)
  np.testing.assert_array_equal(np.asarray(gathered["prompt_ids"])[:, 0],
                                np.repeat(np.arange(5), want) * 10)


def test_update_records_the_success_fraction_of_each_prompts_samples():
  st = _table([0.2, 0.2, 0.2], [True, False, False], size=6)
  rows = jnp.asarray([0, 0, 0, 1, 1, 1, 1, 1], jnp.int32)
  rewards = jnp.asarray([1.0, 0.0, 0.6, 0.0, 0.0, 0.9, 0.4, 1.0])
  new = knapsack.update(st, {"record_index": jnp.asarray([4, 1], jnp.int32)}, rewards, rows,
                        threshold=0.5)
  want = np.full(6, 0.5, np.float32)
  want[:3] = 0.2
  want[4], want[1] = 2 / 3, 2 / 5
  np.testing.assert_allclose(np.asarray(new.rates), want, rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(new.seen), [True, True, False, False, True, False])


@pytest.fixture(scope="module")
def step():
  model, _, sc, _, rewards, st = setup()
  settings = RLSettings.from_config(dict(group_size=G, advantage="grpo_ragged", kl_coef=0.0,
                                         knapsack={"min_samples": 2, "max_samples": 8}))
  opt = optax.adam(1e-2)
  state = online.init_state(st.params, opt, jax.random.PRNGKey(1), settings, num_records=6)
  return online.make_update(model, rewards, opt, settings, sc, donate=False), state


def _batch(seed, records=(0, 1, 2, 3)):
  b = {k: jnp.asarray(v) for k, v in prompts(seed=seed).items()}
  return dict(b, record_index=jnp.asarray(records, jnp.int32))


def test_the_step_allocates_from_the_table_at_one_compiled_shape(step):
  update, state = step
  # Records 0 and 1 were solved / failed every time: they get min_samples, the rest the budget.
  state = state.replace(alloc_state=_table([1.0, 0.0], [True, True], size=6))
  new, m = update(state, _batch(0), jax.random.PRNGKey(0))
  assert float(m["knapsack_min_samples"]) == 2 and float(m["knapsack_max_samples"]) == 6
  assert float(m["num_tokens"]) > 0 and np.isfinite(float(m["pg_loss"]))
  seen = np.asarray(new.alloc_state.seen)
  np.testing.assert_array_equal(seen, [True] * 4 + [False] * 2)
  rates = np.asarray(new.alloc_state.rates)
  counts = np.asarray([2, 2, 6, 6])
  assert all(np.isclose(rates[i] * counts[i], round(rates[i] * counts[i])) for i in range(4))
  np.testing.assert_array_equal(rates[4:], knapsack.UNSEEN_RATE)
  for seed in (1, 2):  # the next allocations read the new table: same program
    new, m = update(new, _batch(seed, (1, 2, 4, 5)), jax.random.PRNGKey(seed))
    assert np.isfinite(float(m["pg_loss"]))
  assert update._cache_size() == 1  # pylint: disable=protected-access


def test_the_step_names_a_batch_without_record_index(step):
  update, state = step
  batch = _batch(0)
  del batch["record_index"]
  with pytest.raises(ValueError, match="record_index"):
    update(state, batch, jax.random.PRNGKey(0))


@pytest.mark.parametrize("rl,match", [
    (dict(advantage="grpo", knapsack={"min_samples": 2}), "grpo_ragged"),
    (dict(advantage="grpo_ragged", knapsack={"min_sample": 2}), "unknown keys"),
    (dict(advantage="grpo_ragged", knapsack={"min_samples": 5}), "min_samples"),
    (dict(advantage="grpo_ragged", knapsack={"max_samples": 3}), "max_samples"),
    (dict(advantage="grpo_ragged", knapsack={"min_samples": 2},
          adaptive_sampling={"rounds": 2}), "adaptive_sampling"),
])
def test_bad_knapsack_configs_are_named(rl, match):
  with pytest.raises(ValueError, match=match):
    RLSettings.from_config(dict(group_size=G, **rl))


def test_init_state_needs_the_number_of_records():
  settings = RLSettings.from_config(dict(group_size=G, advantage="grpo_ragged",
                                         knapsack={"min_samples": 2}))
  with pytest.raises(ValueError, match="num_records"):
    online.init_state({"w": jnp.zeros(2)}, optax.sgd(0.1), jax.random.PRNGKey(0), settings)
