"""Data/compute allocation rules vs brute-force numpy references."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.advantages import allocation as al


def test_dynamic_sampling_filter():
  r = jnp.asarray([1.0, 1, 1, 1, 0, 1, 0, 0, 0, 0, 0, 0])
  keep = jax.jit(lambda x: al.dynamic_sampling_filter(x, group_size=4))(r)
  assert keep.tolist() == [False, True, False]
  assert al.dynamic_sampling_filter(r, group_size=4, per_sample=True).tolist() == \
      [False] * 4 + [True] * 4 + [False] * 4
  assert al.dynamic_sampling_filter(jnp.asarray([0.5, 0.50001]), group_size=2,
                                    atol=1e-3).tolist() == [False]
  with pytest.raises(ValueError, match="group_size=5 does not divide"):
    al.dynamic_sampling_filter(r, group_size=5)


def test_pf_ppo_filter():
  r = jnp.asarray([0.1, 0.9, 0.5, 0.3, 2.0, -1.0, 0.0, 1.0])
  assert al.pf_ppo_filter(r, group_size=4).tolist() == [0, 1, 0, 0, 1, 0, 0, 0]
  bw = jax.jit(lambda x: al.pf_ppo_filter(x, group_size=4, num_best=1, num_worst=1))(r)
  assert bw.tolist() == [1, 1, 0, 0, 1, 1, 0, 0]
  br = al.pf_ppo_filter(r, group_size=4, num_best=1, num_random=2, rng=jax.random.key(0))
  br = np.asarray(br).reshape(2, 4)
  assert br.sum(1).tolist() == [3, 3] and br[0, 1] and br[1, 0]
  with pytest.raises(ValueError, match="rng"):
    al.pf_ppo_filter(r, group_size=4, num_random=1)
  with pytest.raises(ValueError, match="group_size"):
    al.pf_ppo_filter(r, group_size=4, num_best=3, num_worst=2)


def ref_value(n, p):
  return (1 - p ** n - (1 - p) ** n) * p * (1 - p) ** 2


def test_knapsack_value_and_allocation_is_optimal():
  p = np.array([0.05, 0.5, 0.8, 0.3])
  np.testing.assert_allclose(al.knapsack_value(jnp.asarray([3, 5, 1, 8]), jnp.asarray(p)),
                             ref_value(np.array([3, 5, 1, 8]), p), rtol=1e-5)
  budget, lo, hi = 16, 2, 8
  best = max((ref_value(np.array(c), p).sum(), c)
             for c in itertools.product(range(lo, hi + 1), repeat=4) if sum(c) <= budget)
  alloc = jax.jit(lambda x: al.knapsack_allocate(x, budget=budget, min_samples=lo,
                                                 max_samples=hi))(jnp.asarray(p, jnp.float32))
  assert int(alloc.sum()) == budget and alloc.min() >= lo and alloc.max() <= hi
  np.testing.assert_allclose(ref_value(np.asarray(alloc), p).sum(), best[0], rtol=1e-6)
  with pytest.raises(ValueError, match="budget"):
    al.knapsack_allocate(jnp.asarray(p, jnp.float32), budget=7, min_samples=2)


def test_reinforce_ada_rules():
  pos = jnp.asarray([0, 2, 3, 1, 4])
  neg = jnp.asarray([5, 2, 1, 0, 2])
  assert jax.jit(lambda p, n: al.reinforce_ada_active(p, n, n=4))(pos, neg).tolist() == [True, False, True, True, False]
  assert al.reinforce_ada_active(pos, neg, balanced=False).tolist() == [True, False, False,
                                                                         False, False]
  r = jnp.asarray([1.0, 0, 1, 0])
  np.testing.assert_allclose(
      al.reinforce_ada_advantages(r, prompt_means=jnp.asarray([0.25, 0.75]), group_size=2),
      [0.75, -0.25, 0.25, -0.75])


def test_pcl_select():
  v = jnp.asarray([0.05, 0.45, 0.9, 0.6, 0.52])
  sel = jax.jit(lambda x: al.pcl_select(x, num_select=2))(v)
  np.testing.assert_allclose(sel.score, -np.abs(np.asarray(v) - 0.5), rtol=1e-6)
  assert sel.keep.tolist() == [False, True, False, False, True]
  with pytest.raises(ValueError, match="num_select"):
    al.pcl_select(v, num_select=0)


def test_knapsack_value_grads_and_edges():
  from jax.test_util import check_grads
  with jax.enable_x64(True):
    check_grads(lambda p: jnp.sum(al.knapsack_value(jnp.asarray([2.0, 5.0, 9.0]), p)),
                (jnp.asarray([0.1, 0.5, 0.85]),), order=1, modes=("rev",))
  # p ∈ {0, 1} (no gradient signal possible) and N = 1 (one sample never has both outcomes)
  np.testing.assert_allclose(al.knapsack_value(jnp.asarray([4, 4, 1]), jnp.asarray([0.0, 1.0, 0.3])),
                             [0.0, 0.0, 0.0], atol=1e-7)
  r = jnp.asarray(np.random.default_rng(0).normal(size=8))
  np.testing.assert_allclose(
      al.reinforce_ada_advantages(r, prompt_means=jnp.asarray([r[:4].mean(), r[4:].mean()]),
                                  group_size=4),
      np.concatenate([np.asarray(r[:4]) - np.asarray(r[:4]).mean(),
                      np.asarray(r[4:]) - np.asarray(r[4:]).mean()]), rtol=1e-5, atol=1e-6)
