"""`sparseformer bench` plumbing on tiny lengths: files, schema, same-run ratios, skip logic.

Speed is measured, never asserted: nothing here depends on how fast the machine is.
"""

from __future__ import annotations

import json
import math

import pytest
from tqdm import tqdm

from sparseformer.bench import cli, measure, report, runner

SCHEMA = {"preset", "length", "pass", "median_ms", "compiled_bytes", "peak_rss_bytes", "flops", "error_peaky", "error_needle"}


def _has_attention() -> bool:
    try:
        from sparseformer.attention import attend, flops, presets  # noqa: F401
    except ImportError:
        return False
    return True


PRESETS = "dense,local" if _has_attention() else "dense"


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("bench")
    argv = [f"--presets={PRESETS}", "--lengths=128,256", "--repeats=2", "--warmup=0", "--rss=none", f"--out={out}"]
    assert cli.bench_main(argv) == 0
    return out


def test_writes_the_three_files_with_the_schema(bench_dir) -> None:
    for name in ("bench.json", "bench.md", "bench.png"):
        assert (bench_dir / name).stat().st_size > 0
    bench = json.loads((bench_dir / "bench.json").read_text())
    assert {"machine", "jax", "results"} <= set(bench)
    assert bench["machine"]["cores"] >= 1 and bench["machine"]["backend"] == "cpu"
    presets = PRESETS.split(",")
    assert len(bench["results"]) == len(presets) * 2 * 2
    for r in bench["results"]:
        assert SCHEMA <= set(r)
        assert r["pass"] in ("fwd", "fwd_bwd") and r["length"] in (128, 256)
        assert r["median_ms"] > 0 and r["compiled_bytes"] > 0 and r["flops"] > 0 and not r["skipped"]
        assert len(r["times_ms"]) == 2
        assert 0 <= r["error_peaky"] and 0 <= r["error_needle"]
    dense = [r for r in bench["results"] if r["preset"] == "dense"]
    assert all(r["error_peaky"] < 1e-5 and r["error_needle"] < 1e-5 for r in dense)


def test_ratios_come_from_the_same_run(bench_dir) -> None:
    bench = json.loads((bench_dir / "bench.json").read_text())
    md = (bench_dir / "bench.md").read_text()
    dense = {(r["length"], r["pass"]): r for r in bench["results"] if r["preset"] == "dense"}
    for r in bench["results"]:
        d = dense[(r["length"], r["pass"])]
        assert math.isclose(r["speedup_vs_dense"], d["median_ms"] / r["median_ms"])
        assert math.isclose(r["compiled_vs_dense"], r["compiled_bytes"] / d["compiled_bytes"])
        if r["preset"] != "dense":
            assert f"{r['median_ms']:,.1f} ({r['speedup_vs_dense']:.1f}x)" in md
    assert "| dense |" in md and "Fidelity" in md


def test_dense_is_skipped_when_it_would_not_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(measure, "available_memory_bytes", lambda: 1)
    o = runner.BenchOptions(presets=("dense",), lengths=(128,), repeats=1, rss="all")
    bench = runner.run(o, progress=tqdm(disable=True))
    report.add_ratios(bench["results"])
    for r in bench["results"]:
        assert r["median_ms"] is None and r["times_ms"] == [] and r["error_needle"] is None
        assert r["compiled_bytes"] > 0  # still reported
        assert r["skipped"].startswith("does not fit: compiled")
        assert r["peak_rss_bytes"] is None  # no probe for a case that does not fit
    md = report.markdown(bench)
    assert "skipped" in md and "does not fit" in md


def test_fit_rule_doubles_xla_figure_on_cpu() -> None:
    mem = {"compiled_bytes": 10, "argument_bytes": 1}
    assert measure.fits(mem, 21, backend="cpu") is None
    assert measure.fits(mem, 20, backend="cpu").startswith("does not fit")
    assert measure.fits(mem, 11, backend="gpu") is None


