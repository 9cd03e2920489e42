"""Test-wide setup, before JAX is first imported: 8 fake CPU devices (for sharding tests), and
XLA's CPU backend set to compile fast rather than well. Tests run tiny shapes, so compiling
dominates their time (backend compilation was 73% of the model and chunking tests' time):
- optimisation level 0 compiles the attention kernels 2-3x faster;
- `--xla_cpu_use_fusion_emitters=false` takes XLA's older elemental emitters for loop and
  reduction fusions instead of its MLIR fusion pipeline: backend compilation 42% shorter on those
  tests, and the whole suite from an empty compilation cache 883 -> 607 s on 2 cores.
Both change how XLA generates code, not the math: rounding may differ in the last bits (a 200-step
training run ended 0.4298 vs 0.4335 in loss), so every comparison in the tests is between programs
compiled alike or within a tolerance. Users' runs, the demo and the benchmarks keep XLA's defaults. Speed is measured by benchmarks, never by tests, so nothing here
depends on how fast the compiled code runs. (XLA aborts on a flag it does not know: when widening
the JAX pin in pyproject.toml, check this one still exists.)"""

import os
import tempfile

os.environ.setdefault(
    "XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
    " --xla_cpu_use_fusion_emitters=false"
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Tests compile the same small programs many times, in several processes (xdist workers, the
# trainer's kill/resume and two-process subprocesses): they share JAX's persistent compilation
# cache. It lives in the system temp directory and outlives the session (a rerun compiles
# little); entries are keyed by program, JAX version and flags, so a stale one is never used.
_CACHE = os.path.join(tempfile.gettempdir(), "sparseformer-test-jax-cache")
os.makedirs(_CACHE, exist_ok=True)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def pytest_collection_modifyitems(config, items):
    """Tests marked `slow` (the end-to-end ones, tens of seconds each) run first, the rest keep their
    order. With the Makefile's `-n 2 --dist worksteal`, the long tests start at once and the short
    ones fill in around them: no worker is left running one long test alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
