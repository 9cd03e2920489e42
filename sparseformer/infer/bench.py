"""`sparseformer bench --model=RUN[,RUN...]`: trained models at inference, side by side.

For each run, at the task's length (its trained parameters) and at the longer `--lengths` (the same
architecture, positions sized to the length, random parameters: speed and memory do not depend on
the values): batch-1 latency p50/p95, throughput at the best of `--batch-sizes`, XLA's compiled
memory and the peak memory of a fresh process; for seq2seq and language models the prefill and one
cached decoding step. All runs' programs at a length are compiled first and then timed in
interleaved rounds (the order rotated each round), so machine drift hits every run alike; ratios
to the task's `dense` run come from this same measurement. `--bucketing` also times `predict` on
inputs with a spread of lengths, in buckets against padding every input to `max_len`.

Writes OUT/inference.json, OUT/inference.md and OUT/inference.png.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from sparseformer.bench import measure
from sparseformer.bench.report import _ratio, write_files
from sparseformer.bench.runner import machine_info
from sparseformer.infer import model as model_lib
from sparseformer.infer import predict as predict_lib
from sparseformer.infer import runtime, speed

BASELINE = "dense"


def _label(config: Any, workdir: str) -> str:
    return str(config.get("attention_name") or os.path.basename(os.path.normpath(workdir)))


def _cases(m: model_lib.Model, length: int, batch_sizes: Sequence[int], available: int) -> list[dict[str, Any]]:
    """Compiled programs of one model at one length: latency at batch 1, throughput per batch size, decode."""
    cases = []
    kind = m.config.model.kind
    wanted = [("latency", b) for b in sorted({1, *batch_sizes})]
    if model_lib.kind_programs(kind).decode is not None:
        wanted.append(("decode", 1))
    for program, b in wanted:
        case: dict[str, Any] = {"program": program, "batch": b, "times": []}
        try:
            compiled, args = speed.prepare(m, program, b, length)
        except Exception as e:  # noqa: BLE001  e.g. out of memory while compiling: recorded, not fatal
            case["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            cases.append(case)
            continue
        case["memory"] = measure.compiled_memory(compiled)
        case["skipped"] = measure.fits(case["memory"], available)
        case["compiled"], case["args"] = (None, None) if case["skipped"] else (compiled, args)
        cases.append(case)
    return cases


def _time_rounds(all_cases: list[dict[str, Any]], *, warmup: int, repeats: int) -> None:
    runnable = [c for c in all_cases if c.get("compiled") is not None]
    for c in runnable:
        for _ in range(warmup):
            jax.block_until_ready(c["compiled"](*c["args"]))
    for r in range(repeats):
        order = runnable[r % len(runnable):] + runnable[: r % len(runnable)] if runnable else []
        for c in order:
            if c["program"] == "latency" and c["batch"] > 1 and r >= max(3, repeats // 4):
                continue  # throughput needs fewer calls than the batch-1 percentiles
            c["times"].append(measure.run_blocked(c["compiled"], c["args"]))


def _record(run: str, m: model_lib.Model, length: int, trained: bool, cases: list[dict[str, Any]]) -> dict[str, Any]:
    config = m.config
    rec: dict[str, Any] = {
        "run": run, "task": config.task, "attention": _label(config, run), "kind": config.model.kind,
        "length": length, "trained_params": trained, "kernel": speed.attention_kernel(config, length),
        "latency_ms_p50": None, "latency_ms_p95": None, "throughput_per_s": None, "best_batch_size": None,
        "throughput_by_batch": {}, "compiled_bytes": None, "peak_rss_bytes": None, "peak_device_bytes": None,
        "decode_ms_per_token_p50": None, "decode_ms_per_token_p95": None, "skipped": None, "error": None,
    }  # fmt: skip
    notes = []
    for c in cases:
        if c.get("error") or c.get("skipped"):
            notes.append(f"{c['program']} batch {c['batch']}: {c.get('error') or c.get('skipped')}")
            continue
        ms = np.asarray(c["times"]) * 1e3
        if c["program"] == "decode":
            rec["decode_ms_per_token_p50"], rec["decode_ms_per_token_p95"] = map(float, np.percentile(ms, [50, 95]))
            continue
        rec["throughput_by_batch"][str(c["batch"])] = c["batch"] / float(np.median(c["times"]))
        if c["batch"] == 1:
            rec["latency_ms_p50"], rec["latency_ms_p95"] = map(float, np.percentile(ms, [50, 95]))
            rec["compiled_bytes"] = c["memory"]["compiled_bytes"]
    if rec["throughput_by_batch"]:
        best = max(rec["throughput_by_batch"], key=rec["throughput_by_batch"].get)
        rec["throughput_per_s"], rec["best_batch_size"] = rec["throughput_by_batch"][best], int(best)
    if notes:
        rec["skipped" if rec["latency_ms_p50"] is None else "error"] = "; ".join(notes)
    return rec


def add_ratios(results: list[dict[str, Any]]) -> None:
    """Speed-ups (dense / run) and memory fractions (run / dense) against the same task's dense run."""
    dense = {(r["task"], r["length"]): r for r in results if r["attention"] == BASELINE}
    for r in results:
        d = dense.get((r["task"], r["length"]))
        r["latency_speedup"] = _ratio(d and d["latency_ms_p50"], r["latency_ms_p50"])
        r["throughput_ratio"] = _ratio(r["throughput_per_s"], d and d["throughput_per_s"])
        r["decode_speedup"] = _ratio(d and d["decode_ms_per_token_p50"], r["decode_ms_per_token_p50"])
        r["compiled_vs_dense"] = _ratio(r["compiled_bytes"], d and d["compiled_bytes"])
        r["peak_rss_vs_dense"] = _ratio(r["peak_rss_bytes"], d and d["peak_rss_bytes"])
        r["peak_device_vs_dense"] = _ratio(r["peak_device_bytes"], d and d["peak_device_bytes"])


