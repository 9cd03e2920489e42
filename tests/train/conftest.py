"""Trainer tests compile the same small programs many times, in several processes (xdist workers,
kill/resume and two-process subprocesses): they share JAX's persistent compilation cache.

The cache lives in the system temp directory and outlives the session (a rerun compiles little);
entries are keyed by program, JAX version and flags, so a stale entry is never used.
"""

import os
import tempfile
from pathlib import Path

import jax
import pytest

CACHE = Path(tempfile.gettempdir()) / "sparseformer-test-jax-cache"


@pytest.fixture(autouse=True, scope="session")
def compilation_cache():
    CACHE.mkdir(exist_ok=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(CACHE)  # inherited by the subprocess tests
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    jax.config.update("jax_compilation_cache_dir", str(CACHE))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    yield
