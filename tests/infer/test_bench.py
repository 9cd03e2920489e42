"""`sparseformer bench --model`: the plumbing on tiny runs (numbers are measured, never asserted fast)."""

from __future__ import annotations

import json

import pytest

from conftest import RUNS, make_run

from sparseformer.bench.cli import bench_main


@pytest.mark.slow
def test_dense_and_rsa_side_by_side(runs, tmp_path):
    dense = make_run(tmp_path / "dense", "listops", "dense", RUNS["listops"][1])
    out = tmp_path / "out"
    code = bench_main([f"--model={dense},{runs['listops']},{runs['mqar']}", "--lengths=64", "--batch-sizes=1,2",
                       "--repeats=2", "--rss=none", "--bucketing=8", "--bucketing-lengths=uniform,lognormal",
                       f"--out={out}"])
    assert code == 0
    bench = json.loads((out / "inference.json").read_text())
    rows = {(r["task"], r["attention"], r["length"]): r for r in bench["results"]}
    rsa, d = rows[("listops", "rsa", 128)], rows[("listops", "dense", 128)]
    assert rsa["trained_params"] and not rows[("listops", "rsa", 64)]["trained_params"]
    assert rsa["latency_speedup"] == d["latency_ms_p50"] / rsa["latency_ms_p50"]
    assert rsa["compiled_vs_dense"] == rsa["compiled_bytes"] / d["compiled_bytes"]
    assert set(rsa["throughput_by_batch"]) == {"1", "2"} and rsa["decode_ms_per_token_p50"] is None
    lm = rows[("mqar", "rsa", 64)]
    assert lm["decode_ms_per_token_p50"] > 0 and lm["latency_speedup"] is None  # no dense mqar run here
    assert [(b["distribution"], b["attention"]) for b in bench["bucketing"]] == [
        (d, a) for d in ("uniform", "lognormal") for a in ("dense", "rsa", "rsa")]
    assert all(b["bucketed"]["padding_fraction"] <= b["padded"]["padding_fraction"] for b in bench["bucketing"])
    md = (out / "inference.md").read_text()
    assert "## listops (classifier)" in md and "x)" in md and "Bucketed batches" in md
    assert (out / "inference.png").stat().st_size > 0
    assert bench_main(["--model=", f"--out={out}"]) == 2
    assert bench_main([f"--model={dense}", "--bucketing=8", "--bucketing-lengths=zipf", f"--out={out}"]) == 2


def test_length_distributions():
    import numpy as np

    from sparseformer.infer.bench import sample_lengths

    rng = np.random.default_rng(0)
    u = sample_lengths("uniform", 4000, 1024, rng)
    assert u.min() >= 64 and u.max() <= 1024 and 0.5 < u.mean() / 1024 < 0.56
    ln = sample_lengths("lognormal", 4000, 1024, rng)
    assert ln.min() >= 4 and ln.max() == 1024 and 110 < np.median(ln) < 145  # median max_len/8
    assert 0.01 < np.mean(ln == 1024) < 0.03  # the tail past max_len, clipped
