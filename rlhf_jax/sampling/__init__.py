"""KV-cache sampling."""

from rlhf_jax.sampling.config import DecodeState, SampleOutput, SamplingConfig
from rlhf_jax.sampling.methods import Greedy, Truncated, make_method
from rlhf_jax.sampling.sampler import left_pad, row_keys, sample, sample_mixture

__all__ = ["DecodeState", "Greedy", "SampleOutput", "SamplingConfig", "Truncated",
           "left_pad", "make_method", "row_keys", "sample", "sample_mixture"]
