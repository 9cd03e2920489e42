"""The GPU measurement's scripts run end to end on the CPU at tiny sizes.

`benchmarks/gpu.sh` gets one short turn on a lent GPU, so its Python must not fail there for a
reason the CPU could have shown: a renamed function, a wrong argument, a report key. Here the fused
kernel runs in Pallas interpret mode and the GPU-only baselines (cuDNN, JAX's Triton and Mosaic GPU
flash attention) fail, which the scripts must record and go on from.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import breakdown  # noqa: E402
import gpu_check  # noqa: E402


def test_gpu_check_correctness_case_in_place_gqa_causal():
    r = gpu_check.check("tiny", T=256, b=32, D=64, H=4, G=2, dtype=jnp.float32, causal=True, padding=True,
                        row_starts=True, layout="BTHD")
    assert r["ok"] and r["deterministic"], r
    assert set(r["errors"]) == {"out", "lse", "dq", "dk", "dv"}


def test_gpu_check_kernel_speed_records_what_it_cannot_time():
    row = gpu_check.kernel_speed(512, H=2, dtype=jnp.float32, repeats=1, warmup=0)
    for name in ("fused_fwd", "fused_fwd_bwd", "fused_bthd_fwd", "fused_bthd_fwd_bwd", "scan_fwd", "scan_fwd_bwd"):
        assert row[f"{name}_ms"] > 0 and row[f"{name}_tflops"] > 0, (name, row)
    assert row["fused_vs_scan_rate_fwd_bwd"] > 0 and row["fused_bthd_vs_fused_rate_fwd"] > 0
    # no GPU here: the GPU baselines fail, each recorded in place of its timing
    assert "cudnn_fwd_error" in row and "cudnn_fwd_ms" not in row
    assert "pallas_dense_error" in row or "pallas_dense_fwd_ms" in row
    json.dumps(row)  # what main() writes


def test_breakdown_writes_every_component(tmp_path):
    breakdown.main([str(tmp_path), "--lengths=512", "--heads=2", "--repeats=1"])
    report = json.loads((tmp_path / "breakdown.json").read_text())
    (row,) = report["rows"]
    assert row["length"] == 512 and row["kernel"] in ("scan", "masked", "pallas")
    assert set(row["fwd_ms"]) == {"full", "dense", "exact", "choice", "compressed", "rest"}
    assert set(row["fwd_bwd_ms"]) == {"full", "dense", "exact", "compressed", "rest"}
