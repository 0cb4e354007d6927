"""rlhf_jax.train.optim: the global-norm clip against optax's and a float64 reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax.train import optim


def _tree(scale):
  k1, k2 = jax.random.split(jax.random.key(0))
  return {"a": scale * jax.random.normal(k1, (7, 5)), "b": [scale * jax.random.normal(k2, (3,))]}


@pytest.mark.parametrize("scale", [1e-3, 0.5, 30.0])
def test_clip_by_global_norm_matches_reference_and_optax(scale):
  g = _tree(scale)
  leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(g)]
  norm = np.sqrt(sum((x ** 2).sum() for x in leaves))
  factor = min(1.0, 2.0 / norm)
  got, _ = jax.jit(optim.clip_by_global_norm(2.0).update)(g, optax.EmptyState())
  theirs, _ = optax.clip_by_global_norm(2.0).update(g, optax.EmptyState())
  for a, b, x in zip(jax.tree.leaves(got), jax.tree.leaves(theirs), leaves):
    np.testing.assert_allclose(np.asarray(a, np.float64), x * factor, rtol=1e-6)
    np.testing.assert_allclose(a, b, rtol=1e-6)
  assert np.sqrt(sum((np.asarray(a, np.float64) ** 2).sum() for a in jax.tree.leaves(got))) \
      <= 2.0 * (1 + 1e-6)


def test_clip_propagates_non_finite_gradients():
  g = {"a": jnp.array([1.0, jnp.nan])}
  got, _ = optim.clip_by_global_norm(1.0).update(g, optax.EmptyState())
  assert np.isnan(np.asarray(got["a"])).all()


def test_clip_rejects_non_positive_norm():
  with pytest.raises(ValueError, match="max_grad_norm"):
    optim.clip_by_global_norm(0.0)


def test_make_optimizer_with_clip_matches_optax_chain():
  params = _tree(1.0)
  grads = _tree(10.0)
  ours = optim.make_optimizer(dict(name="adamw", learning_rate=1e-2, weight_decay=0.0,
                                   max_grad_norm=1.0))
  ref = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=0.0))
  u1, _ = ours.update(grads, ours.init(params), params)
  u2, _ = ref.update(grads, ref.init(params), params)
  for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("key,value,msg", [
    ("learning_rate", -1e-4, r"optim\.learning_rate=-0\.0001 must be a finite number >= 0"),
    ("learning_rate", float("nan"), r"optim\.learning_rate=nan must be a finite number"),
    ("warmup_steps", -1, r"optim\.warmup_steps=-1 must be >= 0"),
    ("weight_decay", -0.1, r"optim\.weight_decay=-0\.1 must be >= 0"),
    ("b1", 1.0, r"optim\.b1=1\.0 must be in \[0, 1\)"),
    ("eps", -1e-8, r"optim\.eps=-1e-08 must be >= 0"),
])
def test_make_optimizer_rejects_out_of_range_settings(key, value, msg):
  cfg = {"learning_rate": 1e-3, key: value}
  with pytest.raises(ValueError, match=msg):
    optim.make_optimizer(cfg)
  optim.make_optimizer({"learning_rate": 0.0})  # a zero rate (frozen weights) is allowed
