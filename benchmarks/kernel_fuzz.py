"""Random differential testing of the fused kernels: drawn shapes and selections, the fused kernel
against the `scan` kernel (outputs, log-sum-exps, dq/dk/dv).

    python benchmarks/kernel_fuzz.py [--seeds=0:100] [--out=FILE.json]

`sparseformer kernel-check` and `tests/attention/test_pallas.py` check chosen cases; this draws
them, one per seed (the same seed, the same case): 1-6 query blocks of 16 or 32 tokens, head dims
16 or 32, 1-2 batch rows, GQA groups of 1, 2 or 4, 1 to n+2 slots with 0-100% of them valid (with
or without the diagonal block, so a query block may choose nothing), causal or not, row starts,
key padding (none, a tail, a gap, a whole block, all but the first key), dk/dv list pieces of 1, 2,
3 or 16 with partial sums for 1, 2 or 8 long lists (so pieces sometimes have to grow), the further
pieces' programs first or last, the finish kernel walking long lists' first pieces or only adding
partial sums, tiles of one or two heads (on a CPU), head-major or `[B, T, H, D]` inputs, float32 or
bfloat16, and one case in three a run of the query blocks against all the keys (a decoding step or
a chunk of a prefill, `query_block`). A Triton case also holds the fused pooled branch
(`pallas_pool`) to the XLA one on the same selection, keys and rows: summaries of `b` or `b/2` keys,
the variance feature on or off. On a CPU each case runs the Triton kernel interpreted or the
TPU kernel in TPU interpret mode (drawn, with a small scalar-memory budget so that lists are split
across calls); on a GPU or TPU, the compiled kernel of that device. A case the kernel refuses with a `selection.*` error (a shape it
does not take, a list too long for scalar memory) is counted as refused, not failed; any other
error, an error over the dtype's tolerance or a non-finite value fails. Exit status 1 on a failure.

A few seconds a case on this 2-core CPU (interpret mode): seeds 0-149 all agreed when the
tool was written. `tests/bench/test_kernel_fuzz.py` runs two seeds and a planted bug.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from sparseformer.attention import pallas_kernel, pallas_tpu
from sparseformer.attention.kernel_check import (compare, compare_branch, kernel_pair, loss_grads, pool_pair, random_inputs,
                                                 random_selection)

PADDINGS = ("none", "tail", "gap", "block", "all_but_first")


def draw_case(seed: int) -> dict:
    """The case of one seed (plain values: it goes into the JSON report as it is)."""
    rng = np.random.default_rng(seed)
    pick = lambda xs: xs[int(rng.integers(len(xs)))]  # noqa: E731
    n, G = int(rng.integers(1, 7)), pick((1, 2, 4))
    return dict(seed=seed, b=pick((16, 32)), n=n, D=pick((16, 32)), G=G, H=G * pick((1, 2)), B=int(rng.integers(1, 3)),
                K=int(rng.integers(1, n + 3)), p_valid=pick((0.0, 0.5, 0.9, 1.0)), diagonal=bool(rng.random() < 0.7),
                causal=bool(rng.random() < 0.5), row_starts=bool(rng.random() < 0.4), padding=pick(PADDINGS),
                piece=pick((1, 2, 3, 16)), heads_a_tile=pick((1, 2)), layout=pick(("BHTD", "BTHD")),
                target=pick(("triton", "tpu")), dtype=pick(("float32", "bfloat16")), queries=_query_blocks(rng, n),
                long_lists=pick((1, 2, 8)), extras_first=pick((True, False)),  # drawn last: a seed's earlier
                finish_walks_first=pick((True, False)),  # draws stay as they were
                pool_p=pick((0, 1)), pool_moments=pick((True, False)))  # pooled branch: summaries of b or b/2


def _query_blocks(rng: np.random.Generator, n: int) -> list[int] | None:
    """None (all `n` query blocks) or, one case in three, a run of them: a decoding step or a chunk
    of a prefill (`query_block`), the keys still all `n` blocks."""
    if n == 1 or rng.random() >= 1 / 3:
        return None
    count = int(rng.integers(1, n))
    first = int(rng.integers(0, n - count + 1))
    return list(range(first, first + count))


def key_mask(padding: str, B: int, T: int, b: int) -> jax.Array | None:
    m = np.ones((B, T), bool)
    if padding == "none":
        return None
    if padding == "tail":
        m[-1, T - b // 2 :] = False
    elif padding == "gap":
        m[0, 3:5] = False
    elif padding == "block":
        m[0, :b] = False
    elif padding == "all_but_first":
        m[0, 1:] = False
    return jnp.asarray(m)


@contextlib.contextmanager
def _kernel_settings(case: dict):
    """The case's dk/dv list piece, long lists, program order and finish (`launch_options`) while it
    is traced; on a CPU also its heads a tile (through the tile-size limit, a module constant the
    kernel reads while tracing), a small TPU scalar-memory budget and the kernel it draws. A device
    keeps its real limits."""
    saved = pallas_kernel.MAX_TILE_ELEMENTS, pallas_tpu.SMEM_BUDGET
    on_cpu = jax.default_backend() == "cpu"
    if on_cpu:
        pallas_kernel.MAX_TILE_ELEMENTS = case["heads_a_tile"] * case["b"] * case["D"]
        pallas_tpu.SMEM_BUDGET = 1024
    try:
        target = pallas_kernel.tpu_interpret() if on_cpu and case["target"] == "tpu" else contextlib.nullcontext()
        with pallas_kernel.launch_options(list_piece=case["piece"], long_lists=case.get("long_lists"),
                                          extras_first=case.get("extras_first"),
                                          finish_walks_first=case.get("finish_walks_first")), target:
            yield
    finally:
        pallas_kernel.MAX_TILE_ELEMENTS, pallas_tpu.SMEM_BUDGET = saved


def run_case(case: dict) -> dict:
    """The fused kernel against `scan` on one drawn case: the case with `errors`, `ok`, or `refused`
    / `error` when the kernel raised."""
    c = case
    B, H, G, n, b, D = c["B"], c["H"], c["G"], c["n"], c["b"], c["D"]
    T, dtype = n * b, jnp.dtype(c["dtype"])
    Tq = T if c["queries"] is None else len(c["queries"]) * b
    rng = np.random.default_rng(c["seed"])
    q, k, v, w_out, w_lse = random_inputs(c["seed"], B=B, H=H, Hk=H // G, T=T, D=D, dtype=dtype, Tq=Tq)
    kv_mask = key_mask(c["padding"], B, T, b)
    sel = random_selection(rng, B=B, Hk=H // G, G=G, n=n, K=c["K"], b=b, causal=c["causal"],
                           row_starts=c["row_starts"], p_valid=c["p_valid"], diagonal=c["diagonal"],
                           qids=c["queries"])
    fused, scan = kernel_pair(c["causal"], sel, kv_mask, c["layout"])
    try:
        with _kernel_settings(c):
            got = jax.jit(loss_grads(fused, w_out, w_lse))(q, k, v)
    except ValueError as e:
        if "selection." in str(e):  # a clear refusal naming the config key (the kernels' own checks)
            return dict(c, refused=str(e), ok=True)
        return dict(c, error=f"ValueError: {e}", ok=False)
    except Exception as e:  # noqa: BLE001 (any other failure of the kernel fails the case)
        return dict(c, error=f"{type(e).__name__}: {e}", ok=False)
    want = jax.jit(loss_grads(scan, w_out, w_lse))(q, k, v)
    errors, tolerance, ok = compare(got, want, dtype)
    if c["target"] == "triton" and "pool_p" in c:  # the fused pooled branch on the same case and selection
        p = b >> c["pool_p"]
        q_pos = jnp.arange(T) if c["queries"] is None else (jnp.asarray(c["queries"])[:, None] * b + jnp.arange(b)).reshape(-1)
        fused_pool, xla_pool = pool_pair(b=b, p=p, moments=c["pool_moments"], causal=c["causal"], kv_mask=kv_mask,
                                         sel=sel, q_pos=q_pos)
        try:
            with _kernel_settings(c):
                got_pool = jax.jit(loss_grads(fused_pool, w_out, w_lse))(q, k, v)
        except Exception as e:  # noqa: BLE001
            return dict(c, error=f"pooled branch: {type(e).__name__}: {e}", ok=False)
        pool_errors, _, pool_ok = compare_branch(got_pool, jax.jit(loss_grads(xla_pool, w_out, w_lse))(q, k, v), dtype)
        errors.update({f"pool_{k}": e for k, e in pool_errors.items()})
        ok = ok and pool_ok
    return dict(c, errors=errors, tolerance=tolerance, ok=ok)


def seed_range(text: str) -> range:
    """`A:B` (seeds A to B-1) or `N` (seeds 0 to N-1)."""
    try:
        start, _, stop = text.rpartition(":")
        r = range(int(start or 0), int(stop))
    except ValueError:
        r = range(0)
    if not r:
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed; allowed: N or A:B with A < B")
    return r


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=seed_range, default=seed_range("0:20"), help="N or A:B (default 0:20)")
    p.add_argument("--out", help="also write every case's result to this JSON file")
    a = p.parse_args(argv)
    where = f"{jax.default_backend()} ({jax.devices()[0].device_kind}), jax {jax.__version__}"
    print(f"fused kernel against scan, {len(a.seeds)} drawn cases on {where}", flush=True)
    results = []
    for seed in a.seeds:
        t = time.time()
        case = draw_case(seed)
        r = run_case(case)
        results.append(r)
        what = ("refused: " + r["refused"]) if "refused" in r else r.get("error") or \
            "largest error " + ", ".join(f"{k} {e:.1e}" for k, e in sorted(r["errors"].items(), key=lambda x: -x[1])[:1])
        print(f"  {'ok    ' if r['ok'] else 'FAILED'} seed {seed} ({time.time() - t:.1f} s): {what}", flush=True)
        if not r["ok"]:
            print(f"         case: {json.dumps(case)}", flush=True)
    failed = [r["seed"] for r in results if not r["ok"]]
    refused = sum("refused" in r for r in results)
    print(f"{len(results) - len(failed) - refused} agree, {refused} refused, {len(failed)} failed"
          + (f" (seeds {failed})" if failed else ""), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"device": where, "failed": failed, "cases": results}, f, indent=1, default=str)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
