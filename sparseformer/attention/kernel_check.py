"""The fused kernel against the `scan` kernel on this device: `sparseformer kernel-check`.

    sparseformer kernel-check [--dtype=bfloat16] [--head-dim=64] [--block-size=64] [--heads=8]
        [--kv-heads=8] [--length=4096] [--causal] [--padding] [--row-starts] [--out=FILE.json]
    sparseformer kernel-check --standard      (the six cases `benchmarks/gpu.sh` checks)

Before training with `selection.kernel = "pallas"` (what `auto` takes on a GPU), a practitioner can
check that the compiled kernel agrees with the reference on their device, JAX and shapes: outputs,
log-sum-exps and dq/dk/dv of one loss on a random `Selection` with the awkward cases in it (unused
slots, a key block every query block chose, row starts, padding), relative errors against the
`scan` kernel, and the backward pass run twice and compared bit for bit (the trainer's
resume-equals-uninterrupted promise). The same shapes then check the two other parts `pallas`
fuses: the pooled branch (`pallas_pool`, outputs and q/k/v gradients through the summaries against
the XLA branch, with exclusion of the same selection) and the `maxkey` estimate (`pallas_estimate`,
its scores against XLA's). Exit status 1 on a failure, with what to do instead. On a CPU the
kernels run in Pallas' interpret mode (small default shapes; slow).

The same pieces serve the kernel tests (`tests/attention/test_pallas.py`, interpret mode) and the
GPU stage (`benchmarks/gpu_check.py`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from sparseformer.attention.pallas_kernel import fused_block_attention, unsupported_reason
from sparseformer.attention.selection import Selection, block_sparse_attention, to_blocks
from sparseformer.bench.measure import relative_error  # the benchmark's own error measure, float64


def random_selection(rng: np.random.Generator, *, B: int, Hk: int, G: int, n: int, K: int, b: int, causal: bool,
                     row_starts: bool, p_valid: float, diagonal: bool = True, qids: np.ndarray | None = None
                     ) -> Selection:
    """`K` slots per query block and key head, each valid with probability `p_valid`: slot 0 the
    diagonal block (unless `diagonal=False`: then a random block, possibly invalid, so a query block
    may choose nothing), slot 1 block 0 (every query block chose it: a long inverted list), repeats
    made invalid (distinct blocks only), causal choices in the past, and with `row_starts` a random
    first row per slot (0 on the diagonal slot); one choice per group of `G` query heads. `n` key
    blocks; the query blocks are all of them, or the blocks `qids` (a decoding step or a chunk of
    a prefill: `query_block`)."""
    qids = np.arange(n) if qids is None else np.asarray(qids)
    idx = rng.integers(0, n, size=(B, Hk, len(qids), K))
    if causal:
        idx = np.minimum(idx, qids[:, None])
    if diagonal:
        idx[..., 0] = qids
    if K > 1:
        idx[..., 1] = 0
    valid = rng.random(idx.shape) < p_valid
    if diagonal:
        valid[..., 0] = True
    for j in range(1, K):
        valid[..., j] &= ~np.any((idx[..., :j] == idx[..., j : j + 1]) & valid[..., :j], -1)
    start = None
    if row_starts:
        start = rng.integers(0, b, size=idx.shape)
        if diagonal:
            start[..., 0] = 0
    rep = lambda x: None if x is None else jnp.asarray(np.repeat(x, G, axis=1), jnp.int32)  # noqa: E731
    return Selection(idx=rep(idx), valid=jnp.asarray(np.repeat(valid, G, axis=1)), qids=jnp.asarray(qids, jnp.int32),
                     block_size=b, num_key_blocks=n, row_start=rep(start), group=G)


def scan_block_attention(causal: bool, q_BHTD: jax.Array, k_BHkSD: jax.Array, v_BHkSD: jax.Array,
                         sel: Selection, kv_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """The `scan` kernel with `fused_block_attention`'s arguments and outputs (`[B, H, T, D]`,
    `[B, H, T]`): keys and values repeated over each group's query heads."""
    B, H, T, D = q_BHTD.shape
    b, G = sel.block_size, H // k_BHkSD.shape[1]
    kr, vr = jnp.repeat(k_BHkSD, G, axis=1), jnp.repeat(v_BHkSD, G, axis=1)
    kmask_b = None if kv_mask is None else kv_mask.reshape(B, kv_mask.shape[1] // b, b)
    out, lse = block_sparse_attention(causal, to_blocks(q_BHTD, b), to_blocks(kr, b), to_blocks(vr, b),
                                      sel.idx, sel.valid, sel.row_start, kmask_b, sel.qids)
    return out.reshape(B, H, T, D), lse.reshape(B, H, T)


# The GPU check's correctness cases (`check`'s arguments): `sparseformer kernel-check --standard` and
# `benchmarks/gpu_check.py` run them, `benchmarks/triton_sm90.py` compiles them for sm_90.
CHECK_CASES = [
    dict(name="bf16 bidir padding gqa rowstart b64 d64", T=4096, b=64, D=64, H=8, G=2, dtype=jnp.bfloat16,
         causal=False, padding=True, row_starts=True),
    dict(name="bf16 causal b128 d128", T=4096, b=128, D=128, H=4, G=1, dtype=jnp.bfloat16, causal=True,
         padding=False, row_starts=False),
    dict(name="f32 causal gqa b64 d128", T=2048, b=64, D=128, H=8, G=4, dtype=jnp.float32, causal=True,
         padding=True, row_starts=False, precision="highest"),  # TF32 by default: full float32 to compare
    dict(name="f16 bidir b128 d64", T=2048, b=128, D=64, H=4, G=1, dtype=jnp.float16, causal=False,
         padding=False, row_starts=True),
    # q, k, v read in place from [B, T, H, D] (what attend passes on a GPU; one head a tile)
    dict(name="bf16 bidir padding b64 d64 in place", T=4096, b=64, D=64, H=8, G=1, dtype=jnp.bfloat16,
         causal=False, padding=True, row_starts=True, layout="BTHD"),
    dict(name="bf16 causal gqa b128 d128 in place", T=4096, b=128, D=128, H=4, G=2, dtype=jnp.bfloat16,
         causal=True, padding=False, row_starts=False, layout="BTHD"),
]


# The fused pooled branch and estimate, checked by `check_branches` at the GPU stage's sizes (`--standard`
# and `benchmarks/gpu_check.py`): bidirectional with padding and row starts, causal with blocks of 128
# and head dim 128, float32 at full precision.
BRANCH_CASES = [
    dict(name="bf16 bidir padding rowstart b64 d64", T=4096, b=64, D=64, H=8, dtype=jnp.bfloat16, causal=False,
         padding=True, row_starts=True),
    dict(name="bf16 causal rowstart b128 d128", T=4096, b=128, D=128, H=4, dtype=jnp.bfloat16, causal=True,
         padding=False, row_starts=True),
    dict(name="f32 causal padding b64 d64", T=2048, b=64, D=64, H=4, dtype=jnp.float32, causal=True,
         padding=True, row_starts=False, precision="highest"),
]


def random_inputs(seed: int, *, B: int, H: int, Hk: int, T: int, D: int, dtype, Tq: int | None = None):
    """Head-major `q [B, H, Tq, D]`, `k, v [B, Hk, T, D]` in `dtype` (q and k scaled by `D**-0.25`:
    unit-variance logits) and the loss weights `w_out [B, H, Tq, D]`, `w_lse [B, H, Tq]` (float32) of
    one seed; `Tq` defaults to `T`."""
    Tq = T if Tq is None else Tq
    keys = jax.random.split(jax.random.key(seed), 5)
    q = (jax.random.normal(keys[0], (B, H, Tq, D)) * D**-0.25).astype(dtype)
    k = (jax.random.normal(keys[1], (B, Hk, T, D)) * D**-0.25).astype(dtype)
    v = jax.random.normal(keys[2], (B, Hk, T, D)).astype(dtype)
    return q, k, v, jax.random.normal(keys[3], (B, H, Tq, D)), jax.random.normal(keys[4], (B, H, Tq))


def kernel_pair(causal: bool, sel: Selection, kv_mask: jax.Array | None = None, layout: str = "BHTD"):
    """`(fused, scan)`: the fused kernel and the `scan` kernel on one selection, both functions of
    head-major `(q, k, v)` returning `(out, lse)`. `layout="BTHD"` gives the fused kernel q, k, v in
    `attend`'s own layout, read in place (q doubled and scaled by 0.5 as it is loaded: exact, so the
    reference is unchanged)."""

    def fused(q, k, v):
        if layout == "BTHD":
            q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q * 2, k, v))
            return fused_block_attention(causal, q, k, v, sel, kv_mask, layout="BTHD", scale=0.5)
        return fused_block_attention(causal, q, k, v, sel, kv_mask)

    def scan(q, k, v):
        return scan_block_attention(causal, q, k, v, sel, kv_mask)

    return fused, scan


