"""Reward functions, verifiers and reward shaping."""
