"""The environment of the test processes and of the subprocesses tests launch.

Tests compile many small programs: XLA's backend optimisations are off (at -O0 a step compiles
about 3x faster; its matmuls are library calls either way), its CPU fusion emitters are off
(the older loop emitters compile a step in less than half the time at -O0), and every process of a test run
shares one persistent compilation cache, so a program compiled by one pytest worker or CLI
subprocess is loaded, not recompiled, by the next. Benchmarks run with the default flags.
"""

from __future__ import annotations

import os

FAST_COMPILE_FLAGS = ("--xla_backend_optimization_level=0 "
                      "--xla_llvm_disable_expensive_passes=true "
                      "--xla_cpu_use_fusion_emitters=false")
CACHE_ENV = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
             "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def xla_flags(devices: int) -> str:
  return f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE_FLAGS}"


def subprocess_env(devices: int = 1, **extra: str) -> dict:
  """os.environ for a CPU subprocess with `devices` fake devices, the fast-compile flags and
  the run's compilation cache (set by tests/conftest.py), plus `extra`."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(devices), **CACHE_ENV)
  env.update(extra)
  return env


def atomic_cache_writes() -> None:
  """Makes this process write cache entries whole (a temporary file, then a rename), so that
  a pytest worker never reads an entry another process is still writing. (JAX falls back to
  compiling when an entry does not load, so this only saves work.)"""
  try:
    from jax._src import lru_cache  # pylint: disable=g-import-not-at-top
    cls = lru_cache.LRUCache
  except (ImportError, AttributeError):
    return
  if getattr(cls, "_atomic_put", False):
    return
  put = cls.put

  def atomic_put(self, key, value):
    if getattr(self, "eviction_enabled", True):
      return put(self, key, value)
    path = self.path / f"{key}{lru_cache._CACHE_SUFFIX}"  # pylint: disable=protected-access
    if path.exists():
      return None
    tmp = self.path / f".{key}.{os.getpid()}.tmp"
    tmp.write_bytes(value)
    os.replace(tmp, path)
    return None
  cls.put = atomic_put
  cls._atomic_put = True  # pylint: disable=protected-access
