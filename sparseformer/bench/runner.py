"""The benchmark run: every (method, length, pass) compiled once, timed interleaved, checked for fidelity.

For each length: build every method, compile both passes (recording XLA's compiled memory), decide
which cases fit, warm each case up, then time `repeats` rounds in which every case runs once, in an
order rotated from round to round so that machine drift hits all methods alike; the median of the
rounds is the case's time. Fidelity is the forward output's error against exact float32 attention on
every input kind of `inputs.INPUT_KINDS`, with, for each preset that ranks blocks by an estimate, the
same preset with the oracle's choice beside it (fidelity-only rows). The fresh-process peak-memory probes run last,
one subprocess per case, so that they disturb no timing.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import subprocess
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sparseformer.bench import inputs, measure, methods, report

RSS_MODES = ("all", "largest", "none")


@dataclasses.dataclass(frozen=True)
class BenchOptions:
    """Everything that defines a benchmark run (the CLI flags)."""

    presets: tuple[str, ...] = ("dense", "local", "bigbird", "performer", "scatterbrain", "nsa", "rsa")
    lengths: tuple[int, ...] = (1024, 2048, 4096, 8192, 16384)
    batch: int = 1
    heads: int = 4
    head_dim: int = 64
    causal: bool = False
    dtype: str = "float32"
    repeats: int = 5
    warmup: int = 1
    passes: tuple[str, ...] = ("fwd", "fwd_bwd")
    rss: str = "all"  # which cases get a fresh-process peak-memory probe: all, largest length, none
    fidelity: bool = True
    fidelity_seed: int | None = None  # seed of every fidelity input (None: each kind's own default)
    dense_impl: str = "auto"  # auto (cuDNN on a GPU for 16-bit inputs), xla, cudnn
    compile_only: bool = False  # record compiled memory and FLOPs only: no timing, fidelity or probes

    def shape(self, length: int) -> methods.Shape:
        return methods.Shape(self.batch, length, self.heads, self.head_dim, self.causal, self.dtype)


@dataclasses.dataclass
class Case:
    """One (method, length, pass) with its executable while its length is being measured."""

    record: dict[str, Any]
    method: methods.Method | None = None
    compiled: Any = None
    args: tuple = ()
    times: list[float] = dataclasses.field(default_factory=list)

    @property
    def runnable(self) -> bool:
        return self.compiled is not None and not self.record.get("skipped")


def _git_commit() -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        # Untracked files inside the package count: code not yet committed is still what ran.
        dirty = subprocess.run(["git", "status", "--porcelain", "--", os.path.dirname(here)], cwd=here, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if head.returncode:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _jaxlib_version() -> str | None:
    try:
        import jaxlib

        return str(jaxlib.__version__)
    except (ImportError, AttributeError):
        return None


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    import psutil

    device = jax.devices()[0]
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_bytes": int(psutil.virtual_memory().total),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "git_commit": _git_commit(),
    }


def _base_record(name: str, length: int, pass_name: str, o: BenchOptions) -> dict[str, Any]:
    return {
        "preset": name, "length": length, "pass": pass_name, "median_ms": None, "times_ms": [],
        "compiled_bytes": None, "temp_bytes": None, "output_bytes": None, "argument_bytes": None,
        "peak_rss_bytes": None, "flops": None, "flops_exact": None, "flops_per_s": None,
        "exact_flops_per_s": None, "exact_pairs_per_query": None,
        **{f"error_{kind}": None for kind in inputs.INPUT_KINDS},
        "compile_s": None, "implementation": None, "kernel": None, "skipped": None, "error": None,
        "dtype": o.dtype, "causal": o.causal, "batch": o.batch, "heads": o.heads, "head_dim": o.head_dim,
    }  # fmt: skip


def _build_cases(o: BenchOptions, length: int, progress: Any) -> list[Case]:
    """Build and compile every (method, pass) at one length; decide which fit."""
    shape = o.shape(length)
    q, k, v = (jnp.asarray(x, o.dtype) for x in inputs.random_qkv(o.batch, length, o.heads, o.head_dim))
    available = measure.available_memory_bytes()
    cases: list[Case] = []
    for name in o.presets:
        records = {p: _base_record(name, length, p, o) for p in o.passes}
        method = None
        try:
            method = methods.build(name, shape, dense_impl=o.dense_impl)
        except methods.SkipCase as e:
            for r in records.values():
                r["skipped"] = f"cannot run: {e}"
        except Exception as e:  # noqa: BLE001 (one broken method must not end a long run)
            for r in records.values():
                r["error"] = f"{type(e).__name__}: {e}"
        for pass_name, rec in records.items():
            case = Case(rec, method)
            cases.append(case)
            progress.set_description(f"{length} {name} {pass_name}: compile")
            progress.update(1)
            if method is None:
                continue
            total, exact = methods.pass_flops(method, pass_name)
            rec.update(flops=total, flops_exact=exact, implementation=method.implementation, kernel=method.kernel)
            rec["exact_pairs_per_query"] = method.flops["exact"] / (4 * o.batch * o.heads * length * o.head_dim)
            try:
                case.args = measure.case_arguments(method, pass_name, q, k, v)
                case.compiled, memory, rec["compile_s"] = measure.compile_pass(method, pass_name, case.args)
            except Exception as e:  # noqa: BLE001
                rec["error"] = f"compile failed: {type(e).__name__}: {e}"
                continue
            rec.update(memory)
            rec["skipped"] = measure.fits(memory, available)
    return cases


def _time_cases(cases: list[Case], o: BenchOptions, length: int, progress: Any) -> None:
    """Warm up, then `repeats` rounds, every case once per round, order rotated each round."""
    runnable = [c for c in cases if c.runnable]
    for c in runnable:
        progress.set_description(f"{length} {c.record['preset']} {c.record['pass']}: warm-up")
        for _ in range(o.warmup):
            measure.run_blocked(c.compiled, c.args)
        progress.update(1)
    for r in range(o.repeats):
        progress.set_description(f"{length}: round {r + 1}/{o.repeats}")
        shift = r % max(1, len(runnable))
        for c in runnable[shift:] + runnable[:shift]:
            c.times.append(measure.run_blocked(c.compiled, c.args))
        progress.update(1)
    for c in runnable:
        rec = c.record
        median_s = statistics.median(c.times)
        rec["times_ms"] = [round(t * 1e3, 3) for t in c.times]
        rec["median_ms"] = median_s * 1e3
        rec["flops_per_s"] = rec["flops"] / median_s
        rec["exact_flops_per_s"] = rec["flops_exact"] / median_s


ORACLE_SUFFIX = ", oracle choice"
"""Fidelity rows `<preset>, oracle choice`: the preset's budget and mechanism with the exact block
masses (`estimator="oracle"`) in place of its estimate, so the estimate's share of the error shows."""


