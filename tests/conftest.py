"""Test-session settings: a throwaway persistent XLA cache, so programs that several tests compile
identically (the same simulate configuration) are compiled once per session."""

import shutil
import tempfile

import jax

_CACHE = tempfile.mkdtemp(prefix="fedjax_sim_test_xla_cache_")


def pytest_configure(config):
  jax.config.update("jax_compilation_cache_dir", _CACHE)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def pytest_unconfigure(config):
  shutil.rmtree(_CACHE, ignore_errors=True)
