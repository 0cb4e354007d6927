"""Training loops: one online (fused RL step), one offline (SFT / preference / RM)."""
