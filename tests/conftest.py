"""Test-session settings: a throwaway persistent XLA cache, so programs that several tests compile
identically (the same simulate configuration) are compiled once per session.

The cache directory is shared by the session's processes: the first one (the xdist controller, or
the only process) creates it and passes it to the workers through the environment, and removes it
at the end. One directory matters twice over: a program compiled on one worker is read by the
other (worksteal runs a module's tests, and its module-scoped fixtures, on both), and JAX puts the
cache directory into the compile options it hashes, so processes with different directories could
never share an entry even by copying.

The session also compiles at XLA's backend optimization level 0 (``tests/helpers.py``,
``TEST_XLA_FLAGS``): the same functions, compiled about a quarter faster."""

import os
import shutil
import tempfile

import jax

from tests.helpers import use_test_xla_flags

use_test_xla_flags()  # before any computation creates JAX's CPU client

_ENV = "FEDJAX_SIM_TEST_XLA_CACHE"
_OWNER = _ENV not in os.environ  # workers inherit the controller's directory
if _OWNER:
  os.environ[_ENV] = tempfile.mkdtemp(prefix="fedjax_sim_test_xla_cache_")
_CACHE = os.environ[_ENV]


def pytest_configure(config):
  jax.config.update("jax_compilation_cache_dir", _CACHE)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def pytest_unconfigure(config):
  if _OWNER:
    shutil.rmtree(_CACHE, ignore_errors=True)
