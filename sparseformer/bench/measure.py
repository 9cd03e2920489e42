"""Measuring one case: compiled memory, wall time, fidelity, and the peak memory of a fresh process.

Compiled memory is XLA's `memory_analysis()` of the compiled program: `temp + output` bytes (the
arguments are recorded apart). It does not vary between runs and can be computed for programs too
large to run. On CPU it is known to under-report dense attention's backward pass by about half, so
a case is run only when `MEMORY_UNDER_REPORT[backend] * (temp + output + arguments)` fits in the
memory available; otherwise its time is recorded as skipped, with the reason, never estimated.

The peak-memory probe runs one case in a fresh process (`python -m sparseformer.bench.measure`):
it builds the inputs, compiles, resets the kernel's peak-RSS counter (`/proc/self/clear_refs`), runs
the case once and reports the peak resident memory minus the resident memory just before the run
(so imports, inputs and the compiler's own memory are excluded). On a GPU it reports the device's
peak bytes in use instead (inputs included; flagged `peak_upper_bound` when compiling had already
reached a higher peak than the run, as the device's peak cannot be reset).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sparseformer.bench import inputs, methods

MEMORY_UNDER_REPORT: dict[str, float] = {"cpu": 2.0}
"""Backend -> factor applied to XLA's compiled bytes before deciding that a case fits (default 1)."""


def _cpu_available_bytes() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def _gpu_available_bytes() -> int:
    stats = jax.devices()[0].memory_stats() or {}
    return int(stats.get("bytes_limit", 0) - stats.get("bytes_in_use", 0))


AVAILABLE_MEMORY: dict[str, Callable[[], int]] = {"cpu": _cpu_available_bytes, "gpu": _gpu_available_bytes}


def available_memory_bytes() -> int:
    """Memory a case may use on the default backend (host RAM on CPU, free device memory on GPU)."""
    return AVAILABLE_MEMORY.get(jax.default_backend(), _cpu_available_bytes)()


def compiled_memory(compiled: Any) -> dict[str, int]:
    """XLA's memory analysis of a compiled program: temp, output, argument and `compiled` (temp+output) bytes."""
    ma = compiled.memory_analysis()
    temp = int(getattr(ma, "temp_size_in_bytes", 0))
    output = int(getattr(ma, "output_size_in_bytes", 0))
    argument = int(getattr(ma, "argument_size_in_bytes", 0))
    return {"compiled_bytes": temp + output, "temp_bytes": temp, "output_bytes": output, "argument_bytes": argument}


def fits(memory: dict[str, int], available: int, *, backend: str | None = None) -> str | None:
    """None when the case may run; otherwise the reason it is skipped."""
    factor = MEMORY_UNDER_REPORT.get(backend or jax.default_backend(), 1.0)
    need = factor * memory["compiled_bytes"] + memory["argument_bytes"]
    if need <= available:
        return None
    return (
        f"does not fit: compiled {memory['compiled_bytes'] / 1e9:.1f} GB (x{factor:g} for XLA's under-report)"
        f" > available {available / 1e9:.1f} GB"
    )


def case_arguments(method: methods.Method, pass_name: str, q: jax.Array, k: jax.Array, v: jax.Array) -> tuple:
    """The arguments of `methods.make_pass(method, pass_name)`: (q, k, v, params, rng[, w])."""
    args: tuple = (q, k, v, method.params, jax.random.key(0))
    if pass_name == "fwd_bwd":
        w = jax.random.normal(jax.random.key(1), q.shape[:-1] + (v.shape[-1],), jnp.float32)
        args += (w,)
    return args


def compile_pass(method: methods.Method, pass_name: str, args: tuple) -> tuple[Any, dict[str, int], float]:
    """Lower and compile one pass; returns the executable, its memory analysis and the compile seconds."""
    t0 = time.perf_counter()
    compiled = jax.jit(methods.make_pass(method, pass_name)).lower(*args).compile()
    return compiled, compiled_memory(compiled), time.perf_counter() - t0


def run_blocked(compiled: Any, args: tuple) -> float:
    """Run once, block on every output, return the wall seconds."""
    t0 = time.perf_counter()
    out = compiled(*args)
    jax.block_until_ready(out)
    elapsed = time.perf_counter() - t0
    del out
    return elapsed


@jax.jit(static_argnames=("causal",))
def _reference_rows(q_c: jax.Array, k: jax.Array, v: jax.Array, start: jax.Array, *, causal: bool) -> jax.Array:
    """Exact attention for the query rows `start + [0, c)`."""
    mask = None
    if causal:
        rows, cols = start + jnp.arange(q_c.shape[1]), jnp.arange(k.shape[1])
        mask = (rows[:, None] >= cols[None, :])[None, None]
    return jax.nn.dot_product_attention(q_c, k, v, mask=mask)