def test_ratio_of_a_skipped_dense_is_none() -> None:
    rows = [
        {"preset": "dense", "length": 8, "pass": "fwd", "median_ms": None, "compiled_bytes": 100, "peak_rss_bytes": None},
        {"preset": "x", "length": 8, "pass": "fwd", "median_ms": 2.0, "compiled_bytes": 5, "peak_rss_bytes": 7},
    ]
    report.add_ratios(rows)
    assert rows[1]["speedup_vs_dense"] is None and rows[1]["compiled_vs_dense"] == 0.05


def test_gpu_report_shows_device_peak_and_no_empty_rss_table() -> None:
    # On a GPU the probe reports the device's peak bytes and no RSS; the report must show the former.
    base = {"length": 8, "pass": "fwd", "compiled_bytes": 100, "peak_rss_bytes": None, "flops": None}
    rows = [
        dict(base, preset="dense", median_ms=1.0, peak_device_bytes=2 * 2**20),
        dict(base, preset="rsa", median_ms=0.5, peak_device_bytes=2**20),
    ]
    bench = {"results": rows, "machine": {}, "options": {}}
    report.add_ratios(rows)
    md = report.markdown(bench)
    assert rows[1]["peak_device_vs_dense"] == 0.5
    assert "| rsa | 1.0 (0.500) |" in md.split("Peak device memory")[1]
    assert "Peak RSS growth" not in md


class _FakeGpu:
    """A device whose `memory_stats` returns scripted values: before and after the call."""

    def __init__(self, *stats):
        self.stats = list(stats)

    def memory_stats(self):
        return self.stats.pop(0)


@pytest.mark.parametrize("compile_peak,upper", [(3 << 20, False), (9 << 20, True)])
def test_gpu_peak_is_flagged_when_compiling_reached_more(monkeypatch, compile_peak, upper) -> None:
    """The device peak cannot be reset: if compiling (XLA autotunes on the device) had already
    reached more than the call, the probe says its number is only an upper bound, and the report
    marks it `<=`."""
    import jax

    device = _FakeGpu({"bytes_in_use": 1 << 20, "peak_bytes_in_use": compile_peak},
                      {"bytes_in_use": 1 << 20, "peak_bytes_in_use": max(compile_peak, 5 << 20)})
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax, "devices", lambda: [device])
    calls = []
    rep = measure.peak_memory_of(lambda: calls.append(1))
    assert calls == [1] and rep["peak_upper_bound"] is upper and rep["device_bytes_before"] == 1 << 20
    assert rep["peak_device_bytes"] == max(compile_peak, 5 << 20) and ("upper bound" in rep["how"]) is upper
    base = {"length": 8, "pass": "fwd", "compiled_bytes": 100, "peak_rss_bytes": None, "flops": None}
    rows = [dict(base, preset="dense", median_ms=1.0, peak_device_bytes=10 * 2**20),
            dict(base, preset="rsa", median_ms=0.5, peak_device_bytes=rep["peak_device_bytes"],
                 peak_upper_bound=rep["peak_upper_bound"])]
    report.add_ratios(rows)
    cell = report.markdown({"results": rows, "machine": {}, "options": {}}).split("Peak device memory")[1]
    assert ("| rsa | <=" in cell) is upper, cell


def test_quick_and_explicit_flags() -> None:
    quick = cli.options_dict(["--quick", "--out=x"])
    assert quick["lengths"] == cli.QUICK["lengths"] and quick["repeats"] == cli.QUICK["repeats"]
    explicit = cli.options_dict(["--quick", "--lengths=128", "--repeats=7", "--causal", "--dtype=bfloat16", "--out=x"])
    assert explicit["lengths"] == (128,) and explicit["repeats"] == 7 and explicit["causal"] and explicit["dtype"] == "bfloat16"
    full = cli.options_dict(["--out=x"])
    assert full["lengths"] == (1024, 2048, 4096, 8192, 16384) and full["passes"] == ("fwd", "fwd_bwd")


