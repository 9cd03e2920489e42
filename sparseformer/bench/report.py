"""Turn a run's results into `bench.json`, `bench.md` and `bench.png`.

Every ratio is to dense attention at the same length and pass *from the same run*: the time ratio is
`dense time / method time` (a speed-up), the memory ratios are `method / dense` (a fraction).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable
from typing import Any

BASELINE = "dense"
Record = dict[str, Any]


def add_ratios(results: list[Record]) -> None:
    """Add `speedup_vs_dense`, `compiled_vs_dense`, `peak_rss_vs_dense` and `peak_device_vs_dense`
    from this run's dense rows."""
    dense = {(r["length"], r["pass"]): r for r in results if r["preset"] == BASELINE}
    for r in results:
        d = dense.get((r["length"], r["pass"]))
        r["speedup_vs_dense"] = _ratio(d and d["median_ms"], r["median_ms"])
        r["compiled_vs_dense"] = _ratio(r["compiled_bytes"], d and d["compiled_bytes"])
        r["peak_rss_vs_dense"] = _ratio(r["peak_rss_bytes"], d and d["peak_rss_bytes"])
        r["peak_device_vs_dense"] = _ratio(r.get("peak_device_bytes"), d and d.get("peak_device_bytes"))


def _ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or not den else num / den


def _find(results: list[Record], preset: str, length: int, pass_name: str) -> Record | None:
    return next((r for r in results if (r["preset"], r["length"], r["pass"]) == (preset, length, pass_name)), None)


# --- the targets, checked on the run's own numbers ---------------------------------------


FIDELITY_TARGETS = {"needle": 0.1, "needle_groups": 0.15, "topics": 0.2}
"""Input kind -> the relative error rsa aims at, bidirectional and causal, at every length."""


def _target_rows(results: list[Record], backend: str) -> Iterable[tuple[str, float | None, str, bool | None]]:
    """(claim, measured, target, met) for the numbers the project aims at (fwd_bwd, rsa vs dense),
    those of the backend the run measured (see BENCHMARKS.md for where each comes from)."""

    def get(preset: str, length: int, key: str) -> float | None:
        r = _find(results, preset, length, "fwd_bwd")
        return None if r is None else r.get(key)

    def row(claim: str, value: float | None, target: str, ok: Callable[[float], bool]):  # noqa: ANN202
        return claim, value, target, None if value is None else bool(ok(value))

    lengths = sorted({r["length"] for r in results if r["preset"] == "rsa"})
    if backend == "gpu":
        for n, goal in ((4096, 1.5), (16384, 5.0), (65536, 15.0)):
            if n in lengths:
                yield row(f"rsa speed-up vs dense at {n}", get("rsa", n, "speedup_vs_dense"), f">= {goal:g}", lambda x, g=goal: x >= g)
        exact = "rsa/exact" if any(r["preset"] == "rsa/exact" for r in results) else "rsa"
        for n in [n for n in lengths if n >= 16384]:
            frac = _ratio(get(exact, n, "exact_flops_per_s"), get(BASELINE, n, "flops_per_s"))
            yield row(f"{exact} exact-part FLOP/s / dense FLOP/s at {n}", frac, ">= 0.4", lambda x: x >= 0.4)
        for n in lengths:
            peak = get("rsa", n, "peak_device_vs_dense")
            if peak is not None:
                yield row(f"rsa peak device memory / dense at {n}", peak, "<= 1.5", lambda x: x <= 1.5)
    else:
        yield row("rsa compiled memory / dense at 8192", get("rsa", 8192, "compiled_vs_dense"), "<= 1/16 (0.0625)", lambda x: x <= 1 / 16)
        m64, m16 = get("rsa", 65536, "compiled_bytes"), get("rsa", 16384, "compiled_bytes")
        yield row("rsa compiled memory(65536) / memory(16384)", _ratio(m64, m16), "<= 4.5 (linear: 4)", lambda x: x <= 4.5)
        yield row("rsa time at 8192, ms", get("rsa", 8192, "median_ms"), "<= 686 (before the fused kernel)", lambda x: x <= 686)
    # the fidelity targets of the structured inputs, at every length measured (issue 12)
    for length in sorted({r["length"] for r in results if r["preset"] == "rsa" and r.get("error_needle_groups") is not None}):
        for kind, bound in FIDELITY_TARGETS.items():
            e = get("rsa", length, f"error_{kind}") if _find(results, "rsa", length, "fwd_bwd") else None
            e = e if e is not None else (_find(results, "rsa", length, "fwd") or {}).get(f"error_{kind}")
            yield row(f"rsa {kind} error at {length}", e, f"<= {bound}", lambda x, b=bound: x <= b)
    err_len = max((r["length"] for r in results if r["preset"] == "rsa" and r.get("error_needle") is not None), default=None)
    if err_len is not None:
        rsa_err = get("rsa", err_len, "error_needle")
        for other in ("bigbird", "performer", "nsa"):
            e = get(other, err_len, "error_needle")
            if e is not None and rsa_err is not None:
                yield row(f"{other} needle error at {err_len} (rsa {rsa_err:.3f})", e, "> rsa", lambda x: x > rsa_err)