def reference_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, *, causal: bool, max_bytes: int = 1 << 29) -> np.ndarray:
    """Exact attention in float32, computed in chunks of query rows so that no `T x S` tensor is whole."""
    B, T, H, _ = q.shape
    S = k.shape[1]
    rows = int(max(1, min(T, max_bytes // (4 * B * H * S))))
    kk, vv = jnp.asarray(k, jnp.float32), jnp.asarray(v, jnp.float32)
    outs = []
    for start in range(0, T, rows):
        q_c = jnp.asarray(q[:, start : start + rows], jnp.float32)
        outs.append(np.asarray(_reference_rows(q_c, kk, vv, jnp.int32(start), causal=causal)))
    return np.concatenate(outs, axis=1)


def relative_error(out: np.ndarray, ref: np.ndarray) -> float:
    """`||out - ref|| / ||ref||` in float64."""
    diff = np.asarray(out, np.float64) - np.asarray(ref, np.float64)
    return float(np.linalg.norm(diff) / max(np.linalg.norm(np.asarray(ref, np.float64)), 1e-30))


# --- the fresh-process peak-memory probe ---------------------------------------------------------


def _status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (the peak resident set) to the current RSS
        return True
    except OSError:
        return False


def peak_memory_of(run: Callable[[], Any]) -> dict[str, Any]:
    """The peak memory of one call of `run()` (already compiled, its inputs built), in this process.

    On a GPU: the device's peak bytes in use (`peak_upper_bound` when the call did not rise above the
    peak reached before it). On CPU: the peak resident memory during the call minus
    the resident memory just before it (`VmHWM` after `clear_refs`), or, where that counter cannot be
    reset, the growth of the lifetime peak (compilation may then hide part of the call's peak).
    `run` must block until its outputs are ready.
    """
    gc.collect()
    if jax.default_backend() == "gpu":
        device = jax.devices()[0]
        before = device.memory_stats() or {}
        run()
        after = device.memory_stats() or {}
        peak, earlier = int(after.get("peak_bytes_in_use", 0)), int(before.get("peak_bytes_in_use", 0))
        # the device peak cannot be reset: if the call never rose above what compiling (XLA's
        # autotuning allocates on the device) or earlier work reached, the peak is only an upper
        # bound of the call's. benchmarks/gpu.sh shares JAX's compilation cache with the probes so
        # they load the program the benchmark compiled instead of compiling (and autotuning) again.
        upper = peak <= earlier
        return {"peak_rss_bytes": None, "peak_device_bytes": peak, "device_peak_before": earlier,
                "device_bytes_before": int(before.get("bytes_in_use", 0)), "peak_upper_bound": upper,
                "how": "device peak before the call (an upper bound of the call's)" if upper else "device peak"}
    if _reset_peak_rss() and (base := _status_bytes("VmRSS")) is not None:
        run()
        peak = _status_bytes("VmHWM") or base
        return {"peak_rss_bytes": peak - base, "baseline_rss_bytes": base, "how": "VmHWM after clear_refs"}
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    run()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"peak_rss_bytes": peak - base, "baseline_rss_bytes": base, "how": "ru_maxrss growth"}


def probe_in_process(name: str, shape: methods.Shape, pass_name: str, *, dense_impl: str = "auto") -> dict[str, Any]:
    """Run one case once in this process; report its peak memory growth (see the module docstring)."""
    method = methods.build(name, shape, dense_impl=dense_impl)
    q, k, v = (jnp.asarray(x, shape.dtype) for x in inputs.random_qkv(shape.batch, shape.length, shape.heads, shape.head_dim))
    args = case_arguments(method, pass_name, q, k, v)
    compiled, _, _ = compile_pass(method, pass_name, args)
    jax.block_until_ready(args)
    return peak_memory_of(lambda: run_blocked(compiled, args))


def probe_fresh_process(
    name: str, shape: methods.Shape, pass_name: str, *, dense_impl: str = "auto", timeout_s: float = 600.0
) -> dict[str, Any]:
    """`probe_in_process` in a fresh Python process; returns its report, or `{"error": ...}`."""
    cmd = [
        sys.executable, "-m", "sparseformer.bench.measure",
        f"--preset={name}", f"--length={shape.length}", f"--pass={pass_name}", f"--batch={shape.batch}",
        f"--heads={shape.heads}", f"--head-dim={shape.head_dim}", f"--dtype={shape.dtype}",
        f"--dense-impl={dense_impl}",
    ] + (["--causal"] if shape.causal else [])  # fmt: skip
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:] or ''}"}
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> int:
    """`python -m sparseformer.bench.measure --preset=... --length=... --pass=...`: print one JSON line."""
    p = argparse.ArgumentParser(prog="python -m sparseformer.bench.measure", description=probe_in_process.__doc__)
    p.add_argument("--preset", required=True)
    p.add_argument("--length", type=int, required=True)
    p.add_argument("--pass", dest="pass_name", choices=list(methods.PASSES), required=True)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--causal", action="store_true")
    p.add_argument("--dense-impl", default="auto")
    a = p.parse_args(argv)
    shape = methods.Shape(a.batch, a.length, a.heads, a.head_dim, a.causal, a.dtype)
    print(json.dumps(probe_in_process(a.preset, shape, a.pass_name, dense_impl=a.dense_impl)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