def case_grads(*, T, b, D, H, G, dtype, causal, padding, row_starts, layout="BHTD", seed=0):
    """A correctness case's inputs `(q, k, v)` (head-major) and the value-and-gradient functions
    (not jitted) of one loss through the fused kernel and through the `scan` kernel."""
    rng = np.random.default_rng(seed)
    B, n, Hk = 1, T // b, H // G
    qh, kh, vh, w_out, w_lse = random_inputs(seed, B=B, H=H, Hk=Hk, T=T, D=D, dtype=dtype)
    kv_mask = jnp.ones((B, T), bool).at[0, T - b // 2 :].set(False) if padding else None
    sel = random_selection(rng, B=B, Hk=Hk, G=G, n=n, K=8, b=b, causal=causal, row_starts=row_starts, p_valid=0.85)
    fused, scan = kernel_pair(causal, sel, kv_mask, layout)
    return (qh, kh, vh), loss_grads(fused, w_out, w_lse), loss_grads(scan, w_out, w_lse)


def loss_grads(fn, w_out: jax.Array, w_lse: jax.Array):
    """The value and (q, k, v) gradients (not jitted) of one loss through `fn(q, k, v) -> (out, lse)`
    that reaches both outputs: `sum(out * w_out) + sum(lse * w_lse)` over the rows where something
    is allowed (a row with nothing allowed has no log-sum-exp to differentiate); aux `(out, lse)`."""

    def loss(q, k, v):
        out, lse = fn(q, k, v)
        return jnp.sum(out * w_out) + jnp.sum(jnp.where(lse > -1e29, lse, 0.0) * w_lse), (out, lse)

    return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)


