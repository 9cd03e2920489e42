"""The fused kernel on a GPU: correct against the `scan` kernel, deterministic, and its own speed.

    python benchmarks/gpu_check.py OUT_DIR          (part of benchmarks/gpu.sh; needs a CUDA GPU)
    python benchmarks/gpu_check.py OUT_DIR --tune   (4. alone: gpu.sh's last stage)

1. Correctness (`sparseformer kernel-check --standard`, `sparseformer.attention.kernel_check`): the
   compiled Pallas kernel against the `scan` kernel on the same `Selection`
   (random, with unused slots, repeated global blocks and row starts), outputs, log-sum-exps and
   dq/dk/dv, bfloat16 and float32, bidirectional with padding and causal, GQA; relative errors.
   Then the other parts the `pallas` kernel choice fuses (`kernel_check.BRANCH_CASES`): the pooled
   branch against the XLA one (out, lse, q/k/v gradients through the summaries, the same selection
   left out) and the `maxkey` estimate's scores against XLA's.
2. Determinism: the backward pass twice on the same inputs, compared bit for bit (the pooled
   branch's too).
3. The kernel alone: forward and forward+backward time of `fused_block_attention` with rsa's budget
   (8 slots of 64 per query block), head-major and reading `[B, T, H, D]` in place (as `attend`
   calls it), against cuDNN and JAX's Pallas flash attention at the same
   shape and against the `scan` kernel it replaces on the same selection, as TFLOP/s of the pairs
   each computes (median of 20 calls after warm-up). JAX's dense flash attention in Triton beside
   its Mosaic GPU one (forward) is the measured hint for which backend a sparse kernel should use.

4. With `--tune`: the launch sweep, the kernel as `attend` calls it compiled with each (num_warps,
   num_stages) of `LAUNCHES`, then with each dk/dv list piece of `PIECES` and each of the dk/dv
   kernels' other ways of `DKV_VARIANTS` (their programs' order; the finish kernel walking long
   lists' first pieces), at 16K, bidirectional and causal; then with 4 sinks, the partial sums sized
   for each count of long lists of `LONG_LISTS` (`pallas_kernel.launch_options`);
   `benchmarks/triton_sm90.py` gives the same programs' registers and shared memory without a GPU.

Writes OUT_DIR/check.json (or tune.json) and prints a short table. Exit status 1 if a correctness
check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from sparseformer.attention import pallas_kernel
from sparseformer.attention.kernel_check import BRANCH_CASES, CHECK_CASES, run_checks, scan_block_attention
from sparseformer.attention.selection import Selection


def _median_ms(fn, *args, repeats=20, warmup=3):
    out = fn(*args)
    jax.block_until_ready(out)
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def rsa_like_selection(T, *, b=64, H=8, causal=False, sinks=1) -> tuple[Selection, int]:
    """rsa's budget, 8 slots a query block: window 1, `sinks` global blocks (the first ones, chosen by
    every query block that may see them, as a trained model's attention sinks are), distinct far
    blocks for the rest (duplicates invalid); and the pairs it computes per batch row, all heads."""
    rng = np.random.default_rng(1)
    n = T // b
    idx = np.empty((1, H, n, 8), np.int64)
    for i in range(n):  # window 1, the sinks, distinct far blocks
        window = [min(max(i - 1, 0), n - 3) + d for d in range(3)]
        sink = [j for j in range(sinks) if not causal or j <= i]
        far = [j for j in rng.permutation(i + 1 if causal else n) if j not in window and j >= sinks][:5 - sinks]
        row = (window if not causal else [max(i - 1, 0), i]) + sink + far
        row = (row + [i] * 8)[:8]
        idx[0, :, i] = row
    valid = np.zeros(idx.shape, bool)
    for j in range(8):
        valid[..., j] = ~np.any(idx[..., :j] == idx[..., j : j + 1], -1)
    sel = Selection(idx=jnp.asarray(idx, jnp.int32), valid=jnp.asarray(valid), qids=jnp.arange(n),
                    block_size=b, num_key_blocks=n)
    return sel, int(valid.sum()) * b * b


def kernel_speed(T, *, b=64, D=64, H=8, causal=False, dtype=jnp.bfloat16, repeats=20, warmup=3):
    """The fused kernel alone with rsa's budget (8 slots a query block) against the dense kernels
    (median of `repeats` calls after `warmup` + 1). A timing that fails (a baseline this JAX or
    device lacks) is recorded as `NAME_error`, and the others still run."""
    sel, pairs = rsa_like_selection(T, b=b, H=H, causal=causal)
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (1, H, T, D), dtype) * D**-0.5
    k = jax.random.normal(keys[1], (1, H, T, D), dtype)
    v = jax.random.normal(keys[2], (1, H, T, D), dtype)
    w = jax.random.normal(keys[0], (1, H, T, D), jnp.float32)

    fwd = jax.jit(lambda q, k, v: pallas_kernel.fused_block_attention(causal, q, k, v, sel)[0])
    fb = jax.jit(jax.grad(lambda q, k, v: jnp.sum(pallas_kernel.fused_block_attention(causal, q, k, v, sel)[0] * w),
                          argnums=(0, 1, 2)))
    qt, kt, vt = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))
    # the same kernel reading [B, T, H, D] in place, as attend calls it (strided rows): the layout's cost
    bthd = lambda q, k, v: pallas_kernel.fused_block_attention(causal, q, k, v, sel, layout="BTHD")[0]  # noqa: E731
    fwd_bthd = jax.jit(bthd)
    fb_bthd = jax.jit(jax.grad(lambda q, k, v: jnp.sum(bthd(q, k, v) * w), argnums=(0, 1, 2)))
    dense = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn"))
    dense_fb = jax.jit(jax.grad(lambda q, k, v: jnp.sum(dense(q, k, v).astype(jnp.float32) * jnp.swapaxes(w, 1, 2)),
                                argnums=(0, 1, 2)))
    scan = jax.jit(lambda q, k, v: scan_block_attention(causal, q, k, v, sel)[0])
    scan_fb = jax.jit(jax.grad(lambda q, k, v: jnp.sum(scan_block_attention(causal, q, k, v, sel)[0] * w),
                               argnums=(0, 1, 2)))
    row = {"T": T, "causal": causal, "pairs": pairs}
    flops = 4 * D * pairs
    dense_pairs = H * T * T // (2 if causal else 1)
    for name, fn, args, fl in (
        ("fused_fwd", fwd, (q, k, v), flops), ("fused_fwd_bwd", fb, (q, k, v), 3 * flops),
        ("fused_bthd_fwd", fwd_bthd, (qt, kt, vt), flops), ("fused_bthd_fwd_bwd", fb_bthd, (qt, kt, vt), 3 * flops),
        ("cudnn_fwd", dense, (qt, kt, vt), 4 * D * dense_pairs), ("cudnn_fwd_bwd", dense_fb, (qt, kt, vt), 12 * D * dense_pairs),
        ("scan_fwd", scan, (q, k, v), flops), ("scan_fwd_bwd", scan_fb, (q, k, v), 3 * flops),  # the kernel it replaces
    ):
        try:
            ms = _median_ms(fn, *args, repeats=repeats, warmup=warmup)
        except Exception as e:  # noqa: BLE001 (one that fails is recorded, the others still run)
            row[f"{name}_error"] = f"{type(e).__name__}: {e}"
            continue
        row[f"{name}_ms"], row[f"{name}_tflops"] = ms, fl / ms / 1e9
    try:
        from jax.experimental.pallas.ops.gpu import attention as pallas_attention

        pf = jax.jit(lambda q, k, v: pallas_attention.mha(q, k, v, None, sm_scale=D**-0.5, causal=causal))
        ms = _median_ms(pf, qt, kt, vt, repeats=repeats, warmup=warmup)
        row["pallas_dense_fwd_ms"], row["pallas_dense_fwd_tflops"] = ms, 4 * D * dense_pairs / ms / 1e9
    except Exception as e:  # noqa: BLE001 (a baseline that fails is recorded, the check goes on)
        row["pallas_dense_error"] = f"{type(e).__name__}: {e}"
    try:  # the same dense problem in Mosaic GPU (Hopper, warp-specialised): Triton against Mosaic GPU
        from jax.experimental.pallas.ops.gpu import attention_mgpu

        tuning = attention_mgpu.TuningConfig(block_q=64, block_kv=64, max_concurrent_steps=2, causal=causal)
        mf = jax.jit(lambda q, k, v: attention_mgpu.attention(q, k, v, tuning))
        ms = _median_ms(mf, qt, kt, vt, repeats=repeats, warmup=warmup)
        row["mgpu_dense_fwd_ms"], row["mgpu_dense_fwd_tflops"] = ms, 4 * D * dense_pairs / ms / 1e9
    except Exception as e:  # noqa: BLE001
        row["mgpu_dense_error"] = f"{type(e).__name__}: {e}"
    for p in ("fwd", "fwd_bwd"):
        for mine, other in (("fused", "cudnn"), ("fused", "scan"), ("fused_bthd", "cudnn"), ("fused_bthd", "fused")):
            if f"{mine}_{p}_ms" in row and f"{other}_{p}_ms" in row:
                row[f"{mine}_vs_{other}_rate_{p}"] = row[f"{mine}_{p}_tflops"] / row[f"{other}_{p}_tflops"]
    return row


# (num_warps, num_stages) tried by the launch sweep; the default at blocks of 64 and head dim 64 is (4, 2)
LAUNCHES = ((4, 1), (4, 2), (4, 3), (8, 2), (8, 3))
PIECES = (64,)  # dk/dv list pieces tried beside the default `LIST_PIECE`, at the default launch
# long lists the dk/dv partial sums are sized for, tried beside the default `LONG_LISTS` (4) with 4
# sinks at 16K: 2 and 1 hold fewer of the sinks' further pieces, so their pieces grow to 32 and 67
# entries (the cost of growing, measured)
LONG_LISTS = (2, 1)
# the dk/dv kernels' other ways, each tried beside the default (`benchmarks/list_lengths.py` models
# both): the programs' order (`pallas_kernel.EXTRAS_FIRST`), and whether the finish kernel walks long
# lists' first pieces or only adds partial sums (`pallas_kernel.FINISH_WALKS_FIRST`)
def _order_name(extras_first: bool) -> str:
    return f"further pieces {'first' if extras_first else 'last'}"


def _finish_name(finish_walks_first: bool) -> str:
    return f"finish {'walks first pieces' if finish_walks_first else 'adds only'}"


DKV_VARIANTS = (
    (_order_name(not pallas_kernel.EXTRAS_FIRST), dict(extras_first=not pallas_kernel.EXTRAS_FIRST)),
    (_finish_name(not pallas_kernel.FINISH_WALKS_FIRST), dict(finish_walks_first=not pallas_kernel.FINISH_WALKS_FIRST)),
)


def launch_sweep(T, *, b=64, D=64, H=8, causal=False, dtype=jnp.bfloat16, launches=LAUNCHES, pieces=PIECES,
                 long_lists=LONG_LISTS, dkv=DKV_VARIANTS, sinks=1, repeats=20, warmup=3, on_variant=None):
    """The fused kernel as `attend` calls it (reading `[B, T, H, D]` in place, rsa's budget with
    `sinks` blocks chosen by every query block) compiled with each (num_warps, num_stages) of
    `launches` (None: the default alone), then at the default launch with each dk/dv list piece of
    `pieces` (`piece N`; the sinks' inverted lists are the long ones pieces cut) and with the partial
    sums sized for each of `long_lists` (`long lists N`; fewer than the sinks make their pieces
    longer) and with each of the dk/dv kernels' other ways of `dkv` (`(name, launch_options)`: the
    programs' other order, the finish kernel's other way): forward and forward+backward
    medians, and which is fastest. Each variant's float32 partial-sum buffers (dk and dv,
    `Plan.extra_pieces` blocks each) are recorded beside its time. A variant that fails to compile
    or run is recorded and the others still run. `on_variant(row)`, if given, is called after each
    variant with the row so far (the tune stage saves it: a call cut short keeps what it timed)."""
    sel, pairs = rsa_like_selection(T, b=b, H=H, causal=causal, sinks=sinks)
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v = (jax.random.normal(key, (1, T, H, D), dtype) for key in keys[:3])
    w = jax.random.normal(keys[3], (1, H, T, D), jnp.float32)
    plan = pallas_kernel.make_plan(causal, sel, num_heads=H, head_dim=D, has_mask=False)
    default = plan.params(D)

    def lists(options) -> dict:  # a variant's dk/dv lists: partial sums and the longest piece walked
        with pallas_kernel.launch_options(**options):
            p = pallas_kernel.make_plan(causal, sel, num_heads=H, head_dim=D, has_mask=False)
        pieces, _ = pallas_kernel.inverted_lists(p, sel.idx, sel.valid, None)
        return {"piece_walked": int(jnp.max(pieces[..., 2] - pieces[..., 1])),  # pieces grow past the sums
                # [B, Hk, extra pieces, b, D] float32, dk and dv
                "partial_sums_mib": 2 * sel.idx.shape[1] * p.extra_pieces * b * D * 4 / 2**20}

    row = {"T": T, "causal": causal, "sinks": sinks, "block": b, "head_dim": D, "pairs": pairs,
           "default": f"{default.num_warps}x{default.num_stages}", "default_piece": plan.piece,
           "default_long_lists": plan.long_lists,
           "default_dkv": f"{_order_name(plan.extras_first)}, {_finish_name(plan.finish_walks_first)}", "launches": {}}
    launches = ((default.num_warps, default.num_stages),) if launches is None else launches
    variants = [(f"{warps}x{stages}", dict(num_warps=warps, num_stages=stages)) for warps, stages in launches]
    variants += [(f"piece {piece}", dict(list_piece=piece)) for piece in pieces if piece != plan.piece]
    variants += [(f"long lists {n}", dict(long_lists=n)) for n in long_lists if n != plan.long_lists]
    variants += list(dkv)
    for name, options in variants:
        list_options = {key: x for key, x in options.items() if key not in ("num_warps", "num_stages")}
        with pallas_kernel.launch_options(**options):  # read while tracing: the first call is inside
            def fwd(q, k, v):  # noqa: ANN001, ANN202
                return pallas_kernel.fused_block_attention(causal, q, k, v, sel, layout="BTHD", scale=D**-0.5)[0]

            grad = jax.grad(lambda q, k, v: jnp.sum(fwd(q, k, v) * w), argnums=(0, 1, 2))
            try:
                row["launches"][name] = {
                    "fwd_ms": _median_ms(jax.jit(fwd), q, k, v, repeats=repeats, warmup=warmup),
                    "fwd_bwd_ms": _median_ms(jax.jit(grad), q, k, v, repeats=repeats, warmup=warmup),
                    **lists(list_options),
                }
            except Exception as e:  # noqa: BLE001
                row["launches"][name] = {"error": f"{type(e).__name__}: {e}"}
        if on_variant is not None:
            on_variant(row)
    timed = {n: r for n, r in row["launches"].items() if "error" not in r}
    for p in ("fwd_ms", "fwd_bwd_ms"):
        if timed:
            best = min(timed, key=lambda n: timed[n][p])
            row[f"best_{p}"] = best
            if row["default"] in timed:
                row[f"best_vs_default_{p}"] = timed[row["default"]][p] / timed[best][p]
    return row


# (length, causal, launch_sweep options) of the tune stage: every launch, list piece and dk/dv way at
# 16K, bidirectional and causal; then, with 4 sinks, the default partial sums against fewer
# (`LONG_LISTS`)
TUNE_SWEEPS = ((16384, False, dict(long_lists=())), (16384, True, dict(long_lists=())),
               (16384, False, dict(sinks=4, launches=None, pieces=(), dkv=())))


def tune(out_dir: str, sweeps=TUNE_SWEEPS, **common) -> int:
    """The launch sweeps of `sweeps` (`common`: options of every `launch_sweep`, for tests): writes
    OUT_DIR/tune.json after each variant (a sweep still running marked `"incomplete"`, so a call
    the device's time limit cuts short keeps every variant it timed) and prints a summary."""
    os.makedirs(out_dir, exist_ok=True)
    report = {"jax": jax.__version__, "devices": [str(d) for d in jax.devices()], "rows": []}

    def save(running=None):  # noqa: ANN001, ANN202
        rows = report["rows"] + ([{**running, "incomplete": True}] if running is not None else [])
        with open(os.path.join(out_dir, "tune.json"), "w") as f:
            json.dump({**report, "rows": rows}, f, indent=1)

    for T, causal, options in sweeps:
        row = launch_sweep(T, causal=causal, **common, **options, on_variant=save)
        report["rows"].append(row)
        print(json.dumps(row), flush=True)
        save()
    for row in report["rows"]:
        case = f"T={row['T']} {'causal' if row['causal'] else 'bidir'} sinks {row['sinks']}"
        print(f"{case}: default {row['default']}; fastest fwd {row.get('best_fwd_ms')} "
              f"({row.get('best_vs_default_fwd_ms', float('nan')):.2f}x the default), "
              f"fwd+bwd {row.get('best_fwd_bwd_ms')} ({row.get('best_vs_default_fwd_bwd_ms', float('nan')):.2f}x)")
        base = row["launches"].get(row["default"], {})
        for name, r in row["launches"].items():
            other = name.startswith(("piece", "long lists", "further", "finish"))
            if other and "fwd_bwd_ms" in r and "fwd_bwd_ms" in base:
                print(f"{case}: {name}: fwd+bwd {r['fwd_bwd_ms'] / base['fwd_bwd_ms']:.2f}x the time of piece "
                      f"{row['default_piece']} with {row['default_long_lists']} long lists, "
                      f"{row['default_dkv']}, pieces walked "
                      f"{r['piece_walked']} (against {base['piece_walked']}), partial sums "
                      f"{r['partial_sums_mib']:.0f} MiB (against {base['partial_sums_mib']:.0f})")
    return 0


def main(out_dir: str) -> int:
    os.makedirs(out_dir, exist_ok=True)
    report = {"jax": jax.__version__, "devices": [str(d) for d in jax.devices()], "checks": [], "speed": []}
    ok = True
    for r in run_checks(CHECK_CASES, BRANCH_CASES):
        ok &= r["ok"]
        report["checks"].append(r)
        print(json.dumps(r), flush=True)
    for T, causal in ((4096, False), (16384, False), (65536, False), (16384, True)):
        try:
            r = kernel_speed(T, causal=causal)
        except Exception as e:  # noqa: BLE001
            r = {"T": T, "causal": causal, "error": f"{type(e).__name__}: {e}"}
        report["speed"].append(r)
        print(json.dumps(r), flush=True)
    with open(os.path.join(out_dir, "check.json"), "w") as f:
        json.dump(report, f, indent=1)
    print("\ncorrectness:", "ok" if ok else "FAILED")
    for r in report["speed"]:
        if "fused_vs_cudnn_rate_fwd_bwd" in r:
            print(f"T={r['T']:>6} {'causal' if r['causal'] else 'bidir '}: fused fwd {r['fused_fwd_tflops']:.0f} TFLOP/s "
                  f"({r['fused_vs_cudnn_rate_fwd']:.0%} of cuDNN's {r['cudnn_fwd_tflops']:.0f}), fwd+bwd "
                  f"{r['fused_fwd_bwd_tflops']:.0f} ({r['fused_vs_cudnn_rate_fwd_bwd']:.0%} of cuDNN's); "
                  f"vs scan fwd+bwd {r.get('fused_vs_scan_rate_fwd_bwd', float('nan')):.1f}x")
    return 0 if ok else 1


def parser() -> argparse.ArgumentParser:
    """The command line (`tests/bench/test_gpu_scripts.py` parses gpu.sh's calls with it)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", nargs="?", help="directory for check.json (tune.json with --tune); "
                   "default gpu_check (gpu_tune)")
    p.add_argument("--tune", action="store_true", help="run the launch sweep (4.) instead of 1.-3.")
    return p


if __name__ == "__main__":
    a = parser().parse_args()
    sys.exit(tune(a.out or "gpu_tune") if a.tune else main(a.out or "gpu_check"))
