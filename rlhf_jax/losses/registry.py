"""The loss registry: `register(name, family)` decorator, `get`, `names`."""

from rlhf_jax.registry import Registry

REGISTRY = Registry("loss")
register = REGISTRY.register
get = REGISTRY.get
names = REGISTRY.names
declaration = REGISTRY.declaration