def _fidelity_functions(name: str, shape: methods.Shape) -> dict[str, Any]:
    """`{label: jitted (q, k, v) -> (out, slots)}`: the preset itself and, when it ranks blocks by an
    estimate, the same config with the oracle's choice. `slots` is the average number of key blocks
    computed exactly per query block (None without selection)."""
    from sparseformer import attention

    config = methods.preset_config(name)
    variants = {name: config}
    if config.selection.enabled and config.selection.top_k and config.selection.estimator != "oracle":
        oracle = methods.preset_config(name)
        oracle.selection.estimator = "oracle"
        variants[name + ORACLE_SUFFIX] = oracle
    out = {}
    for label, c in variants.items():
        params = attention.init_params(c, jax.random.key(0), num_heads=shape.heads, head_dim=shape.head_dim, max_len=shape.length)

        def fn(q, k, v, c=c, params=params):  # noqa: ANN001, ANN202 (traced arrays)
            o, aux = attention.attend(q, k, v, c, params=params, causal=shape.causal)
            return o, aux.get("slots")

        out[label] = jax.jit(fn)
    return out


def _fidelity(cases: list[Case], o: BenchOptions, length: int, progress: Any) -> list[dict[str, Any]]:
    """Relative error of every runnable method's forward output against exact float32 attention, per
    input kind (`inputs.INPUT_KINDS`), written into the cases' records; returns the extra records of
    the oracle-choice variants (fidelity only: no time)."""
    fwd = [c for c in cases if c.runnable and c.record["pass"] == "fwd"]
    shape = o.shape(length)
    fns: dict[str, Any] = {}
    for c in fwd:
        name = c.record["preset"]
        fns.update({name: None} if name in methods.BASELINES else _fidelity_functions(name, shape))
    errors: dict[str, dict[str, Any]] = {label: {} for label in fns}
    for kind, make in inputs.INPUT_KINDS.items():
        progress.set_description(f"{length}: fidelity ({kind})")
        seed = {} if o.fidelity_seed is None else {"seed": o.fidelity_seed}
        q, k, v = make(o.batch, length, o.heads, o.head_dim, causal=o.causal, **seed)
        ref = measure.reference_attention(q, k, v, causal=o.causal)
        qd, kd, vd = (jnp.asarray(x, o.dtype) for x in (q, k, v))
        for label, fn in fns.items():
            if fn is None:  # a baseline (dense, dense_pallas): its own compiled forward
                case = next(c for c in fwd if c.record["preset"] == label)
                out, slots = case.compiled(qd, kd, vd, *case.args[3:]), None
            else:
                out, slots = fn(qd, kd, vd)
            errors[label][f"error_{kind}"] = measure.relative_error(np.asarray(out, np.float32), ref)
            errors[label][f"slots_{kind}"] = None if slots is None else float(slots)
        progress.update(1)
    for other in cases:  # both passes of a method share its fidelity
        other.record.update(errors.get(other.record["preset"], {}))
    extra = []
    for label, errs in errors.items():
        if label.endswith(ORACLE_SUFFIX):
            rec = _base_record(label, length, "fwd", o)
            rec.update(errs, skipped=report.FIDELITY_ONLY)
            extra.append(rec)
    return extra


