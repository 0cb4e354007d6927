"""Flax decoder models, heads, and weight I/O."""