# --- Markdown -------------------------------------------------------------------------------------


def _mb(x: float | None) -> str:
    return "" if x is None else f"{x / 2**20:,.1f}"


def _cell_time(r: Record | None) -> str:
    if r is None:
        return ""
    if r.get("error"):
        return "error"
    if r["median_ms"] is None:
        return "skipped" if r.get("skipped") and r["skipped"] != "compile only" else ""
    ratio = "" if r["preset"] == BASELINE or r["speedup_vs_dense"] is None else f" ({r['speedup_vs_dense']:.1f}x)"
    return f"{r['median_ms']:,.1f}{ratio}"


def _cell_mem(key: str, ratio_key: str) -> Callable[[Record | None], str]:
    def cell(r: Record | None) -> str:
        if r is None or r.get(key) is None:
            skipped = r is not None and r.get("skipped") and r["skipped"] != "compile only"
            return "skipped" if skipped and key.startswith("peak_") else ""
        ratio = "" if r["preset"] == BASELINE or r.get(ratio_key) is None else f" ({r[ratio_key]:.3f})"
        # a device peak the call never rose above (compiling's): an upper bound, marked `<=`
        bound = "<=" if key == "peak_device_bytes" and r.get("peak_upper_bound") else ""
        return bound + _mb(r[key]) + ratio

    return cell


def _cell_flops(r: Record | None) -> str:
    if r is None or r.get("flops_per_s") is None:
        return ""
    if r["preset"] == BASELINE or r["flops_exact"] == r["flops"]:
        return f"{r['flops_per_s'] / 1e9:.1f}"
    return f"{r['flops_per_s'] / 1e9:.1f} / {r['exact_flops_per_s'] / 1e9:.1f}"


FIDELITY_ONLY = "fidelity only (not timed)"


def _is_fidelity_only(r: Record) -> bool:
    return r.get("skipped") == FIDELITY_ONLY


def _kinds(results: list[Record]) -> list[str]:
    """The input kinds with an error in these results, in the order they were measured."""
    keys = dict.fromkeys(k for r in results for k in r if k.startswith("error_") and k != "error" and r[k] is not None)
    return [k[len("error_"):] for k in keys]


