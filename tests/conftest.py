"""Test configuration: 8 fake CPU devices, float64 available, strict ranks."""

import atexit
import os
import shutil
import tempfile

# The repository root (for `experiments` and `benchmarks`) is on sys.path through setup.cfg's
# `pythonpath`; tests/ through pytest's rootdir conftest import.
import env_testlib

# Must be set before jax is imported anywhere: 8 fake devices and fast compiles
# (tests/env_testlib.py).
os.environ.setdefault("XLA_FLAGS", env_testlib.xla_flags(8))
# One persistent compilation cache for the whole run: created by the first process that imports
# this file (pytest, or xdist's controller before it starts its workers), inherited by the
# workers and every subprocess a test launches, removed when that process ends.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="rlhf_jax_xla_cache_")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)
for _k, _v in env_testlib.CACHE_ENV.items():
  os.environ.setdefault(_k, _v)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# With JAX_PLATFORMS=cuda, float32 matmuls would run as TF32 (about 1e-3 relative), which the
# 1e-5 comparisons with float32/float64 references do not allow; no change on CPU.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", False)
env_testlib.atomic_cache_writes()
