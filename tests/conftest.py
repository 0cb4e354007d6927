"""Test configuration: 8 fake CPU devices, float64 available, strict ranks."""

import os
import sys

# Tests import `experiments` and `benchmarks` as packages of the repository root. `python -m
# pytest` (from the root) puts the root on sys.path; a bare `pytest` does not.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

# Must be set before jax is imported anywhere.
# The backend's LLVM optimisations are off: tests compile many small programs, and at -O0 a
# step compiles about 3x faster (its matmuls are library calls either way). Benchmarks run
# with the default flags.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                      "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# With JAX_PLATFORMS=cuda, float32 matmuls would run as TF32 (about 1e-3 relative), which the
# 1e-5 comparisons with float32/float64 references do not allow; no change on CPU.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", False)
