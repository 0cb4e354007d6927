"""Advantage estimators: `get(name)` returns the estimator, `names()` lists them."""

from rlhf_jax.advantages.registry import REGISTRY, declaration, get, names, register

# Importing the modules registers their estimators.
# pylint: disable=g-bad-import-order,unused-import,wrong-import-position
from rlhf_jax.advantages import group, outcome, token, bnpo, reweight, allocation, turn, hidden_reward  # noqa: F401,E402,E501