def compare(fused: tuple, reference: tuple, dtype) -> tuple[dict, float, bool]:
    """`(relative errors of out, lse, dq, dk, dv; the tolerance; ok)` of two `loss_grads` results
    (`(_, (out, lse)), (dq, dk, dv)`): ok when every error is under the dtype's tolerance and the
    fused outputs and gradients are finite."""
    (_, (out_f, lse_f)), d_f = fused
    (_, (out_s, lse_s)), d_s = reference
    errs = {"out": relative_error(out_f, out_s), "lse": relative_error(lse_f, lse_s)}
    errs.update({f"d{x}": relative_error(a, c) for x, a, c in zip("qkv", d_f, d_s)})
    tol = 1e-4 if jnp.dtype(dtype) == jnp.float32 else 3e-2
    finite = all(bool(jnp.all(jnp.isfinite(x.astype(jnp.float32)))) for x in (out_f, *d_f))
    return errs, tol, finite and all(e < tol for e in errs.values())


def check(name, *, T, b, D, H, G, dtype, causal, padding, row_starts, layout="BHTD", seed=0, precision=None):
    """One case (`layout`: see `kernel_pair`). `precision`:
    JAX's matmul precision for both kernels (float32 runs TF32 by default on a GPU, in the fused
    kernel and in XLA's alike, but not rounded alike: "highest" compares them at full float32)."""
    (qh, kh, vh), fused_grads, scan_grads = case_grads(
        T=T, b=b, D=D, H=H, G=G, dtype=dtype, causal=causal, padding=padding, row_starts=row_starts, layout=layout,
        seed=seed)
    with jax.default_matmul_precision(precision) if precision else contextlib.nullcontext():  # read while tracing
        gf, gs = jax.jit(fused_grads), jax.jit(scan_grads)
        fused, reference = gf(qh, kh, vh), gs(qh, kh, vh)
        (_, _), d_f2 = gf(qh, kh, vh)
    errs, tol, ok = compare(fused, reference, dtype)
    deterministic = all(bool(jnp.array_equal(a, c)) for a, c in zip(fused[1], d_f2))
    ok = ok and deterministic
    return {"name": name, "layout": layout, "T": T, "block": b, "head_dim": D, "heads": H, "group": G,
            "dtype": jnp.dtype(dtype).name, "precision": precision or "default",
            "causal": causal, "padding": padding, "row_starts": row_starts, "errors": errs,
            "deterministic": deterministic, "tolerance": tol, "ok": ok}


