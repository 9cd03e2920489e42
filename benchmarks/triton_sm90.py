"""What the fused kernel's Triton programs need on an H100/H200 (sm_90), found without a GPU.

    python benchmarks/triton_sm90.py OUT_DIR        (needs `pip install triton`: about 1 GB)

The GPU machine is lent rarely and briefly, and a kernel that does not compile there costs the whole
turn. This script compiles the same programs on the CPU: it lowers `attend`'s forward+backward for
`cuda` (as `tests/attention/test_pallas.py` does), takes the Triton IR of each Pallas call (forward,
dq, dk/dv and the long blocks' finish) with the `num_warps`/`num_stages` the kernel asks for, and
compiles it for sm_90 with the `triton` package (its own LLVM and ptxas; no driver needed). For each
program it records the shared memory, the registers per thread and any spills (`cuobjdump` on the
cubin), whether the walk's loads are pipelined (asynchronous copies into shared memory) and its
matmuls use Hopper's wgmma instructions, and the programs one SM can hold at once (the occupancy those allow; H100/H200: 64K
registers, 228 KiB shared memory of which 227 KiB for one program, 64 warps, 32 programs per SM).
The benchmark's shape is compiled once more with each launch (num_warps, num_stages) that the GPU
stage's sweep times (`gpu_check.LAUNCHES`), it and its causal case with each of the dk/dv kernels'
other ways the sweep times (`gpu_check.DKV_VARIANTS`), so its timings can be read beside these
costs, and every correctness case of `gpu_check.py` (`kernel_check.CHECK_CASES`) is compiled as the
check runs it.

What it cannot say: the speed (only a GPU measures that), and whether XLA's own Triton build (the one
the GPU machine's jaxlib bundles) compiles the IR the same way; this is the `triton` package's build
of the same IR. The programs are captured from the lowering (`pallas_kernel.compile_for_gpu`), which
jax 0.10.2 and 0.11.2 both emit as an `__gpu$xla.gpu.triton` custom call holding the same Triton IR
(byte for byte, checked for all 80 programs), compiled by XLA on the device. Writes
OUT_DIR/triton_sm90.json and .md; exits 1 if any program fails to compile or does not fit.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Any

import jax
import jax.numpy as jnp

from sparseformer.attention import attend, pallas_kernel, presets

# H100 / H200 (compute capability 9.0) per-SM limits
SM90 = dict(registers=65536, shared=228 * 1024, shared_per_program=227 * 1024, warps=64, programs=32,
            reserved_shared=1024, register_unit=8)


@dataclasses.dataclass(frozen=True)
class Case:
    label: str
    preset: str = "rsa"
    length: int = 4096
    heads: int = 8
    kv_heads: int = 8
    head_dim: int = 64
    block: int = 64
    causal: bool = False
    padding: bool = False
    dtype: str = "bfloat16"
    precision: str | None = None  # JAX's matmul precision while lowering (float32: TF32 unless "highest")


# the benchmark's shape (bf16, B=1, H=8, D=64, blocks of 64), then the other supported shapes
CASES = (
    Case("rsa"),
    Case("rsa causal, padding", causal=True, padding=True),
    Case("rsa, head dim 128", head_dim=128),
    Case("rsa, blocks of 128", block=128),
    Case("rsa, head dim 128, blocks of 128", head_dim=128, block=128),
    Case("rsa, GQA 8 query / 2 kv heads", kv_heads=2),
    Case("rsa, GQA 8 / 1, head dim 128", kv_heads=1, head_dim=128),
    Case("rsa, GQA 8 / 1, head dim 128, blocks of 128", kv_heads=1, head_dim=128, block=128),
    # the other dtypes gpu_check.py runs: float32 tiles weigh twice (`pallas_kernel.unsupported_reason`)
    Case("rsa float32", dtype="float32"),
    Case("rsa float32, GQA 8 / 2", kv_heads=2, dtype="float32"),
    Case("rsa float32, GQA 8 / 2, head dim 128", kv_heads=2, head_dim=128, causal=True, padding=True, dtype="float32"),
    Case("rsa float32, blocks of 128", block=128, dtype="float32"),
    Case("rsa float32 \"highest\", GQA 8 / 2, head dim 128", kv_heads=2, head_dim=128, causal=True, padding=True,
         dtype="float32", precision="highest"),
    Case("rsa float16, blocks of 128", block=128, dtype="float16"),
)


def lowered_programs(fn, *args, precision: str | None = None) -> list[dict[str, Any]]:
    """Each Pallas call of `jax.jit(fn)` at `args` lowered for `cuda`: its name, Triton IR (text) and
    the `num_warps`/`num_stages` of its custom call."""
    from jax._src.pallas.triton import lowering, pallas_call_registration

    modules: dict[str, str] = {}
    original = lowering.lower_jaxpr_to_triton_module

    def capture(*a, **kw):  # noqa: ANN002, ANN003, ANN202
        result = original(*a, **kw)
        text = result.module.operation.get_asm(enable_debug_info=False)
        modules[re.match(r"module @(\w+)", text).group(1)] = text
        return result

    pallas_call_registration.lowering.lower_jaxpr_to_triton_module = capture
    matmuls = jax.default_matmul_precision(precision) if precision else contextlib.nullcontext()
    try:
        with pallas_kernel.compile_for_gpu(), matmuls:
            text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    finally:
        pallas_call_registration.lowering.lower_jaxpr_to_triton_module = original
    programs = []
    for line in text.splitlines():
        if "__gpu$xla.gpu.triton" not in line:
            continue
        name = re.search(r'name = "(\w+)"', line).group(1)
        warps = int(re.search(r"num_warps = (\d+)", line).group(1))
        stages = int(re.search(r"num_stages = (\d+)", line).group(1))
        programs.append({"kernel": name, "num_warps": warps, "num_stages": stages, "ttir": modules[name]})
    return programs


def triton_programs(case: Case) -> list[dict[str, Any]]:
    """The programs of `case`: `attend`'s forward+backward, as training runs it."""
    q = jax.ShapeDtypeStruct((1, case.length, case.heads, case.head_dim), jnp.dtype(case.dtype))
    kv = jax.ShapeDtypeStruct((1, case.length, case.kv_heads, case.head_dim), jnp.dtype(case.dtype))
    config = presets.get(case.preset)
    config.selection.update(block_size=case.block, kernel="pallas")
    kv_mask = jnp.ones((1, case.length), bool) if case.padding else None

    def loss(q, k, v):  # noqa: ANN001, ANN202
        out, aux = attend(q, k, v, config, causal=case.causal, kv_mask=kv_mask, rng=jax.random.key(0))
        return jnp.sum(out.astype(jnp.float32)) + aux["aux_loss"]

    return lowered_programs(jax.grad(loss, argnums=(0, 1, 2)), q, kv, kv, precision=case.precision)


