"""The GPU measurement's scripts run end to end on the CPU at tiny sizes.

`benchmarks/gpu.sh` gets one short turn on a lent GPU, so its Python must not fail there for a
reason the CPU could have shown: a renamed function, a wrong argument, a report key. Here the fused
kernel runs in Pallas interpret mode and the GPU-only baselines (cuDNN, JAX's Triton and Mosaic GPU
flash attention) fail, which the scripts must record and go on from.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import breakdown  # noqa: E402
import gpu_check  # noqa: E402

from sparseformer.attention import kernel_check  # noqa: E402


def test_gpu_check_correctness_case_in_place_gqa_causal():
    r = kernel_check.check("tiny", T=256, b=32, D=64, H=4, G=2, dtype=jnp.float32, causal=True, padding=True,
                           row_starts=True, layout="BTHD", precision="highest")
    assert r["ok"] and r["deterministic"] and r["precision"] == "highest", r
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


# ---------------------------------------------------------------- gpu.sh itself

ROOT = Path(__file__).resolve().parents[2]


def _gpu_sh_calls(tmp_path: Path, *, check_fails: bool) -> list[list[str]]:
    """Every Python command `gpu.sh` runs, recorded by a stand-in for the interpreter (which reports
    a GPU, and a failed kernel check when asked) instead of run."""
    record = tmp_path / "calls.jsonl"
    fake = tmp_path / "python"
    fake.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        "with open(os.environ['GPU_SH_RECORD'], 'a') as f:\n"
        "    f.write(json.dumps([sys.argv[1:], os.environ.get('JAX_COMPILATION_CACHE_DIR')]) + '\\n')\n"
        "sys.exit(1 if os.environ.get('GPU_SH_FAIL_CHECK') and sys.argv[1:2] == ['benchmarks/gpu_check.py'] else 0)\n"
    )
    fake.chmod(0o755)
    env = {"PATH": os.environ["PATH"], "PYTHON": str(fake), "GPU_SH_RECORD": str(record), "TMPDIR": str(tmp_path),
           **({"GPU_SH_FAIL_CHECK": "1"} if check_fails else {})}
    out = tmp_path / "out"
    # as the device tool runs it: two calls on the same machine
    for stages in (["check", "bidir"], ["causal", "memory", "breakdown", "tune"]):
        done = subprocess.run(["bash", "benchmarks/gpu.sh", str(out), *stages], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
    assert (out / "results.tar.gz").exists() and (out / "summary.txt").exists()
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    # every process shares one compilation cache (the memory probes load what the bench compiled)
    caches = {cache for argv, cache in calls if argv[:2] != ["-m", "pip"]}
    assert caches == {str(tmp_path / "sparseformer-gpu-jax-cache")}, calls
    return [argv for argv, _ in calls]


@pytest.mark.parametrize("check_fails", [False, True], ids=["kernel-ok", "kernel-check-fails"])
def test_gpu_sh_runs_every_stage_with_flags_its_tools_accept(tmp_path, check_fails):
    """Each command gpu.sh would run on the GPU parses with its tool's own parser and names known
    presets, so a typo in the script cannot cost the one lent turn; after a failed kernel check the
    bench stages time the sparse presets on the scan kernel."""
    from sparseformer.bench import cli, methods, residuals, runner

    calls = _gpu_sh_calls(tmp_path, check_fails=check_fails)
    benches, residual_calls, breakdowns, checks = [], [], [], []
    for argv in calls:
        if argv[:3] == ["-m", "sparseformer", "bench"]:
            options = cli.options_from_args(cli._parser().parse_args(argv[3:]))
            runner.validate_options(options, methods.known_names())  # raises on a bad flag or preset
            benches.append(options)
        elif argv[:2] == ["-m", "sparseformer.bench.residuals"]:
            args = residuals.parser().parse_args(argv[2:])
            for name in args.presets.split(","):
                assert name == "dense_pallas" or methods.preset_config(name), name
            residual_calls.append(args)
        elif argv[:1] == ["benchmarks/breakdown.py"]:
            args = breakdown.parser().parse_args(argv[1:])
            methods.preset_config(args.preset)
            breakdowns.append(args)
        elif argv[:1] == ["benchmarks/gpu_check.py"]:
            args = gpu_check.parser().parse_args(argv[1:])
            checks.append((args.out, args.tune))
        else:  # the GPU probe and the version line
            assert argv[0] in ("-c", "-m") and "jax" in argv[1] or argv[:2] == ["-m", "pip"], argv
    out = str(tmp_path / "out")
    # the check, then (unless it failed) the launch sweep last
    assert checks == ([(f"{out}/check", False)] if check_fails else [(f"{out}/check", False), (f"{out}/tune", True)])
    assert len(residual_calls) == 1 and len(breakdowns) == 2
    assert [o.causal for o in benches] == [False, True, False]  # bidir, causal, memory
    assert all(o.dtype == "bfloat16" and o.heads == 8 and o.head_dim == 64 and o.dense_impl == "cudnn"
               for o in benches)
    bidir, causal, memory = benches
    assert list(bidir.lengths) == [4096, 8192, 16384, 32768, 65536] and memory.rss == "all"
    sparse = [p for o in benches for p in o.presets if not p.startswith("dense")]
    if check_fails:
        assert sparse and all(p.endswith("/scan") for p in sparse), sparse
        assert "rsa/exact" not in bidir.presets
    else:
        assert "rsa" in bidir.presets and "rsa/exact" in causal.presets and not any("/scan" in p for p in sparse)
    for o in benches:
        assert "dense" in o.presets and ("dense_pallas" in o.presets or o is memory)


def _lower_for_the_gpu(fn, *args) -> str:
    from sparseformer.attention import pallas_kernel

    with pallas_kernel.compile_for_gpu():
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def test_every_method_gpu_sh_times_lowers_for_the_gpu(tmp_path, monkeypatch):
    """What gpu.sh times on the GPU, built as the bench and the breakdown build it there (`auto`
    resolved to the fused kernel), lowers for `cuda`, forward and forward+backward: so no preset the
    script names (nsa, bigbird, local, the causal ones, `PRESET/exact`) meets the GPU lowering for the
    first time in the lent turn. cuDNN's dense attention is left out: lowering it asks for cuDNN,
    which a CPU install lacks (it ran on the H200 in the `scan` kernel's turn)."""
    from sparseformer.bench import cli, methods

    calls = _gpu_sh_calls(tmp_path, check_fails=False)
    bench_cases, breakdown_cases = set(), set()
    for argv in calls:
        if argv[:3] == ["-m", "sparseformer", "bench"]:
            options = cli.options_from_args(cli._parser().parse_args(argv[3:]))
            bench_cases |= {(p, options.causal) for p in options.presets}
        elif argv[:1] == ["benchmarks/breakdown.py"]:
            args = breakdown.parser().parse_args(argv[1:])
            breakdown_cases.add((args.preset, args.causal))
    assert {("nsa", True), ("bigbird", False), ("local", False), ("dense_pallas", True)} <= bench_cases
    assert breakdown_cases == {("rsa", False), ("rsa", True)}

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # what the bench and `auto` ask
    T, H, D = 1024, 8, 64
    q = jnp.zeros((1, T, H, D), jnp.bfloat16)
    w = jnp.zeros((1, T, H, D), jnp.float32)
    for name, causal in sorted(bench_cases - {("dense", False), ("dense", True)}):
        method = methods.build(name, methods.Shape(1, T, H, D, causal, "bfloat16"), dense_impl="cudnn")
        sparse = name != "dense_pallas"
        assert method.kernel == ("pallas" if sparse else "pallas-triton"), (name, method.kernel)
        for pass_name in ("fwd", "fwd_bwd"):
            args = (q, q, q, method.params, jax.random.key(0)) + ((w,) if pass_name == "fwd_bwd" else ())
            text = _lower_for_the_gpu(methods.make_pass(method, pass_name), *args)
            kernels = set(re.findall(r"sparseformer_block_sparse_\w+", text))
            if sparse:  # the fused kernel's programs, and no gathered scan in their place
                assert kernels == ({"sparseformer_block_sparse_fwd"} if pass_name == "fwd" else
                                   {f"sparseformer_block_sparse_{k}" for k in ("fwd", "dq", "dkv", "dkv_finish")}), (
                    name, causal, pass_name, kernels)
                # rsa's maxkey estimate is fused too (nsa's pooled one and bigbird's random draws are XLA's)
                assert ("sparseformer_maxkey_scores" in text) == name.startswith("rsa"), (name, pass_name)
            else:
                assert "__gpu$xla.gpu.triton" in text, name
    from sparseformer.attention import pallas_estimate

    for preset, causal in sorted(breakdown_cases):
        with monkeypatch.context() as m:  # the choice it passes on as data is computed here, on the CPU
            m.setattr(pallas_estimate, "fused_estimator", lambda *a: False)
            fwd, bwd, args, kernel = breakdown.components(preset, T, H=H, D=D, dtype=jnp.bfloat16, causal=causal)
        assert kernel == "pallas"
        assert "sparseformer_maxkey_scores" in _lower_for_the_gpu(fwd["choice"], *args["choice"])  # as attend chooses
        for name in set(fwd) - {"dense"}:
            _lower_for_the_gpu(fwd[name], *args[name])
        for name in set(bwd) - {"dense"}:
            _lower_for_the_gpu(bwd[name], *args[name])


# ---------------------------------------------------------------- triton_sm90.py (its triton-free half)


def test_triton_sm90_takes_each_kernels_triton_ir_and_launch_options():
    """The script's lowering half (its compile half needs the `triton` package, not a test
    dependency): every Pallas call of a forward+backward, with the IR and options the GPU gets."""
    import triton_sm90

    programs = triton_sm90.triton_programs(triton_sm90.Case("tiny", length=512, causal=True, padding=True))
    names = [p["kernel"] for p in programs]
    assert sorted(names) == sorted([f"sparseformer_block_sparse_{k}" for k in ("fwd", "dq", "dkv", "dkv_finish")]
                                   + ["sparseformer_maxkey_scores"]  # rsa's estimate, fused
                                   + [f"sparseformer_pool_{k}" for k in ("fwd", "dq", "dsum")])  # and its pooled branch
    for p in programs:
        assert p["ttir"].startswith(f"module @{p['kernel']}") and "tt.func" in p["ttir"], p["ttir"][:200]
        assert p["num_warps"] == 4 and p["num_stages"] == 2  # blocks of 64, head dim 64: Plan.params


def test_triton_sm90_lowers_the_gpu_checks_own_cases():
    """Every correctness case gpu_check runs lowers (its kernels are what the tool compiles), as the
    check builds it: layout, mask, row starts and matmul precision included."""
    import triton_sm90

    assert len(kernel_check.CHECK_CASES) == 6
    tiny = dict(name="tiny", T=256, b=32, D=64, H=4, G=2, dtype=jnp.float32, causal=True, padding=True,
                row_starts=True, layout="BTHD", precision="highest")
    programs = triton_sm90.check_programs(tiny)
    assert [p["kernel"].removeprefix("sparseformer_block_sparse_") for p in programs] == ["fwd", "dq", "dkv", "dkv_finish"]
    assert all("inputPrecision" not in p["ttir"] for p in programs)  # "highest": full float32


def test_triton_sm90_occupancy_follows_the_sm90_limits():
    import triton_sm90

    # 123 registers round up to 128: 128 x 32 threads x 4 warps = 16K of the SM's 64K registers
    assert triton_sm90.programs_per_sm(123, 41 * 1024, 4) == {"programs_per_sm": 4, "limited_by": "registers",
                                                               "warps_per_sm": 16}
    # 193 KiB of shared memory (+1 KiB reserved): one program per SM
    assert triton_sm90.programs_per_sm(64, 193 * 1024, 4)["limited_by"] == "shared"
    assert triton_sm90.programs_per_sm(24, 1024, 16) == {"programs_per_sm": 4, "limited_by": "warps", "warps_per_sm": 64}


def test_launch_sweep_times_each_launch_and_names_the_fastest():
    row = gpu_check.launch_sweep(256, H=2, dtype=jnp.float32, launches=((4, 1), (4, 2)), pieces=(2,),
                                 long_lists=(8,), repeats=1, warmup=0)
    assert row["default"] == "4x2" and row["default_dkv"] == "further pieces first, finish adds only"
    assert set(row["launches"]) == {"4x1", "4x2", "piece 2", "long lists 8", "further pieces last",
                                    "finish walks first pieces"}
    assert all(r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 for r in row["launches"].values()), row
    # 4 query blocks, 8 slots: in pieces of 16, room for 4 long lists of 1 piece, capped at the most any
    # selection can use, ceil(n K / 16) = 2, whatever the long lists; in pieces of 2, 4 x (4 / 2) = 8
    parts = {name: r["partial_sums_mib"] for name, r in row["launches"].items()}
    assert parts["piece 2"] == 4 * parts["long lists 8"] == 4 * parts["4x2"] == 4 * parts["4x1"] > 0, parts
    assert parts["further pieces last"] == parts["4x2"]  # the order moves programs, not memory
    # the finish walking first pieces: no piece of a 4-entry list is a partial sum (1, the least)
    assert 2 * parts["finish walks first pieces"] == parts["4x2"]
    assert row["best_fwd_bwd_ms"] in row["launches"] and row["best_vs_default_fwd_bwd_ms"] >= 1.0
    json.dumps(row)


def test_the_sweep_with_more_sinks_than_long_lists_shows_the_pieces_grow(monkeypatch):
    """4 sinks (blocks every query block chose) in pieces of 4: 16 query blocks need at least 4 x 4
    pieces as partial sums. The default partial sums hold 4 long lists (16), one long list 4: the
    pieces the sweep records are the shortest of the kernel's ladder whose pieces fit each (counted
    here piece by piece; a piece as long as a list walks it whole, no partial sum), and one long
    list's are longer, with a quarter of the memory."""
    from sparseformer.attention import pallas_kernel

    monkeypatch.setattr(pallas_kernel, "LIST_PIECE", 4)
    sel, _ = gpu_check.rsa_like_selection(512, b=32, H=1, sinks=4)
    idx, valid = np.asarray(sel.idx[0, 0]), np.asarray(sel.valid[0, 0])
    for j in range(4):  # every query block chose each sink once
        assert all(((idx[i] == j) & valid[i]).sum() == 1 for i in range(16))
    lengths = np.bincount(idx[valid], minlength=16)

    plan = pallas_kernel.make_plan(False, sel, num_heads=1, head_dim=16, has_mask=False)
    assert pallas_kernel.piece_ladder(plan) == (4, 5, 6, 7, 8, 10, 12, 15, 18)

    def shortest(room):  # the walk of the shortest ladder piece whose pieces fit `room` partial sums
        piece = next(p for p in pallas_kernel.piece_ladder(plan)
                     if np.where(lengths > p, -(-lengths // p), 0).sum() <= room)
        return min(piece, lengths.max())

    row = gpu_check.launch_sweep(512, b=32, D=16, H=1, dtype=jnp.float32, launches=None, pieces=(), long_lists=(1,),
                                 dkv=(), sinks=4, repeats=1, warmup=0)
    assert row["sinks"] == 4 and row["default_long_lists"] == 4
    assert set(row["launches"]) == {row["default"], "long lists 1"}
    default, narrow = row["launches"][row["default"]], row["launches"]["long lists 1"]
    assert (default["piece_walked"], narrow["piece_walked"]) == (shortest(16), shortest(4))
    assert 4 <= default["piece_walked"] < narrow["piece_walked"]
    assert default["partial_sums_mib"] == 4 * narrow["partial_sums_mib"] > 0


def test_the_tune_stage_writes_every_sweep_and_its_summary(tmp_path, capsys):
    """`gpu_check.py --tune` (gpu.sh's last stage) as it runs there, on tiny shapes: a row per sweep
    in tune.json, and the summary names each piece, long-lists and order variant against the default."""
    sweeps = ((256, False, dict(launches=((4, 2),), pieces=(2,), long_lists=())),
              (256, True, dict(sinks=2, launches=None, pieces=(), long_lists=(2, 1), dkv=())))
    assert gpu_check.tune(str(tmp_path), sweeps, b=32, D=16, H=1, dtype=jnp.float32, repeats=1, warmup=0) == 0
    rows = json.loads((tmp_path / "tune.json").read_text())["rows"]
    assert [(r["causal"], r["sinks"], sorted(r["launches"])) for r in rows] == [
        (False, 1, ["4x2", "finish walks first pieces", "further pieces last", "piece 2"]),
        (True, 2, ["4x2", "long lists 1", "long lists 2"])]
    printed = capsys.readouterr().out
    default = "x the time of piece 16 with 4 long lists, further pieces first, finish adds only"
    assert printed.count(default) == 5, printed
    for variant in ("further pieces last", "finish walks first pieces"):
        assert f"T=256 bidir sinks 1: {variant}: fwd+bwd" in printed
    assert "T=256 causal sinks 2: long lists 1" in printed


def test_launch_options_reach_the_gpu_programs():
    """`launch_options` (the sweep's knob) changes what every lowered program is compiled with."""
    import triton_sm90

    from sparseformer.attention import pallas_kernel

    with pallas_kernel.launch_options(8, 3):
        programs = triton_sm90.triton_programs(triton_sm90.Case("tiny", length=512))
    walks = [p for p in programs if p["kernel"].startswith("sparseformer_block_sparse_")]
    assert len(walks) == 4 and all((p["num_warps"], p["num_stages"]) == (8, 3) for p in walks)
    others = [p for p in programs if p not in walks]  # the fused estimate and pooled branch keep their own
    assert len(others) == 4 and all((p["num_warps"], p["num_stages"]) == (4, 2) for p in others)
    with pytest.raises(ValueError, match="num_warps and num_stages together"):
        with pallas_kernel.launch_options(8):
            pass


def test_list_piece_option_reaches_the_plan_and_keeps_the_result():
    """`launch_options(list_piece=)` (the sweep's other knob) cuts the dk/dv inverted lists into
    pieces of that many entries (more, smaller partial sums for small pieces), and the gradients do
    not change beyond float32 summation order."""
    from sparseformer.attention import pallas_kernel

    T, b, H, D = 512, 32, 2, 16
    sel, _ = gpu_check.rsa_like_selection(T, b=b, H=H)  # its global block: a list of all 16 query blocks
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(key, (1, T, H, D), jnp.float32) for key in keys)

    def grads(q, k, v):
        return jax.grad(lambda q, k, v: jnp.sum(pallas_kernel.fused_block_attention(
            False, q, k, v, sel, layout="BTHD")[0] ** 2), argnums=(0, 1, 2))(q, k, v)

    results = {}
    for piece, long_lists in ((None, None), (4, None), (4, 8)):
        with pallas_kernel.launch_options(list_piece=piece, long_lists=long_lists):
            plan = pallas_kernel.make_plan(False, sel, num_heads=H, head_dim=D, has_mask=False)
            pieces, _ = pallas_kernel.inverted_lists(plan, sel.idx[:, :1], sel.valid[:, :1], None)
            results[piece, long_lists] = (plan.piece, pieces.shape[2], jax.jit(grads)(q, k, v))
    n, K = sel.idx.shape[2:]  # 16 query blocks, 8 slots
    # partial-sum programs: 4 long lists' (16 / piece each), at most ceil(n K / piece)
    assert results[None, None][:2] == (pallas_kernel.LIST_PIECE, n + 4)  # min(4 x 1, 8)
    assert results[4, None][:2] == (4, n + 4 * 4)
    assert results[4, 8][:2] == (4, n + 8 * 4)  # all of ceil(n K / 4) = 32
    for other in ((4, None), (4, 8)):
        for a, c in zip(results[None, None][2], results[other][2], strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-5, atol=1e-6)


def test_dkv_kernels_drop_pipelining_when_a_group_spans_tiles():
    """8 query heads of dim 128 per key/value head: the dk/dv walk unrolls 4 tiles, whose pipelined
    buffers need 565 KiB of shared memory at 2 stages (227 on an H100/H200; `triton_sm90.py`), so the
    dk/dv kernels take 1 stage there; the forward and dq keep 2."""
    import triton_sm90

    stages = {p["kernel"].removeprefix("sparseformer_block_sparse_"): p["num_stages"]
              for p in triton_sm90.triton_programs(triton_sm90.Case("mqa", length=512, kv_heads=1, head_dim=128))}
    assert stages == {"fwd": 2, "dq": 2, "dkv": 1, "dkv_finish": 1, "sparseformer_maxkey_scores": 2,
                      "sparseformer_pool_fwd": 2, "sparseformer_pool_dq": 2, "sparseformer_pool_dsum": 2}, stages
    stages = {p["kernel"]: p["num_stages"] for p in triton_sm90.triton_programs(triton_sm90.Case("mha", length=512))}
    assert set(stages.values()) == {2}, stages


def test_float32_matmuls_follow_jax_matmul_precision():
    """The fused kernels' float32 matmuls run TF32 on a GPU by default (as XLA's do) and full float32
    under "highest": what the module says, and why gpu_check compares float32 under "highest"."""
    import re

    import jax
    import triton_sm90

    case = triton_sm90.Case("f32", length=512, dtype="float32")
    default = triton_sm90.triton_programs(case)
    with jax.default_matmul_precision("highest"):
        highest = triton_sm90.triton_programs(case)
    finish = "sparseformer_block_sparse_dkv_finish"  # adds partial sums: no matmul
    assert all("tt.dot" not in p["ttir"] for p in default + highest if p["kernel"] == finish)
    walks = [p for p in default if p["kernel"] != finish]
    assert len(walks) == 7  # forward, dq, dk/dv, the fused estimate and the pooled branch's three
    for p in walks:
        assert set(re.findall(r"inputPrecision = (\w+)", p["ttir"])) == {"tf32"}, p["kernel"]
    for p in highest:
        if p["kernel"] != finish:  # printed only when not ieee
            assert "tt.dot" in p["ttir"] and "inputPrecision" not in p["ttir"], p["kernel"]


def test_the_tune_stage_saves_each_variant_as_it_is_timed(tmp_path, monkeypatch):
    """The device's time limit may cut the tune stage short: tune.json is rewritten after every
    variant, the sweep still running marked incomplete, so what was timed is kept."""
    real = gpu_check.launch_sweep
    seen = []

    def cut_short(*args, on_variant=None, **kwargs):  # noqa: ANN002, ANN003, ANN202
        def record(row):  # noqa: ANN001, ANN202
            on_variant(row)
            seen.append(json.loads((tmp_path / "tune.json").read_text()))
            if len(seen) == 2:
                raise TimeoutError("the device call's limit")

        return real(*args, on_variant=record, **kwargs)

    monkeypatch.setattr(gpu_check, "launch_sweep", cut_short)
    sweeps = ((256, False, dict(launches=((4, 2), (4, 1)), pieces=(2,), long_lists=(), dkv=())),)
    with pytest.raises(TimeoutError):
        gpu_check.tune(str(tmp_path), sweeps, b=32, D=16, H=1, dtype=jnp.float32, repeats=1, warmup=0)
    assert [sorted(r["rows"][0]["launches"]) for r in seen] == [["4x2"], ["4x1", "4x2"]]
    assert all(r["rows"][0]["incomplete"] and len(r["rows"]) == 1 for r in seen)
    kept = json.loads((tmp_path / "tune.json").read_text())["rows"][0]
    assert kept["incomplete"] and kept["launches"]["4x1"]["fwd_bwd_ms"] > 0


def test_dense_pallas_compiles_for_a_gpu_without_one():
    """`benchmarks/gpu_aot.py` builds JAX's Pallas flash attention under `compile_for_gpu` (no GPU,
    no monkeypatched backend); elsewhere on a CPU it is skipped, as it would only run interpreted."""
    from sparseformer.attention import pallas_kernel
    from sparseformer.bench import methods

    shape = methods.Shape(1, 256, 2, 64, dtype="bfloat16")
    with pytest.raises(methods.SkipCase, match="GPU"):
        methods.build("dense_pallas", shape)
    q = jnp.zeros((1, 256, 2, 64), jnp.bfloat16)
    with pallas_kernel.compile_for_gpu():
        method = methods.build("dense_pallas", shape)
        text = _lower_for_the_gpu(methods.make_pass(method, "fwd"), q, q, q, {}, jax.random.key(0))
    assert "__gpu$xla.gpu.triton" in text


def test_the_check_stage_checks_the_fused_branches_and_fails_on_them(tmp_path, monkeypatch):
    """gpu_check's correctness stage runs the exact kernel's cases and then the fused pooled branch and
    estimate's (`kernel_check.BRANCH_CASES`); a disagreeing branch fails the stage, so gpu.sh times
    the presets on the scan kernel. Tiny cases here, interpreted; no speed rows."""
    from sparseformer.attention import pallas_pool

    tiny = dict(T=128, b=16, D=16, H=2, dtype=jnp.float32, causal=True, padding=True, row_starts=True,
                precision="highest")
    monkeypatch.setattr(gpu_check, "CHECK_CASES", [dict(name="tiny", G=1, **tiny)])
    monkeypatch.setattr(gpu_check, "BRANCH_CASES", [dict(name="tiny", **tiny)])
    monkeypatch.setattr(gpu_check, "kernel_speed", lambda *a, **k: {})
    assert gpu_check.main(str(tmp_path)) == 0
    checks = json.loads((tmp_path / "check.json").read_text())["checks"]
    assert [c["name"] for c in checks] == ["tiny", "pool and estimate: tiny"] and all(c["ok"] for c in checks)
    real = pallas_pool.pool_attention
    monkeypatch.setattr(pallas_pool, "pool_attention", lambda *a, **k: tuple(x * 1.01 for x in real(*a, **k)))
    assert gpu_check.main(str(tmp_path)) == 1