def test_unknown_preset_is_refused(tmp_path, capsys) -> None:
    assert cli.bench_main(["--presets=dense,nonsense", f"--out={tmp_path}"]) == 2
    assert "nonsense" in capsys.readouterr().err


def test_fresh_process_probe_reports_growth() -> None:
    from sparseformer.bench.methods import Shape

    rep = measure.probe_fresh_process("dense", Shape(1, 128, 2, 16), "fwd_bwd", timeout_s=120)
    assert "error" not in rep, rep
    assert rep["peak_rss_bytes"] >= 0


@pytest.mark.skipif(not _has_attention(), reason="needs the attention package")
def test_compile_only_records_memory_and_kernels_without_running(tmp_path) -> None:
    """`--compile-only` gives the memory table at lengths that do not run; each record names the
    exact part's kernel; `PRESET/exact` is the selection alone; `dense_pallas` is a GPU baseline."""
    argv = ["--presets=dense,rsa,rsa/exact,rsa/scan,dense_pallas", "--lengths=512", "--compile-only", f"--out={tmp_path}"]
    assert cli.bench_main(argv) == 0
    bench = json.loads((tmp_path / "bench.json").read_text())
    rows = {(r["preset"], r["pass"]): r for r in bench["results"]}
    for preset in ("dense", "rsa", "rsa/exact"):
        for p in ("fwd", "fwd_bwd"):
            r = rows[(preset, p)]
            assert r["median_ms"] is None and r["times_ms"] == [] and r["skipped"] == "compile only"
            assert r["compiled_bytes"] > 0 and r["error_needle"] is None
    assert rows[("rsa", "fwd")]["kernel"] == "masked" and rows[("dense", "fwd")]["kernel"] == "xla"
    assert rows[("rsa/scan", "fwd")]["kernel"] == "scan"  # a kernel forced by its variant
    assert rows[("rsa/scan", "fwd")]["flops"] == rows[("rsa", "fwd")]["flops"]
    assert rows[("rsa/exact", "fwd")]["flops"] < rows[("rsa", "fwd")]["flops"]  # no compressed branch
    assert rows[("rsa/exact", "fwd")]["flops_exact"] == rows[("rsa", "fwd")]["flops_exact"]
    assert "GPU" in rows[("dense_pallas", "fwd")]["skipped"]
    md = (tmp_path / "bench.md").read_text()
    assert "Compile only" in md and "rsa: masked" in md and "dense_pallas" in md


def test_unknown_variant_is_refused() -> None:
    assert cli.bench_main(["--presets=rsa/fast", "--out=/nonexistent"]) == 2
    assert cli.bench_main(["--presets=dense/exact", "--out=/nonexistent"]) == 2


@pytest.mark.skipif(not _has_attention(), reason="needs the attention package")
def test_variants_and_overrides_run_with_fidelity(tmp_path) -> None:
    """`PRESET/VARIANT` and `PRESET;section.field=value` run end to end, fidelity included (each
    built through the same config as its timed case; the fidelity step once looked the name up as a
    plain preset and stopped the run); a bad override is refused before anything compiles."""
    spec = "rsa;selection.block_size=32;selection.top_k=15"
    argv = [f"--presets=rsa/exact,{spec}", "--lengths=1024", "--passes=fwd", "--repeats=1", "--warmup=0",
            "--rss=none", f"--out={tmp_path}"]
    assert cli.bench_main(argv) == 0
    rows = {r["preset"]: r for r in json.loads((tmp_path / "bench.json").read_text())["results"]}
    for name in ("rsa/exact", spec, f"{spec}, oracle choice"):
        assert rows[name]["error_needle"] is not None and rows[name].get("error") is None, name
    assert rows[spec]["slots_peaky"] > 8  # the override took: blocks of 32, up to 16 a query block
    assert cli.bench_main(["--presets=rsa;selection.top_k=many", "--out=/nonexistent"]) == 2
    assert cli.bench_main(["--presets=rsa;selection.topk=3", "--out=/nonexistent"]) == 2