def check_programs(case: dict[str, Any]) -> list[dict[str, Any]]:
    """The programs of one of `kernel_check.CHECK_CASES` (what gpu_check.py checks): the fused
    kernel's forward+backward exactly as the GPU check runs it (its layout, dtype, mask, row starts
    and matmul precision)."""
    from sparseformer.attention import kernel_check

    args = {k: v for k, v in case.items() if k not in ("name", "precision")}
    (q, k, v), fused_grads, _ = kernel_check.case_grads(**args)
    return lowered_programs(fused_grads, q, k, v, precision=case.get("precision"))


def programs_per_sm(registers: int, shared: int, warps: int) -> dict[str, int]:
    """How many programs of this size one sm_90 SM holds at once, and which resource limits it."""
    per_thread = -(-registers // SM90["register_unit"]) * SM90["register_unit"]
    limits = {
        "registers": SM90["registers"] // max(1, per_thread * 32 * warps),
        "shared": SM90["shared"] // (shared + SM90["reserved_shared"]),
        "warps": SM90["warps"] // warps,
        "programs": SM90["programs"],
    }
    limiter = min(limits, key=limits.get)
    return {"programs_per_sm": limits[limiter], "limited_by": limiter, "warps_per_sm": limits[limiter] * warps}


def compile_sm90(ttir: str, num_warps: int, num_stages: int) -> dict[str, Any]:
    """Compile Triton IR for sm_90 with the `triton` package; shared memory, registers, spills."""
    import triton
    from triton.backends.compiler import GPUTarget

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ttir")
        with open(path, "w") as f:
            f.write(ttir)
        kernel = triton.compile(path, target=GPUTarget("cuda", 90, 32),
                                options=dict(num_warps=num_warps, num_stages=num_stages))
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(kernel.asm["cubin"])
        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        usage = subprocess.run([tool, "--dump-resource-usage", cubin], capture_output=True, text=True,
                               check=True).stdout
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    static_shared = int(re.search(r"SHARED:(\d+)", usage).group(1))
    local = int(re.search(r"LOCAL:(\d+)", usage).group(1))  # bytes per thread: spills, if any
    shared = int(kernel.metadata.shared) + static_shared
    # how the walk runs: its block loads software-pipelined (asynchronous copies into shared memory,
    # `num_stages` deep) and its matmuls on Hopper's warpgroup tensor-core instructions
    pipelined = kernel.asm["ttgir"].count("async_copy_global_to_local")
    wgmma = kernel.asm["ptx"].count("wgmma.mma_async")
    return {"registers": regs, "shared_bytes": shared, "local_bytes": local, "triton": triton.__version__,
            "async_copies": pipelined, "wgmma": wgmma,
            "fits": shared <= SM90["shared_per_program"], **programs_per_sm(regs, shared, num_warps)}


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| case | kernel | warps / stages | registers | spills (local B) | shared KiB | programs / SM (limit) "
             "| async copies / wgmma |",
             "| --- | --- | ---: | ---: | ---: | ---: | --- | ---: |"]
    for r in rows:
        kernel = r["kernel"].removeprefix("sparseformer_block_sparse_").removeprefix("sparseformer_")
        if "error" in r:
            lines.append(f"| {r['case']} | {kernel} | {r['num_warps']} / {r['num_stages']} | failed: {r['error'][:120]} | | | | |")
            continue
        lines.append(f"| {r['case']} | {kernel} | {r['num_warps']} / {r['num_stages']} | {r['registers']} | "
                     f"{r['local_bytes']} | {r['shared_bytes'] / 1024:.1f} | {r['programs_per_sm']} ({r['limited_by']}) | "
                     f"{r['async_copies']} / {r['wgmma']} |")
    return "\n".join(lines) + "\n"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        import triton  # noqa: F401
    except ImportError:
        print("triton_sm90.py: needs the `triton` package (pip install triton; about 1 GB, no GPU needed)",
              file=sys.stderr)
        return 2
    from gpu_check import DKV_VARIANTS, LAUNCHES  # what the GPU stage sweeps

    from sparseformer.attention.kernel_check import CHECK_CASES  # and checks

    runs = [(case.label, dataclasses.asdict(case), lambda case=case: triton_programs(case)) for case in CASES]
    for warps, stages in LAUNCHES:
        def launched(warps=warps, stages=stages):  # noqa: ANN202
            with pallas_kernel.launch_options(warps, stages):
                return triton_programs(CASES[0])

        runs.append((f"{CASES[0].label}, launch {warps}x{stages}", dataclasses.asdict(CASES[0]), launched))
    for name, options in DKV_VARIANTS:  # the dk/dv kernels' other ways, benchmark shape and causal
        for case in CASES[:2]:
            def other_way(case=case, options=options):  # noqa: ANN202
                with pallas_kernel.launch_options(**options):
                    return triton_programs(case)

            runs.append((f"{case.label}, {name}", dataclasses.asdict(case), other_way))
    for c in CHECK_CASES:
        runs.append((f"gpu_check: {c['name']}", {k: str(v) for k, v in c.items()}, lambda c=c: check_programs(c)))
    rows = []
    for label, fields, programs in runs:
        for program in programs():
            row = {"case": label, **fields, **{k: v for k, v in program.items() if k != "ttir"}}
            try:
                row.update(compile_sm90(program["ttir"], program["num_warps"], program["num_stages"]))
            except Exception as e:  # noqa: BLE001 (recorded: the point is to see every failure)
                row["error"] = f"{type(e).__name__}: {e}"
            rows.append(row)
            print(json.dumps({k: row.get(k) for k in ("case", "kernel", "registers", "shared_bytes",
                                                      "local_bytes", "programs_per_sm", "error")}), flush=True)
    os.makedirs(args.out, exist_ok=True)
    report = {"command": "python benchmarks/triton_sm90.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "jax": jax.__version__, "limits": SM90, "rows": rows}
    with open(os.path.join(args.out, "triton_sm90.json"), "w") as f:
        json.dump(report, f, indent=1)
    text = markdown(rows)
    with open(os.path.join(args.out, "triton_sm90.md"), "w") as f:
        f.write(text)
    print(text)
    bad = [r for r in rows if "error" in r or not r["fits"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