def pool_pair(*, b: int, p: int, moments: bool, causal: bool, kv_mask, sel, q_pos):
    """`(fused, xla)`: the pooled branch (summaries of `p` keys, with the variance feature if
    `moments`, the selection's blocks left out; rows of `b` queries a program) as functions of
    head-major `q [B, H, Tq, D]`, `k, v [B, Hk, T, D]` returning `(out, lse)`, as `compression.pool`
    calls it (GQA: the summaries repeated to the query heads)."""
    from sparseformer.attention import compression, pallas_pool

    def branch(fused):
        def fn(q, k, v):
            q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))  # the public [B, T, H, D] layout
            k_mean, v_mean, cnt, var = compression._pool_summaries(k, v, kv_mask, p)
            group = q.shape[2] // k.shape[2]
            k_mean, v_mean, var = (jnp.repeat(x, group, axis=1) for x in (k_mean, v_mean, var))
            var = var if moments else None
            if fused:
                return pallas_pool.pool_attention(q, q_pos, k_mean, var, v_mean, cnt, sel, p=p, moments=moments,
                                                  causal=causal, scale=1.0, rows=b)
            chunk = compression.pool_chunk_rows(q.shape[1], k_mean.shape[2], q.shape[-1])
            static = compression._PoolStatic(p, moments, causal, chunk, 1.0)
            return compression._pool_attention(static, q, q_pos, k_mean, var, v_mean, cnt, sel)

        return fn

    return branch(True), branch(False)


def _error_where_finite(got: jax.Array, want: jax.Array) -> tuple[float, bool]:
    """Relative error over the entries `want` does not hold at LOG0 (a row that sees nothing, a
    block of padding only), and whether `got` holds LOG0 at exactly the same entries."""
    real = want > -1e29
    err = relative_error(jnp.where(real, got, 0.0), jnp.where(real, want, 0.0))
    return err, bool(jnp.all((got > -1e29) == real))


def compare_branch(fused: tuple, reference: tuple, dtype) -> tuple[dict, float, bool]:
    """`compare` for a branch whose rows may see nothing (lse LOG0: causal first rows, padding):
    the lse error over the rows that see something, and the same rows seeing nothing both ways."""
    errs, tol, ok = compare(fused, reference, dtype)
    errs["lse"], same = _error_where_finite(fused[0][1][1], reference[0][1][1])
    return errs, tol, ok and errs["lse"] < tol and same


