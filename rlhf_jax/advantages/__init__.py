"""Advantage estimators: `get(name)` returns the estimator, `names()` lists them."""

from rlhf_jax.advantages.registry import REGISTRY, get, names, register
