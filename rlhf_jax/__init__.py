"""rlhf_jax: a JAX-native, functional library for RLHF and preference optimisation."""

__version__ = "0.1.0"