def fidelity_tables(results: list[Record]) -> list[str]:
    """Per length: relative error per preset (rows, the oracle-choice rows beside their preset) and
    input kind (columns); `(n)`: key blocks computed exactly per query block on average, where the
    preset's choice leaves slots unused (a mass threshold)."""
    kinds = _kinds(results)
    rows = [r for r in results if r["pass"] == "fwd" and any(r.get(f"error_{k}") is not None for k in kinds)]
    lines: list[str] = []
    for length in sorted({r["length"] for r in rows}):
        lines += [f"### {length} tokens", "", "| preset | " + " | ".join(kinds) + " |", "| --- |" + " ---: |" * len(kinds)]
        at = [r for r in rows if r["length"] == length]
        order = [r for r in at if not _is_fidelity_only(r)]
        for r in [r for r in at if _is_fidelity_only(r)]:  # an oracle row right after its preset
            base = next((i for i, x in enumerate(order) if r["preset"].startswith(x["preset"] + ",")), len(order) - 1)
            order.insert(base + 1, r)
        for r in order:
            cells = []
            for k in kinds:
                err, slots = r.get(f"error_{k}"), r.get(f"slots_{k}")
                shown = "" if err is None else f"{err:.3f}"
                if err is not None and slots is not None:
                    shown += f" ({slots:.1f})"
                cells.append(shown)
            lines.append(f"| {r['preset']} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _table(results: list[Record], pass_name: str, cell: Callable[[Record | None], str]) -> list[str]:
    results = [r for r in results if not _is_fidelity_only(r)]
    presets = list(dict.fromkeys(r["preset"] for r in results))
    lengths = sorted({r["length"] for r in results})
    lines = ["| preset | " + " | ".join(str(n) for n in lengths) + " |", "| --- |" + " ---: |" * len(lengths)]
    for p in presets:
        lines.append(f"| {p} | " + " | ".join(cell(_find(results, p, n, pass_name)) for n in lengths) + " |")
    return lines


PASS_TITLES = {"fwd": "Forward", "fwd_bwd": "Forward + backward (gradients w.r.t. q, k, v)"}
SECTIONS: list[tuple[str, Callable[[Record | None], str]]] = [
    ("Median time, ms (speed-up vs dense)", _cell_time),
    ("XLA compiled memory, temp + output, MB (fraction of dense)", _cell_mem("compiled_bytes", "compiled_vs_dense")),
    ("Peak RSS growth of a fresh process running the case, MB (fraction of dense)", _cell_mem("peak_rss_bytes", "peak_rss_vs_dense")),
    ("Peak device memory of a fresh process running the case (GPU `peak_bytes_in_use`, inputs included; `<=`: "
     "compiling had reached more, an upper bound), MB (fraction of dense)", _cell_mem("peak_device_bytes", "peak_device_vs_dense")),
    ("Achieved GFLOP/s: all counted FLOPs / the exactly computed pairs' FLOPs", _cell_flops),
]


def markdown(bench: dict[str, Any], *, command: str | None = None) -> str:
    """The Markdown report: per pass, one table per quantity (rows presets, columns lengths)."""
    results, m, o = bench["results"], bench["machine"], bench.get("options", {})
    lines = ["# Attention benchmark", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    lines += [
        f"Machine: {m.get('cpu')}, {m.get('cores')} cores, {m.get('memory_bytes', 0) / 2**30:.0f} GiB; "
        f"backend {m.get('backend')} ({m.get('device_kind')}); jax {bench.get('jax')}; commit {m.get('git_commit')}.",
        f"Shape: B={o.get('batch')}, H={o.get('heads')}, D={o.get('head_dim')}, {o.get('dtype')}, "
        f"{'causal' if o.get('causal') else 'bidirectional'}; median of {o.get('repeats')} interleaved rounds "
        f"after {o.get('warmup')} warm-up call(s). Ratios are to dense from this same run.",
        "",
    ]
    if o.get("compile_only"):
        lines += ["Compile only: XLA's compiled memory and the counted FLOPs; nothing was run.", ""]
    kernels = {r["preset"]: r.get("kernel") for r in results if r.get("kernel")}
    if kernels:
        lines += ["Exact kernel per method: " + ", ".join(f"{p}: {k}" for p, k in kernels.items()) + ".", ""]
    for pass_name in [p for p in PASS_TITLES if any(r["pass"] == p for r in results)]:
        lines += [f"## {PASS_TITLES[pass_name]}", ""]
        for title, cell in SECTIONS:
            table = _table(results, pass_name, cell)
            if any(cell(r) for r in results if r["pass"] == pass_name):  # e.g. no probe ran: no empty table
                lines += [f"### {title}", "", *table, ""]
    fid = fidelity_tables(results)
    if fid:
        lines += [
            "## Fidelity: relative error vs exact float32 attention (forward output)", "",
            f"Input seed: {o.get('fidelity_seed') if o.get('fidelity_seed') is not None else 'each kind' + chr(39) + 's default'}. "
            "Rows `<preset>, oracle choice`: the same budget with the exact block masses as the estimate. "
            "`(n)`: key blocks computed exactly per query block, on average.", "", *fid,
        ]  # fmt: skip
    backend = m.get("backend", "cpu")
    targets = list(_target_rows(results, backend)) if any(r["preset"] == "rsa" for r in results) else []
    if targets:
        lines += ["## Targets (forward + backward)", "", "| claim | measured | target | met |", "| --- | ---: | --- | --- |"]
        for claim, value, target, met in targets:
            shown = "n/a" if value is None else f"{value:.3g}"
            lines.append(f"| {claim} | {shown} | {target} | {'n/a' if met is None else ('yes' if met else 'NO')} |")
        lines.append("")
    notes = sorted({f"{r['preset']} at {r['length']} ({r['pass']}): {r['skipped'] or r['error']}" for r in results
                    if ((r.get("skipped") and r["skipped"] != "compile only") or r.get("error")) and not _is_fidelity_only(r)})
    if notes:
        lines += ["## Skipped or failed cases", "", *[f"- {n}" for n in notes], ""]
    return "\n".join(lines)


# --- the plot -------------------------------------------------------------------------------------


def plot(bench: dict[str, Any], path: str) -> None:
    """Two log-log panels (time, compiled memory against length), one colour per preset;
    forward+backward solid, forward dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = bench["results"]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.8))
    presets = list(dict.fromkeys(r["preset"] for r in results))
    colors = plt.get_cmap("tab10")
    for i, p in enumerate(presets):
        for pass_name, style in (("fwd_bwd", "-o"), ("fwd", "--")):
            rows = sorted((r for r in results if r["preset"] == p and r["pass"] == pass_name), key=lambda r: r["length"])
            t = [(r["length"], r["median_ms"]) for r in rows if r["median_ms"]]
            mem = [(r["length"], r["compiled_bytes"] / 2**20) for r in rows if r["compiled_bytes"]]
            label = p if pass_name == "fwd_bwd" else None
            for ax, pts in ((ax_t, t), (ax_m, mem)):
                if pts:
                    ax.plot(*zip(*pts), style, color=colors(i % 10), label=label, ms=4, lw=1.5 if pass_name == "fwd_bwd" else 1)
    for ax, ylabel in ((ax_t, "median time (ms)"), (ax_m, "XLA compiled memory, temp + output (MB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.set_title("time (solid: fwd+bwd, dashed: fwd)")
    ax_m.set_title("compiled memory (skipped runs still shown)")
    for ax in (ax_t, ax_m):  # the legend goes where there are lines (compile-only runs time nothing)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
            break
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _json_safe(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def write_json(bench: dict[str, Any], out_dir: str) -> str:
    """Write (or overwrite) `bench.json` alone, with ratios: the partial result of a long run."""
    os.makedirs(out_dir, exist_ok=True)
    add_ratios(bench["results"])
    path = os.path.join(out_dir, "bench.json")
    with open(path + ".tmp", "w") as f:
        json.dump(_json_safe(bench), f, indent=1)
    os.replace(path + ".tmp", path)
    return path


def write_files(bench: dict[str, Any], out_dir: str, stem: str, markdown_fn: Callable[..., str],
                plot_fn: Callable[[dict[str, Any], str], None], *, command: str | None = None) -> dict[str, str]:
    """Write `STEM.json`, `STEM.md` (`markdown_fn(bench, command=...)`) and `STEM.png` (`plot_fn`)."""
    os.makedirs(out_dir, exist_ok=True)
    if command:
        bench["command"] = command
    paths = {ext: os.path.join(out_dir, f"{stem}.{ext}") for ext in ("json", "md", "png")}
    with open(paths["json"], "w") as f:
        json.dump(_json_safe(bench), f, indent=1)
    with open(paths["md"], "w") as f:
        f.write(markdown_fn(bench, command=command))
    plot_fn(bench, paths["png"])
    return paths


def write(bench: dict[str, Any], out_dir: str, *, command: str | None = None) -> dict[str, str]:
    """Write `bench.json`, `bench.md` and `bench.png` under `out_dir`; returns their paths."""
    add_ratios(bench["results"])
    return write_files(bench, out_dir, "bench", markdown, plot, command=command)
