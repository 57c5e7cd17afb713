import os
import shutil
import tempfile

import jax
import pytest

_CACHE_VARS = {
  "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
  "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
}


def pytest_configure(config):
  """One persistent compilation cache for the whole run.

  Many tests compile the same programs (the battery's cells, the trainer's resume
  runs); JAX's persistent cache turns every compilation after the first into a disk
  read. The directory is made by the first process (the xdist controller) and
  passed through the environment to its workers and to the fake-device
  subprocesses, and removed at the end of the run.
  """
  if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="sam_optax_jax_cache_")
    config._sam_optax_cache = os.environ["JAX_COMPILATION_CACHE_DIR"]
  for name, value in _CACHE_VARS.items():
    os.environ.setdefault(name, value)
  # The suite's programs are small: most of its time is XLA:CPU compiling them. The lowest
  # backend optimisation level compiles about 20% faster (test_sharpness.py); the suite
  # passes at both levels. The fake-device subprocesses inherit the flag.
  # SAM_OPTAX_TEST_XLA_DEFAULTS=1 runs the suite at XLA's default level instead.
  if not os.environ.get("SAM_OPTAX_TEST_XLA_DEFAULTS"):
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_backend_optimization_level" not in flags:
      os.environ["XLA_FLAGS"] = f"{flags} --xla_backend_optimization_level=0".strip()
  jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_unconfigure(config):
  path = getattr(config, "_sam_optax_cache", None)
  if path:
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def x64():
  """Runs a test with float64 enabled, restoring the default afterwards."""
  with jax.enable_x64(True):
    yield