def _probe_rss(records: list[dict[str, Any]], o: BenchOptions, progress: Any) -> None:
    """Fresh-process peak memory for the chosen cases (see `measure.probe_fresh_process`)."""
    if o.rss == "none":
        return
    largest = max(o.lengths)
    for rec in records:
        if rec["median_ms"] is None or (o.rss == "largest" and rec["length"] != largest):
            continue
        progress.set_description(f"{rec['length']} {rec['preset']} {rec['pass']}: peak memory (fresh process)")
        report = measure.probe_fresh_process(rec["preset"], o.shape(rec["length"]), rec["pass"], dense_impl=o.dense_impl)
        rec["peak_rss_bytes"] = report.get("peak_rss_bytes")
        if report.get("peak_device_bytes") is not None:
            rec["peak_device_bytes"] = report["peak_device_bytes"]
            rec["peak_upper_bound"] = bool(report.get("peak_upper_bound"))
        if "error" in report:
            rec["peak_rss_error"] = report["error"]
        progress.update(1)


def count_steps(o: BenchOptions) -> int:
    """Progress-bar steps: compiles, warm-ups (upper bound), rounds, fidelity kinds and probes per length."""
    n_cases = len(o.presets) * len(o.passes)
    if o.compile_only:
        return 2 * n_cases * len(o.lengths) + o.repeats * len(o.lengths)
    per_length = 2 * n_cases + o.repeats + (len(inputs.INPUT_KINDS) if o.fidelity else 0)
    probes = {"all": n_cases * len(o.lengths), "largest": n_cases, "none": 0}[o.rss]
    return per_length * len(o.lengths) + probes


def run(o: BenchOptions, *, progress: Any = None, checkpoint: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns the `bench.json` object. `checkpoint` receives the partial object
    after each length and before the probes, so a long run that is stopped keeps what it measured."""
    if progress is None:
        from tqdm import tqdm

        progress = tqdm(total=count_steps(o), unit="step", dynamic_ncols=True)
    records: list[dict[str, Any]] = []
    bench = {
        "machine": machine_info(),
        "jax": jax.__version__,
        "jaxlib": _jaxlib_version(),
        "options": dataclasses.asdict(o),
        "results": records,
    }
    for length in o.lengths:
        cases = _build_cases(o, length, progress)
        if o.compile_only:  # whether a case would fit does not matter: none runs
            for c in cases:
                if c.compiled is not None:
                    c.record["skipped"] = "compile only"
        _time_cases(cases, o, length, progress)
        progress.update(len([c for c in cases if not c.runnable]))  # the warm-ups they did not need
        extra = _fidelity(cases, o, length, progress) if o.fidelity and not o.compile_only else []
        records += [c.record for c in cases] + extra
        del cases
        if checkpoint:
            checkpoint(bench)
    if not o.compile_only:
        _probe_rss(records, o, progress)
    progress.close()
    return bench


def parse_csv(text: str, cast: type = str) -> tuple[Any, ...]:
    """`"a,b,c"` -> `("a", "b", "c")` (blank items dropped)."""
    return tuple(cast(x.strip()) for x in text.split(",") if x.strip())


def validate_options(o: BenchOptions, known: Sequence[str]) -> None:
    """Refuse unknown presets, passes, dtypes and modes before anything is compiled."""
    unknown = [p for p in o.presets if not methods.is_known(p, list(known))]
    if unknown:
        raise ValueError(
            f"--presets: unknown {unknown}; known: {', '.join(known)} "
            f"(and PRESET/VARIANT, variants: {', '.join(methods.VARIANTS)}; either with ;section.field=value)"
        )
    for p in o.presets:
        if ";" in p:
            try:
                methods.preset_config(p)
            except methods.SkipCase:
                pass
            except ValueError as e:
                raise ValueError(f"--presets: {p}: {e}") from e
    bad = [p for p in o.passes if p not in methods.PASSES]
    if bad:
        raise ValueError(f"--passes: unknown {bad}; known: {', '.join(methods.PASSES)}")
    if o.rss not in RSS_MODES:
        raise ValueError(f"--rss: {o.rss!r}; allowed: {', '.join(RSS_MODES)}")
    if o.dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"--dtype: {o.dtype!r}; allowed: float32, bfloat16, float16")
    if o.repeats < 1 or not o.lengths:
        raise ValueError("--repeats must be >= 1 and --lengths non-empty")
