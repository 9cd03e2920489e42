"""The benchmark's programs compiled for an H200 on a machine without a GPU: memory and launches.

    benchmarks/gpu_aot_deps.sh        (once: JAX's CUDA plugin, ptxas and cuDNN into .gpu-aot/)
    python benchmarks/gpu_aot.py OUT_DIR [--presets=dense,dense_pallas,rsa,nsa,bigbird,local]
        [--lengths=4096,16384,65536] [--causal] [--passes=fwd_bwd] [--heads=8] [--head-dim=64]

XLA's own GPU compiler (the CUDA plugin's, deviceless: a target description of an H200 stands in
for the device) compiles each method's pass exactly as `sparseformer bench --dtype=bfloat16` would
run it on the GPU, the fused kernel compiled through XLA's Triton and ptxas for sm_90a. For each
it records, with no device:
  - memory: XLA's memory analysis of the compiled program (arguments, outputs, temporaries) and
    `peak = argument + output + temp - alias`, with its ratio to `dense` (cuDNN) at the same
    length. It is the buffer assignment the GPU would run, so it does not vary between runs; a
    real run adds the allocator's rounding and cuDNN/cuBLAS workspaces outside XLA's view;
  - launches: kernels one run launches (`sparseformer.bench.hlo_stats`: fusions, custom calls,
    copies, loops multiplied out) and by which function of the code, and the loops' trip counts.
A GPU time of a program of N small kernels is at least about N times a kernel's launch and ramp-up
(a few microseconds), which this counts and does not time. Writes OUT_DIR/gpu_aot.json and
OUT_DIR/gpu_aot.md. The GPU stage (`benchmarks/gpu.sh`) measures what this predicts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEPS = ROOT / ".gpu-aot"

# An H200 as XLA's GPU compiler reads it (stream_executor.GpuTargetConfigProto): the figures of the
# device (132 SMs, 227 KiB of shared memory a block may opt into, compute capability 9.0).
H200_TARGET = """
gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  shared_memory_per_block_optin: 232448
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 4800000000000
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: 150000000000
  cuda_compute_capability { major: 9 minor: 0 }
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 8 patch: 0 }
device_description_str: "NVIDIA H200"
"""


def gpu_device():
    """A compile-only H200 device (`jax.experimental.topologies`), no GPU needed."""
    from jax.experimental import topologies

    topology = topologies.get_topology_desc("h200", "cuda", target_config=H200_TARGET, topology="1x1x1")
    return topology.devices[0]


def compile_case(name: str, shape, pass_name: str, device) -> dict:
    """One method's pass compiled for `device`: its memory analysis and launches."""
    import jax
    import jax.numpy as jnp

    from sparseformer.attention import pallas_kernel
    from sparseformer.bench import hlo_stats, methods

    sharding = jax.sharding.SingleDeviceSharding(device)

    def abstract(x):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    with pallas_kernel.compile_for_gpu():
        method = methods.build(name, shape, dense_impl="cudnn")
        qkv = jax.ShapeDtypeStruct((shape.batch, shape.length, shape.heads, shape.head_dim),
                                   jnp.dtype(shape.dtype), sharding=sharding)
        args = (qkv, qkv, qkv, jax.tree.map(abstract, method.params), abstract(jax.random.key(0)))
        if pass_name == "fwd_bwd":
            args += (jax.ShapeDtypeStruct(qkv.shape, jnp.float32, sharding=sharding),)
        t0 = time.perf_counter()
        compiled = jax.jit(methods.make_pass(method, pass_name)).trace(*args).lower().compile()
        seconds = time.perf_counter() - t0
    ma = compiled.memory_analysis()
    memory = {key: int(getattr(ma, f"{key}_size_in_bytes", 0)) for key in ("argument", "output", "temp", "alias")}
    memory["peak"] = memory["argument"] + memory["output"] + memory["temp"] - memory["alias"]
    text = compiled.as_text()
    stats = hlo_stats.launches(text)
    return {
        "preset": name, "length": shape.length, "causal": shape.causal, "pass": pass_name,
        "kernel": method.kernel, "compile_s": round(seconds, 2), "memory": memory,
        "launches": stats["launches"], "by_kind": stats["by_kind"],
        "loops": [{k: loop[k] for k in ("trip_count", "runs", "op_name")} for loop in stats["loops"]],
        "by_source": hlo_stats.launches_by_source(text),
    }


def add_ratios(results: list[dict]) -> None:
    """`peak_vs_dense`: each peak over dense's at the same length, masking and pass."""
    dense = {(r["length"], r["causal"], r["pass"]): r["memory"]["peak"] for r in results if r["preset"] == "dense"}
    for r in results:
        base = dense.get((r["length"], r["causal"], r["pass"]))
        r["peak_vs_dense"] = round(r["memory"]["peak"] / base, 3) if base else None


def table(results: list[dict]) -> str:
    rows = ["| preset | T | causal | pass | kernel | peak MB | vs dense | temp MB | launches | loops (trips) |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['preset']} | {r['length']} | {r['causal']} | {r['pass']} | error: {r['error'][:80]} |"
                        " | | | | |")
            continue
        loops = ", ".join(str(loop["trip_count"]) for loop in r["loops"]) or "-"
        ratio = f"{r['peak_vs_dense']:.2f}" if r["peak_vs_dense"] else "-"
        rows.append(f"| {r['preset']} | {r['length']} | {r['causal']} | {r['pass']} | {r['kernel']} | "
                    f"{r['memory']['peak'] / 2**20:.0f} | {ratio} | {r['memory']['temp'] / 2**20:.0f} | "
                    f"{r['launches']} | {loops} |")
    return "\n".join(rows) + "\n"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir")
    p.add_argument("--presets", default="dense,dense_pallas,rsa,nsa,bigbird,local")
    p.add_argument("--lengths", default="4096,16384,65536")
    p.add_argument("--causal", action="store_true")
    p.add_argument("--passes", default="fwd_bwd")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the program runs nowhere: the host is the CPU
    if DEPS.is_dir():
        sys.path.insert(0, str(DEPS))
    from sparseformer.bench import methods

    try:
        device = gpu_device()
    except Exception as e:  # noqa: BLE001 (the plugin missing or refusing: say how to install it)
        print(f"gpu_aot: no compile-only GPU ({type(e).__name__}: {e}); run benchmarks/gpu_aot_deps.sh", file=sys.stderr)
        return 1
    results = []
    for T in (int(x) for x in args.lengths.split(",")):
        for name in args.presets.split(","):
            for pass_name in args.passes.split(","):
                shape = methods.Shape(1, T, args.heads, args.head_dim, causal=args.causal, dtype=args.dtype)
                try:
                    r = compile_case(name, shape, pass_name, device)
                except methods.SkipCase as e:
                    r = {"preset": name, "length": T, "causal": args.causal, "pass": pass_name, "error": f"skipped: {e}"}
                results.append(r)
                if "error" not in r:
                    print(f"T={T} {name} {pass_name}: peak {r['memory']['peak'] / 2**20:.0f} MB, "
                          f"{r['launches']} launches, loops {[loop['trip_count'] for loop in r['loops']]}", flush=True)
    add_ratios(results)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    import jax

    meta = {"command": "python benchmarks/gpu_aot.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "jax": jax.__version__, "target": "NVIDIA H200 (compile only)"}
    (out / "gpu_aot.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    (out / "gpu_aot.md").write_text(f"`{meta['command']}` (jax {meta['jax']}, {meta['target']})\n\n" + table(results))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
