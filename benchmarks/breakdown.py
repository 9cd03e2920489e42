"""Where a preset's time goes: its components timed alone, side by side, at a few lengths.

    python benchmarks/breakdown.py OUT_DIR [--preset=rsa] [--lengths=16384,65536] [--dtype=bfloat16]
        [--heads=8] [--head-dim=64] [--causal] [--repeats=10]

For each length, forward and forward+backward medians (interleaved rounds after a warm-up) of:
  - `full`: the preset through `attend` (what the benchmark times);
  - `choice`: `choose_blocks` alone (the importance estimate, random and top-k choice);
  - `exact`: the exact kernel alone on that choice (`selection.kernel` resolved: pallas on a GPU);
  - `compressed`: the compressed branch alone (with exclusion of that choice);
  - `dense`: `jax.nn.dot_product_attention` (cuDNN on a GPU for 16-bit inputs).
The rest of `full` (merge, fidelity rows, layout changes) is `full - choice - exact - compressed`.
The choice is computed once and passed in as data where a component needs it, so each row times its
own work only. Writes OUT_DIR/breakdown.json and prints a table. Runs on the CPU too (the scan kernel).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp

from sparseformer.attention import COMPRESSIONS, attend, choose_blocks, init_params, presets
from sparseformer.attention.config import selection_kernel
from sparseformer.attention.pallas_kernel import fused_block_attention
from sparseformer.attention.selection import block_sparse_attention, causal_queries, masked_block_attention, to_blocks


def _timed(fns: dict, args: dict, repeats: int) -> dict[str, float]:
    for name, fn in fns.items():
        jax.block_until_ready(fn(*args[name]))
        jax.block_until_ready(fn(*args[name]))
    times = {name: [] for name in fns}
    for r in range(repeats):
        order = list(fns)[r % len(fns):] + list(fns)[: r % len(fns)]
        for name in order:
            t = time.perf_counter()
            jax.block_until_ready(fns[name](*args[name]))
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) * 1e3 for name, ts in times.items()}


def components(preset: str, T: int, *, H: int, D: int, dtype, causal: bool):
    config = presets.get(preset)
    sel_cfg = config.selection
    b = sel_cfg.block_size
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v = (jax.random.normal(kk, (1, T, H, D), dtype) for kk in keys[:3])
    w = jax.random.normal(keys[3], (1, T, H, D), jnp.float32)
    params = init_params(config, jax.random.key(1), num_heads=H, head_dim=D, max_len=T)
    qh = jnp.swapaxes(q, 1, 2) * jnp.asarray(D**-0.5, dtype)
    kh, vh = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
    n = T // b

    def choose(qh, kh):
        qb, kb = to_blocks(qh, b), to_blocks(kh, b)
        qids = jnp.arange(n)  # as attend does: causal blocks choose from the queries all their rows see
        q_est = causal_queries(qh, qids, b, sel_cfg.causal_choice, sel_cfg.anchors) if causal else qb
        return choose_blocks(q_est, kb, None, qids, num_query_blocks=n, cfg=sel_cfg, causal=causal,
                             rng=jax.random.key(2), fused_estimate=kernel == "pallas")  # as attend chooses

    kernel = selection_kernel(config, T, head_dim=D)
    sel = jax.jit(choose)(qh, kh)

    def exact(qh, kh, vh):
        if kernel == "pallas":
            return fused_block_attention(causal, qh, kh, vh, sel)[0]
        if kernel == "masked":
            return masked_block_attention(causal, qh, kh, vh, sel, None, jnp.arange(T))[0]
        out, _ = block_sparse_attention(causal, to_blocks(qh, b), to_blocks(kh, b), to_blocks(vh, b),
                                        sel.idx, sel.valid, sel.row_start, None, sel.qids)
        return out.reshape(qh.shape)

    def compressed(qh, kh, vh):
        comp = COMPRESSIONS.get(config.compression.kind)
        branch, _ = comp.fn(qh, kh, vh, None, q_pos=jnp.arange(T), causal=causal, config=config, params=params,
                            rng=jax.random.key(2), sel=sel if config.correction.exclusion else None)
        return branch.normalised()

    def full(q, k, v):
        return attend(q, k, v, config, params=params, causal=causal, rng=jax.random.key(2))[0]

    def dense(q, k, v):
        impl = "cudnn" if jax.default_backend() == "gpu" and dtype != jnp.float32 else None
        return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=impl)

    def fwd_bwd(fn, n_args):
        def loss(*a):
            out = fn(*a)
            return jnp.sum(out.astype(jnp.float32) * (w if out.shape == w.shape else jnp.swapaxes(w, 1, 2)))
        return jax.jit(jax.grad(loss, argnums=tuple(range(n_args))))

    parts = {"full": (full, (q, k, v)), "dense": (dense, (q, k, v)), "exact": (exact, (qh, kh, vh))}
    if sel_cfg.top_k or sel_cfg.random_blocks:
        parts["choice"] = (lambda qh, kh: choose(qh, kh).idx, (qh, kh))
    if config.compression.enabled:
        parts["compressed"] = (compressed, (qh, kh, vh))
    fwd = {name: jax.jit(fn) for name, (fn, _) in parts.items()}
    bwd = {name: fwd_bwd(fn, len(a)) for name, (fn, a) in parts.items() if name != "choice"}
    args = {name: a for name, (_, a) in parts.items()}
    return fwd, bwd, args, kernel


def parser() -> argparse.ArgumentParser:
    """The command line (`tests/bench/test_gpu_scripts.py` parses gpu.sh's calls with it)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--preset", default="rsa")
    p.add_argument("--lengths", default="16384,65536")
    p.add_argument("--dtype", default="bfloat16" if jax.default_backend() == "gpu" else "float32")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--causal", action="store_true")
    p.add_argument("--repeats", type=int, default=10)
    return p


def main(argv: list[str] | None = None) -> None:
    a = parser().parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    rows = []
    for T in [int(x) for x in a.lengths.split(",")]:
        fwd, bwd, args, kernel = components(a.preset, T, H=a.heads, D=a.head_dim, dtype=jnp.dtype(a.dtype),
                                            causal=a.causal)
        row = {"preset": a.preset, "length": T, "kernel": kernel, "causal": a.causal, "dtype": a.dtype,
               "fwd_ms": _timed(fwd, args, a.repeats), "fwd_bwd_ms": _timed(bwd, args, a.repeats)}
        for pass_name in ("fwd_ms", "fwd_bwd_ms"):
            t = row[pass_name]
            t["rest"] = t["full"] - sum(t.get(x, 0.0) for x in ("choice", "exact", "compressed"))
        rows.append(row)
        print(json.dumps(row), flush=True)
    report = {"jax": jax.__version__, "backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
              "rows": rows}
    with open(os.path.join(a.out, "breakdown.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(f"\n{a.preset}, {a.dtype}, H={a.heads}, D={a.head_dim}, {'causal' if a.causal else 'bidirectional'}, "
          f"{report['device']}: ms (share of full)")
    for row in rows:
        for pass_name in ("fwd_ms", "fwd_bwd_ms"):
            t = row[pass_name]
            cells = ", ".join(f"{k} {v:.2f}" + ("" if k in ("full", "dense") else f" ({v / t['full']:.0%})")
                              for k, v in t.items())
            print(f"T={row['length']:>6} {pass_name[:-3]:>7} [{row['kernel']}]: {cells}")


if __name__ == "__main__":
    main()