# Input length distributions for `--bucketing` (fractions of max_len): the uniform spread, and a
# heavy-tailed one like real text (most inputs short, a few long): log-normal lengths with median
# max_len/8 and sigma 1 (natural log), clipped to [4 tokens, max_len] (about 2% land at max_len).
LENGTH_DISTRIBUTIONS: dict[str, str] = {
    "uniform": "uniform from max_len/16 to max_len",
    "lognormal": "log-normal, median max_len/8, sigma 1, clipped to [4, max_len]",
}


def sample_lengths(distribution: str, n: int, max_len: int, rng: np.random.Generator) -> np.ndarray:
    """`n` input lengths in [1, max_len] drawn from one of `LENGTH_DISTRIBUTIONS`."""
    if distribution == "uniform":
        return rng.integers(max(1, max_len // 16), max_len + 1, n)
    if distribution == "lognormal":
        x = np.exp(rng.normal(np.log(max_len / 8), 1.0, n))
        return np.clip(np.rint(x), min(4, max_len), max_len).astype(int)
    raise ValueError(f"--bucketing-lengths: {distribution!r} is not one of {', '.join(LENGTH_DISTRIBUTIONS)}")


def spread_inputs(backend: Any, n: int, *, seed: int = 0, distribution: str = "uniform") -> list[dict[str, str]]:
    """`n` JSON objects of random known tokens, lengths drawn from `distribution` (`LENGTH_DISTRIBUTIONS`)."""
    rng = np.random.default_rng(seed)
    codec, max_len = backend.codec, int(backend.buckets[-1]) - len(backend.prompt_prefix)
    vocab = codec.vocab if codec.kind == "words" else [chr(c) for c in range(97, 123)]
    sep = " " if codec.kind == "words" else ""
    fields = runtime.FIELDS[backend.kind]
    lengths = sample_lengths(distribution, n * len(fields), max_len, rng).reshape(n, len(fields))
    return [{field: sep.join(vocab[j] for j in rng.integers(0, len(vocab), int(length))) for field, length in zip(fields, row)}
            for row in lengths]


def bucketing_throughput(workdir: str, *, n: int = 256, batch_size: int = 8, seed: int = 0, distribution: str = "uniform",
                         rounds: int = 3) -> dict[str, Any]:
    """Lines per second of `predict` in buckets and padded to `max_len`, on the same `n` inputs (lengths
    from `distribution`): each mode runs once to compile, then `rounds` times in turn (bucketed,
    padded, bucketed, ...: load hits both alike); the median pass is reported."""
    m = model_lib.trained_model(workdir)
    modes = {"bucketed": predict_lib.ModelBackend(m), "padded": predict_lib.ModelBackend(m, buckets=[int(m.config.model.max_len)])}
    out: dict[str, Any] = {"run": workdir, "task": m.config.task, "attention": _label(m.config, workdir), "lines": n,
                           "batch_size": batch_size, "buckets": modes["bucketed"].buckets, "distribution": distribution,
                           "rounds": rounds}
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "in.jsonl")
        with open(src, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in spread_inputs(modes["bucketed"], n, seed=seed, distribution=distribution))
        run = lambda backend, name: runtime.predict_file(  # noqa: E731
            backend, src, os.path.join(tmp, f"{name}.jsonl"), batch_size=batch_size, progress=False, max_new_tokens=8)
        for name, backend in modes.items():
            run(backend, "warm")
        passes: dict[str, list[runtime.Summary]] = {name: [] for name in modes}
        for _ in range(max(1, rounds)):
            for name, backend in modes.items():
                passes[name].append(run(backend, name))
        for name, summaries in passes.items():
            s = sorted(summaries, key=lambda x: x.seconds)[len(summaries) // 2]
            out[name] = {"lines_per_s": n / s.seconds, "seconds": s.seconds, **s.to_json(),
                         "seconds_all": [x.seconds for x in summaries]}
    out["speedup"] = out["bucketed"]["lines_per_s"] / out["padded"]["lines_per_s"]
    return out


def run_benchmark(workdirs: Sequence[str], *, lengths: Sequence[int] = (), batch_sizes: Sequence[int] = (1, 4, 16),
                  repeats: int = 10, warmup: int = 1, rss: bool = True, bucketing: int = 0,
                  bucketing_lengths: Sequence[str] = ("uniform",), progress: Any = print) -> dict[str, Any]:
    """The benchmark (see the module docstring) as a JSON-able dict."""
    models = {w: model_lib.trained_model(w) for w in workdirs}
    extra = {int(x) for x in lengths}
    all_lengths = sorted({*(int(m.config.model.max_len) for m in models.values()), *extra})
    available = measure.available_memory_bytes()
    results: list[dict[str, Any]] = []
    for length in all_lengths:
        group = []
        for w, trained in models.items():
            own = length == int(trained.config.model.max_len)
            if not own and length not in extra:  # another run's task length: not asked for this one
                continue
            try:
                sized = model_lib.sized_config(trained.config, length)
            except ValueError as e:
                progress(f"  {w} at {length}: skipped ({e})")
                continue
            m = trained if own else model_lib.random_model(sized)
            t0 = time.perf_counter()
            cases = _cases(m, length, batch_sizes, available)
            progress(f"  {w} at {length}: compiled {len(cases)} programs in {time.perf_counter() - t0:.1f} s")
            group.append((w, m, own, cases))
        if not group:
            continue
        _time_rounds([c for *_, cases in group for c in cases], warmup=warmup, repeats=repeats)
        for w, m, own, cases in group:
            rec = _record(w, m, length, own, cases)
            for c in cases:
                c.pop("compiled", None), c.pop("args", None)
            results.append(rec)
        if rss:
            for rec in results[-len(group):] if group else []:
                if rec["latency_ms_p50"] is None:
                    continue
                probe = speed.probe_fresh_process(model_lib.sized_config(models[rec["run"]].config, length), length=length)
                rec["peak_rss_bytes"], rec["peak_device_bytes"] = probe.get("peak_rss_bytes"), probe.get("peak_device_bytes")
                if "error" in probe:
                    rec["peak_error"] = probe["error"]
        progress(f"length {length}: " + ", ".join(f"{r['attention']} {r['latency_ms_p50'] or 0:.1f} ms" for r in results[-len(group):]))
    add_ratios(results)
    out = {"machine": machine_info(), "jax": jax.__version__, "results": results,
           "options": {"lengths": all_lengths, "batch_sizes": list(batch_sizes), "repeats": repeats, "warmup": warmup,
                       "rss": rss}}
    if bucketing:
        out["bucketing"] = []
        for dist in bucketing_lengths:
            for w in workdirs:
                out["bucketing"].append(bucketing_throughput(w, n=bucketing, distribution=dist))
                b = out["bucketing"][-1]
                progress(f"  bucketing {w} ({dist}): {b['speedup']:.2f}x")
    return out


# --- report ---------------------------------------------------------------------------------------


def _f(x: float | None, fmt: str = "{:.1f}") -> str:
    return "" if x is None else fmt.format(x)


def _mb(x: float | None) -> str:
    return "" if x is None else f"{x / 2**20:,.1f}"


def markdown(bench: dict[str, Any], *, command: str | None = None) -> str:
    results, m, o = bench["results"], bench["machine"], bench.get("options", {})
    lines = ["# Inference benchmark of trained models", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    lines += [f"Machine: {m.get('cpu')}, {m.get('cores')} cores; backend {m.get('backend')} ({m.get('device_kind')}); "
              f"jax {bench.get('jax')}; commit {m.get('git_commit')}. Median and 95th percentile of {o.get('repeats')} "
              "interleaved rounds; ratios to the same task's dense run from this same run. At the task's own length the "
              "trained parameters run; at other lengths the same architecture with random parameters.", ""]
    for task in dict.fromkeys(r["task"] for r in results):
        rows = [r for r in results if r["task"] == task]
        lines += [f"## {task} ({rows[0]['kind']})", "",
                  "| attention | length | kernel | batch-1 latency p50 / p95, ms (speed-up) | throughput /s at best batch (x dense) "
                  "| compiled MB (x dense) | peak RSS MB (x dense) | decode ms/token (speed-up) |",
                  "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
        for r in sorted(rows, key=lambda r: (r["length"], r["attention"] != BASELINE)):
            sp = lambda k: "" if r.get(k) is None or r["attention"] == BASELINE else f" ({r[k]:.2f}x)"  # noqa: E731
            fr = lambda k: "" if r.get(k) is None or r["attention"] == BASELINE else f" ({r[k]:.3f})"  # noqa: E731
            lat = "skipped" if r["latency_ms_p50"] is None else f"{r['latency_ms_p50']:.1f} / {r['latency_ms_p95']:.1f}" + sp("latency_speedup")
            thr = "" if r["throughput_per_s"] is None else f"{r['throughput_per_s']:.1f} (b={r['best_batch_size']})" + sp("throughput_ratio")
            dec = "" if r["decode_ms_per_token_p50"] is None else f"{r['decode_ms_per_token_p50']:.2f}" + sp("decode_speedup")
            name = r["attention"] + ("" if r["trained_params"] else " *")
            lines.append(f"| {name} | {r['length']} | {r['kernel']} | {lat} | {thr} | {_mb(r['compiled_bytes'])}{fr('compiled_vs_dense')} "
                         f"| {_mb(r['peak_rss_bytes'])}{fr('peak_rss_vs_dense')} | {dec} |")
        lines += ["", "_* random parameters at a length the run was not trained at (same architecture)_", ""]
    if bench.get("bucketing"):
        lines += ["## Bucketed batches against padding every input to max_len", "",
                  "| run | task | lengths | buckets | lines/s bucketed | lines/s padded | speed-up | padding bucketed / padded |",
                  "| --- | --- | --- | --- | ---: | ---: | ---: | ---: |"]
        for b in bench["bucketing"]:
            dist = b.get("distribution", "uniform")
            lines.append(f"| {b['attention']} | {b['task']} | {dist} | {','.join(map(str, b['buckets']))} | {b['bucketed']['lines_per_s']:.1f} "
                         f"| {b['padded']['lines_per_s']:.1f} | {b['speedup']:.2f}x | {100 * b['bucketed']['padding_fraction']:.0f}% / "
                         f"{100 * b['padded']['padding_fraction']:.0f}% |")
        b0 = bench["bucketing"][0]
        dists = "; ".join(f"{d}: {LENGTH_DISTRIBUTIONS[d]}" for d in dict.fromkeys(b.get("distribution", "uniform") for b in bench["bucketing"]))
        lines += ["", f"_{b0['lines']} lines per run, lengths {dists}; batch {b0['batch_size']}; each mode compiled by a first "
                  f"pass, then {b0.get('rounds', 1)} passes in turn with the other (the median reported)_", ""]
    notes = [f"{r['attention']} at {r['length']}: {r['skipped'] or r['error']}" for r in results if r.get("skipped") or r.get("error")]
    if notes:
        lines += ["## Skipped or failed", "", *[f"- {n}" for n in notes], ""]
    return "\n".join(lines)


def plot(bench: dict[str, Any], path: str) -> None:
    """Latency and peak memory against length, one line per run (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = bench["results"]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.8))
    runs = list(dict.fromkeys((r["task"], r["attention"]) for r in results))
    colors = plt.get_cmap("tab10")
    for i, (task, att) in enumerate(runs):
        rows = sorted((r for r in results if (r["task"], r["attention"]) == (task, att)), key=lambda r: r["length"])
        label = f"{task}: {att}" if len({t for t, _ in runs}) > 1 else att
        for ax, key in ((ax_t, "latency_ms_p50"), (ax_m, "peak_rss_bytes")):
            pts = [(r["length"], r[key] / (2**20 if key == "peak_rss_bytes" else 1)) for r in rows if r.get(key)]
            if key == "peak_rss_bytes" and not pts:
                pts = [(r["length"], r["compiled_bytes"] / 2**20) for r in rows if r.get("compiled_bytes")]
            if pts:
                ax.plot(*zip(*pts), "-o", color=colors(i % 10), label=label, ms=4)
    for ax, ylabel in ((ax_t, "batch-1 latency, p50 (ms)"), (ax_m, "peak memory of a fresh process (MB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("input length (tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    ax_t.set_title("latency")
    ax_m.set_title("memory")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(bench: dict[str, Any], out_dir: str, *, command: str | None = None) -> dict[str, str]:
    """Write `inference.json`, `inference.md` and `inference.png` under `out_dir`; returns their paths."""
    return write_files(bench, out_dir, "inference", markdown, plot, command=command)


def bench_models_main(argv: list[str]) -> int:
    """`sparseformer bench --model=RUN[,RUN...] [--lengths=...] [--out=DIR]`."""
    p = argparse.ArgumentParser(prog="sparseformer bench --model", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="comma-separated run directories (e.g. a dense and an rsa run of one task)")
    p.add_argument("--out", default="bench_inference", help="output directory")
    p.add_argument("--lengths", default="", help="more lengths (comma-separated; classifiers: e.g. 1024,2048,4096,8192,16384)")
    p.add_argument("--batch-sizes", default="1,4,16", help="throughput is measured at each; the best is reported")
    p.add_argument("--repeats", type=int, default=10, help="timed rounds")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per program after compiling")
    p.add_argument("--rss", default="all", choices=["all", "none"], help="fresh-process peak memory per run and length")
    p.add_argument("--bucketing", type=int, default=0, metavar="N",
                   help="also time predict on N inputs of spread lengths, bucketed vs padded to max_len")
    p.add_argument("--bucketing-lengths", default="uniform",
                   help="length distributions for --bucketing, comma-separated: "
                        + "; ".join(f"{k} ({v})" for k, v in LENGTH_DISTRIBUTIONS.items()))
    args = p.parse_args(argv)
    try:
        workdirs = [w for w in args.model.split(",") if w]
        lengths = [int(x) for x in args.lengths.split(",") if x]
        batch_sizes = [int(x) for x in args.batch_sizes.split(",") if x]
        dists = [d for d in args.bucketing_lengths.split(",") if d]
        for d in dists:
            sample_lengths(d, 0, 1, np.random.default_rng(0))  # the flag's error before anything runs
        if not workdirs or any(b < 1 for b in batch_sizes) or any(n < 1 for n in lengths):
            raise ValueError("--model needs run directories; --lengths and --batch-sizes positive integers")
        bench = run_benchmark(workdirs, lengths=lengths, batch_sizes=batch_sizes, repeats=args.repeats,
                              warmup=args.warmup, rss=args.rss == "all", bucketing=args.bucketing, bucketing_lengths=dists,
                              progress=lambda s: print(s, file=sys.stderr, flush=True))
    except (FileNotFoundError, ValueError) as e:
        print(f"sparseformer bench: {e}", file=sys.stderr)
        return 2
    command = "sparseformer bench " + " ".join(shlex.quote(a) for a in argv)
    paths = write(bench, args.out, command=command)
    print(markdown(bench, command=command))
    print("wrote " + ", ".join(paths.values()))
    return 0
