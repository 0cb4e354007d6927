"""The advantage-estimator registry."""

from rlhf_jax.registry import Registry

REGISTRY = Registry("advantage estimator")
register = REGISTRY.register
get = REGISTRY.get
names = REGISTRY.names
declaration = REGISTRY.declaration