def check_branches(name, *, T, b, D, H, dtype, causal, padding, row_starts, seed=0, precision=None):
    """The pooled branch and the `maxkey` estimate fused (what `pallas` runs beside the exact
    kernel) against their XLA versions on one random case: the branch's out, lse and q/k/v gradients
    (its backward run twice, bit for bit), and the estimate's scores with 4 anchors."""
    from sparseformer.attention import pallas_estimate, presets, selection
    from sparseformer.attention.registry import ESTIMATORS

    rng = np.random.default_rng(seed)
    qh, kh, vh, w_out, w_lse = random_inputs(seed, B=1, H=H, Hk=H, T=T, D=D, dtype=dtype)
    kv_mask = jnp.ones((1, T), bool).at[0, T - b // 2 :].set(False) if padding else None
    sel = random_selection(rng, B=1, Hk=H, G=1, n=T // b, K=8, b=b, causal=causal, row_starts=row_starts, p_valid=0.85)
    fused, xla = pool_pair(b=b, p=b, moments=True, causal=causal, kv_mask=kv_mask, sel=sel, q_pos=jnp.arange(T))
    cfg = presets.get("rsa").selection
    q_est, kb = to_blocks(qh, b), to_blocks(kh, b)
    kmask_b = None if kv_mask is None else kv_mask.reshape(1, T // b, b)
    with jax.default_matmul_precision(precision) if precision else contextlib.nullcontext():  # read while tracing
        gf, gx = jax.jit(loss_grads(fused, w_out, w_lse)), jax.jit(loss_grads(xla, w_out, w_lse))
        pool_f, pool_x = gf(qh, kh, vh), gx(qh, kh, vh)
        (_, _), d_f2 = gf(qh, kh, vh)
        scores_f = jax.jit(lambda q, k: pallas_estimate.sub_block_scores("maxkey", q, 4, k, kmask_b))(q_est, kb)
        scores_x = jax.jit(lambda q, k: selection.sub_block_scores(
            ESTIMATORS.get("maxkey").fn, q, 4, k, kmask_b, jnp.ones((T // b, T // b), bool), cfg=cfg, rng=None,
            qids=jnp.arange(T // b)))(q_est, kb)
    errs, tol, ok = compare_branch(pool_f, pool_x, dtype)  # causal first rows see no summary
    errs = {f"pool_{k}": e for k, e in errs.items()}
    errs["maxkey_scores"], same = _error_where_finite(scores_f, scores_x)  # a block of padding only: LOG0
    scores_ok = same and errs["maxkey_scores"] < tol
    deterministic = all(bool(jnp.array_equal(a, c)) for a, c in zip(pool_f[1], d_f2))
    return {"name": f"pool and estimate: {name}", "T": T, "block": b, "head_dim": D, "heads": H,
            "dtype": jnp.dtype(dtype).name, "precision": precision or "default", "causal": causal,
            "padding": padding, "row_starts": row_starts, "errors": errs, "deterministic": deterministic,
            "tolerance": tol, "ok": ok and scores_ok and deterministic}


DTYPES = ("bfloat16", "float16", "float32")


def _parser() -> argparse.ArgumentParser:
    on_gpu = jax.default_backend() == "gpu"
    p = argparse.ArgumentParser(
        prog="sparseformer kernel-check", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\n", 1)[1].split("\n\nThe same pieces", 1)[0])
    p.add_argument("--standard", action="store_true", help="the six cases benchmarks/gpu.sh checks (GPU sizes, "
                   "2K-4K tokens: slow where the kernel is interpreted) instead of one case from the flags below")
    p.add_argument("--dtype", default="bfloat16" if on_gpu else "float32", help=f"one of {', '.join(DTYPES)}")
    p.add_argument("--head-dim", type=int, default=64 if on_gpu else 32)
    p.add_argument("--block-size", type=int, default=64 if on_gpu else 32, help="selection.block_size")
    p.add_argument("--heads", type=int, default=8 if on_gpu else 4, help="query heads")
    p.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default: --heads; fewer: GQA)")
    p.add_argument("--length", type=int, default=4096 if on_gpu else 256, help="tokens")
    p.add_argument("--causal", action="store_true")
    p.add_argument("--padding", action="store_true", help="mask the last half block of keys")
    p.add_argument("--row-starts", action="store_true", help="slots that serve their query block from a row on")
    p.add_argument("--out", help="also write the report to this JSON file")
    return p


def case_from_args(a: argparse.Namespace) -> dict:
    """One `check` case from the command line; a bad value raises ValueError naming the flag, the
    value and what is allowed, before anything compiles."""
    if a.dtype not in DTYPES:
        raise ValueError(f"--dtype: {a.dtype!r} is not allowed; allowed: {', '.join(DTYPES)}")
    kv_heads = a.kv_heads or a.heads
    for flag, value in (("--heads", a.heads), ("--kv-heads", kv_heads), ("--length", a.length)):
        if value < 1:
            raise ValueError(f"{flag}: {value} is not allowed; allowed: a positive integer")
    if a.heads % kv_heads:
        raise ValueError(f"--kv-heads: {kv_heads} is not allowed; allowed: a divisor of --heads ({a.heads})")
    dtype = jnp.dtype(a.dtype)
    reason = unsupported_reason(a.block_size, a.head_dim, dtype, compiled_gpu=jax.default_backend() == "gpu")
    if reason:
        flag = "--block-size" if reason.startswith("selection.block_size") else "--head-dim"
        raise ValueError(f"{flag}: {reason}")
    if a.length % a.block_size or a.length < 2 * a.block_size:
        raise ValueError(f"--length: {a.length} is not allowed; allowed: a multiple of --block-size "
                         f"({a.block_size}), at least two blocks")
    name = (f"{a.dtype} {'causal' if a.causal else 'bidir'}{' padding' if a.padding else ''}"
            f"{' rowstart' if a.row_starts else ''} T{a.length} b{a.block_size} d{a.head_dim} "
            f"{a.heads}/{kv_heads} heads")
    return dict(name=name, T=a.length, b=a.block_size, D=a.head_dim, H=a.heads, G=a.heads // kv_heads,
                dtype=dtype, causal=a.causal, padding=a.padding, row_starts=a.row_starts,
                # what `attend` passes on a GPU with one query head a tile; GQA tiles are head-major
                layout="BTHD" if kv_heads == a.heads else "BHTD",
                precision="highest" if dtype == jnp.float32 else None)  # float32 runs TF32 by default on a GPU


def run_checks(cases: list[dict], branch_cases: list[dict]):
    """Yield each case's result: the exact kernel's `check` of `cases`, then `check_branches` of
    `branch_cases`; a check that raises (a kernel that fails to compile) is a failed one."""
    for fn, case in [(check, c) for c in cases] + [(check_branches, c) for c in branch_cases]:
        try:
            yield fn(**case)
        except Exception as e:  # noqa: BLE001 (a kernel that fails to compile is a failed check)
            yield {"name": case["name"], "ok": False, "error": f"{type(e).__name__}: {e}"}


def _branch_case(case: dict) -> dict:
    """The pooled branch and estimate's check at a command-line case's shapes (its heads all query
    heads: the branch's summaries are repeated to them)."""
    keep = ("name", "T", "b", "D", "H", "dtype", "causal", "padding", "row_starts", "precision")
    return {k: case[k] for k in keep if k in case}


def kernel_check_main(argv: list[str]) -> int:
    """`sparseformer kernel-check`: exit 0 when every case agrees and is deterministic, 1 otherwise."""
    a = _parser().parse_args(argv)
    try:
        cases = CHECK_CASES if a.standard else [case_from_args(a)]
        branch_cases = BRANCH_CASES if a.standard else [_branch_case(cases[0])]
    except ValueError as e:
        print(f"sparseformer kernel-check: {e}", file=sys.stderr)
        return 2
    where = f"{jax.default_backend()} ({jax.devices()[0].device_kind}), jax {jax.__version__}"
    interpreted = jax.default_backend() not in ("gpu", "tpu")
    print(f"the fused kernel against the scan kernel on {where}"
          + (": interpreted (Pallas interpret mode), slow" if interpreted else ""), flush=True)
    results = []
    for r in run_checks(cases, branch_cases):
        results.append(r)
        if "error" in r:
            print(f"  FAILED {r['name']}: {r['error']}", flush=True)
        else:
            worst = max(r["errors"], key=r["errors"].get)
            print(f"  {'ok    ' if r['ok'] else 'FAILED'} {r['name']}: largest relative error {r['errors'][worst]:.1e} "
                  f"({worst}; tolerance {r['tolerance']:.0e}), backward "
                  f"{'bit for bit twice' if r['deterministic'] else 'NOT deterministic'}", flush=True)
    ok = all(r["ok"] for r in results)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"device": where, "ok": ok, "checks": results}, f, indent=1, default=str)
    if not ok:
        print("the fused kernel disagrees with the reference here: train with "
              "model.attention.selection.kernel=scan (the same results, slower), and please report this", file=sys.stderr)
    return 0 if ok else 1
