"""The pooled branch (`compression.kind = "pool"`) fused into Pallas (Triton) kernels.

Every query attends to the summary tokens (mean key and value of each chunk of `p` keys, `log(count)`
added to its logit, and with `pool_moments` the variance term `|q|^2 var / 2`), less the summaries
inside the key blocks selection computed exactly for that row (exclusion). In XLA this runs in
chunks of query rows, each a dozen small ops, forward and backward: 64 + 64 loop trips at 64K tokens,
most of rsa's kernel launches on a GPU (`benchmarks/gpu_aot.py`). Here:
  - forward: one program per (query block, batch, head) walks the summaries a tile at a time with
    the online softmax on chip, reading the block's selection slots to leave out its excluded
    summaries; out `[B, H, T, D]` and the float32 log-sum-exp `[B, H, T]`, as the XLA path returns;
  - backward: dq by the same walk; the summaries' gradients (mean key, variance, mean value) by one
    program per (summary tile, piece of the query blocks, batch, head) walking its query blocks and
    writing float32 partial sums, added in a fixed order afterwards: deterministic, no atomics.
Nothing `T x nc` reaches memory, and the backward pass keeps what the XLA path keeps (q, the
summaries, out, lse). Compiled on a GPU, interpreted elsewhere (tests); the TPU keeps the XLA path.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from sparseformer.attention.dense import LOG0, softmax_delta
from sparseformer.attention.pallas_kernel import (_dot, _dot_t, _next_pow2, _t_dot, fixed_params, kernel_target,
                                                  unsupported_reason)

SUMMARY_TILE = 64
"""Summary tokens a program holds at once (fewer when the call has fewer)."""

MAX_PIECES = 8
"""Pieces the query blocks are cut into for the summaries' gradients, at most: more programs, and
`pieces x nc x D` float32 partial sums (at most a quarter of a bfloat16 `[B, T, H, D]` array)."""


class PoolPlan(NamedTuple):
    rows: int  # query rows a program holds: the selection's block (or 64 without one)
    tile: int  # summaries a tile
    num_tiles: int
    p: int  # keys a summary stands for
    per_block: int  # summaries in one selection key block (b // p); 0 without a selection
    slots: int  # selection slots a query block has (K); 0 without a selection
    moments: bool
    causal: bool
    scale: float
    pieces: int
    interpret: bool


def usable(num_rows: int, head_dim: int, block: int) -> bool:
    """Whether the fused kernels take a call: Triton at hand (compiled or interpreted), query
    blocks of `block` rows tiling the queries, and tiles a Triton matmul takes."""
    family, _ = kernel_target()
    return family == "triton" and num_rows % block == 0 and unsupported_reason(block, head_dim) is None


def _scaled(plan: PoolPlan, q):
    """The queries as the XLA path scales them: in their dtype, then float32."""
    return (q * jnp.asarray(plan.scale, q.dtype) if plan.scale != 1.0 else q).astype(jnp.float32)


def _tile(plan: PoolPlan, t, q, pos, row_off, k_ref, aux_ref, meta):
    """Logits `[rows, tile]` of summary tile `t` and which a row may use."""
    C = plan.tile
    cols = pl.ds(t * C, C)
    s = _dot_t(q, k_ref[cols, :])
    if plan.moments:  # the variance feature: |q|^2 / 2 . var
        s = s + 0.5 * jnp.sum(q * q, axis=1)[:, None] * aux_ref[0, cols][None, :]
    s = s + aux_ref[1, cols][None, :]  # log(count)
    c = t * C + lax.broadcasted_iota(jnp.int32, (1, C), 1)
    ok = aux_ref[2, cols][None, :] > 0  # a summary of real keys
    if plan.causal:  # only summaries entirely in the past
        ok = ok & ((c + 1) * plan.p - 1 <= pos[:, None])
    if plan.slots:  # exclusion: summaries inside blocks computed exactly for the row
        K = plan.slots
        for j in range(K):
            use = (meta(K + j) != 0) & (row_off >= meta(2 * K + j))  # [rows, 1]
            ok = ok & ~(use & (c // plan.per_block == meta(j)))
    return s, ok


def _tiles_seen(plan: PoolPlan, pos_ref):
    """Summary tiles a query block walks: all, or (causal) those up to the last one holding a
    summary its last row may see (positions ascending): a causal block skips its future's tiles."""
    if not plan.causal:
        return plan.num_tiles
    seen = (pos_ref[plan.rows - 1] + 1) // plan.p  # summaries whose keys all precede the last row
    return jnp.minimum(plan.num_tiles, (seen + plan.tile - 1) // plan.tile)


def _fwd_kernel(q_ref, pos_ref, k_ref, v_ref, aux_ref, *refs, plan: PoolPlan):
    meta_ref = refs[0] if plan.slots else None
    o_ref, lse_ref = refs[-2:]
    q = _scaled(plan, q_ref[...])
    pos = pos_ref[...]
    row_off = lax.broadcasted_iota(jnp.int32, (plan.rows, 1), 0)
    meta = (lambda i: meta_ref[i]) if plan.slots else None

    def body(t, carry):
        acc, m, l = carry
        s, ok = _tile(plan, t, q, pos, row_off, k_ref, aux_ref, meta)
        s = jnp.where(ok, s, LOG0)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp(m - m_new)
        pr = jnp.where(ok, jnp.exp(s - m_new[:, None]), 0.0)
        v = v_ref[pl.ds(t * plan.tile, plan.tile), :]
        acc = acc * alpha[:, None] + _dot(pr.astype(v.dtype), v)
        return acc, m_new, l * alpha + jnp.sum(pr, axis=1)

    R, D = q.shape
    init = (jnp.zeros((R, v_ref.shape[-1]), jnp.float32), jnp.full((R,), LOG0, jnp.float32), jnp.zeros((R,), jnp.float32))
    acc, m, l = lax.fori_loop(0, _tiles_seen(plan, pos_ref), body, init)
    has = l > 0
    safe = jnp.where(has, l, 1.0)
    o_ref[...] = (acc / safe[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(has, m + jnp.log(safe), LOG0)


def _dq_kernel(q_ref, pos_ref, k_ref, v_ref, aux_ref, *refs, plan: PoolPlan):
    meta_ref = refs[0] if plan.slots else None
    do_ref, lse_ref, dd_ref, dq_ref = refs[-4:]
    q = _scaled(plan, q_ref[...])
    pos, do, lse, dd = pos_ref[...], do_ref[...], lse_ref[...], dd_ref[...]
    row_off = lax.broadcasted_iota(jnp.int32, (plan.rows, 1), 0)
    meta = (lambda i: meta_ref[i]) if plan.slots else None

    def body(t, dq):
        s, ok = _tile(plan, t, q, pos, row_off, k_ref, aux_ref, meta)
        pr = jnp.where(ok, jnp.exp(s - lse[:, None]), 0.0)
        cols = pl.ds(t * plan.tile, plan.tile)
        ds = pr * (_dot_t(do, v_ref[cols, :].astype(jnp.float32)) - dd[:, None])
        dq = dq + _dot(ds, k_ref[cols, :])
        if plan.moments:  # d(|q|^2 / 2 . var)/dq = (ds . var) q
            dq = dq + jnp.sum(ds * aux_ref[0, cols][None, :], axis=1)[:, None] * q
        return dq

    dq = lax.fori_loop(0, _tiles_seen(plan, pos_ref), body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * plan.scale).astype(dq_ref.dtype)  # d/dq of (scale * q)


def _dsum_kernel(q_ref, pos_ref, k_ref, v_ref, aux_ref, *refs, plan: PoolPlan, num_query_blocks: int):
    """One summary tile's gradients (mean key, mean value, variance) from one piece of the query
    blocks: float32 partial sums, added in piece order afterwards."""
    meta_ref = refs[0] if plan.slots else None
    do_ref, lse_ref, dd_ref, dk_ref, dv_ref, dvar_ref = refs[-6:]
    t, piece = pl.program_id(0) // plan.pieces, pl.program_id(0) % plan.pieces
    per_piece = -(-num_query_blocks // plan.pieces)
    lo = piece * per_piece
    hi = jnp.minimum(num_query_blocks, lo + per_piece)
    R, C = plan.rows, plan.tile
    row_off = lax.broadcasted_iota(jnp.int32, (R, 1), 0)
    v = v_ref[pl.ds(t * C, C), :].astype(jnp.float32)

    def walk(i, carry):
        dk, dv, dvar = carry
        rows = pl.ds(i * R, R)
        q = _scaled(plan, q_ref[rows, :])
        meta = (lambda j: meta_ref[i, j]) if plan.slots else None
        s, ok = _tile(plan, t, q, pos_ref[rows], row_off, k_ref, aux_ref, meta)
        pr = jnp.where(ok, jnp.exp(s - lse_ref[rows][:, None]), 0.0)
        do = do_ref[rows, :]
        ds = pr * (_dot_t(do, v) - dd_ref[rows][:, None])
        dk = dk + _t_dot(ds, q)
        dv = dv + _t_dot(pr, do)
        if plan.moments:
            dvar = dvar + jnp.sum(ds * (0.5 * jnp.sum(q * q, axis=1))[:, None], axis=0)
        return dk, dv, dvar

    if plan.causal:  # a query block whose last row precedes the tile's first summary adds nothing
        first_seen = (t * C + 1) * plan.p - 1

        def body(i, carry):
            return lax.cond(pos_ref[i * R + R - 1] >= first_seen, walk, lambda i, carry: carry, i, carry)
    else:
        body = walk

    zeros = jnp.zeros((C, q_ref.shape[-1]), jnp.float32)
    dk, dv, dvar = lax.fori_loop(lo, hi, body, (zeros, zeros, jnp.zeros((C,), jnp.float32)))
    dk_ref[...] = dk
    dv_ref[...] = dv
    dvar_ref[...] = dvar


# ---------------------------------------------------------------- calls


def _specs(plan: PoolPlan, T: int, D: int, Dv: int, nc_pad: int, n: int, W: int, *, whole_rows: bool):
    """(q, pos, summaries' keys, values, aux[, meta]) specs: a query block per program, or (the
    summaries' gradients) every query row of the head."""
    R = T if whole_rows else plan.rows
    if whole_rows:
        q = pl.BlockSpec((None, T, None, D), lambda i, bb, h: (bb, 0, h, 0))
        pos = pl.BlockSpec((T,), lambda i, bb, h: (0,))
        meta = pl.BlockSpec((None, None, n, W), lambda i, bb, h: (bb, h, 0, 0))
    else:
        q = pl.BlockSpec((None, R, None, D), lambda i, bb, h: (bb, i, h, 0))
        pos = pl.BlockSpec((R,), lambda i, bb, h: (i,))
        meta = pl.BlockSpec((None, None, None, W), lambda i, bb, h: (bb, h, i, 0))
    specs = [q, pos,
             pl.BlockSpec((None, None, nc_pad, D), lambda i, bb, h: (bb, h, 0, 0)),
             pl.BlockSpec((None, None, nc_pad, Dv), lambda i, bb, h: (bb, h, 0, 0)),
             pl.BlockSpec((None, None, 4, nc_pad), lambda i, bb, h: (bb, h, 0, 0))]
    return specs + ([meta] if plan.slots else [])


def _rows_spec(plan: PoolPlan, width: int | None, whole: int | None = None):
    """Spec of a head-major `[B, H, T(, width)]` array (out, d_out, lse, delta): the program's query
    block, or all `whole` rows of its head."""
    R = whole or plan.rows
    index = (lambda i, bb, h: (bb, h, 0, 0)) if whole else (lambda i, bb, h: (bb, h, i, 0))
    if width is None:
        return pl.BlockSpec((None, None, R), lambda i, bb, h: index(i, bb, h)[:3])
    return pl.BlockSpec((None, None, R, width), index)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(plan: PoolPlan, q, q_pos, k_mean, aux, v_mean, meta):
    """(out, lse) of the queries `q [B, T, H, D]` over the tile-padded summaries (`aux [B, H, 4, nc]`:
    variance, log count, count, 0), the selection's slots `meta [B, H, n, W]` left out."""
    return _attention_fwd(plan, q, q_pos, k_mean, aux, v_mean, meta)[0]


def _args(plan, q, q_pos, k_mean, v_mean, aux, meta):
    return [q, q_pos, k_mean, v_mean, aux] + ([meta] if plan.slots else [])


def _attention_fwd(plan: PoolPlan, q, q_pos, k_mean, aux, v_mean, meta):
    B, T, H, D = q.shape
    nc_pad, Dv = k_mean.shape[2], v_mean.shape[-1]
    n = T // plan.rows
    W = meta.shape[-1] if plan.slots else 0
    out, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, plan=plan),
        grid=(n, B, H),
        in_specs=_specs(plan, T, D, Dv, nc_pad, n, W, whole_rows=False),
        out_specs=[_rows_spec(plan, Dv), _rows_spec(plan, None)],
        out_shape=[jax.ShapeDtypeStruct((B, H, T, Dv), q.dtype), jax.ShapeDtypeStruct((B, H, T), jnp.float32)],
        interpret=plan.interpret,
        compiler_params=fixed_params(plan.interpret),
        name="sparseformer_pool_fwd",
    )(*_args(plan, q, q_pos, k_mean, v_mean, aux, meta))
    return (out, lse), (q, q_pos, k_mean, aux, v_mean, meta, out, lse)


def _attention_bwd(plan: PoolPlan, res, cts):
    q, q_pos, k_mean, aux, v_mean, meta, out, lse = res
    d_out = cts[0].astype(jnp.float32)
    delta = softmax_delta(out, d_out, cts[1].astype(jnp.float32))  # [B, H, T]
    B, T, H, D = q.shape
    nc_pad, Dv = k_mean.shape[2], v_mean.shape[-1]
    n = T // plan.rows
    W = meta.shape[-1] if plan.slots else 0
    args = _args(plan, q, q_pos, k_mean, v_mean, aux, meta) + [d_out, lse, delta]
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, plan=plan),
        grid=(n, B, H),
        in_specs=_specs(plan, T, D, Dv, nc_pad, n, W, whole_rows=False)
        + [_rows_spec(plan, Dv), _rows_spec(plan, None), _rows_spec(plan, None)],
        out_specs=pl.BlockSpec((None, plan.rows, None, D), lambda i, bb, h: (bb, i, h, 0)),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        interpret=plan.interpret,
        compiler_params=fixed_params(plan.interpret),
        name="sparseformer_pool_dq",
    )(*args)
    P, C = plan.pieces, plan.tile
    part = lambda width: pl.BlockSpec(  # noqa: E731 (one tile of one piece's partial sums)
        (None, None, None, C) + ((width,) if width else ()),
        lambda i, bb, h: (i % P, bb, h, i // P) + ((0,) if width else ()))
    dk, dv, dvar = pl.pallas_call(
        functools.partial(_dsum_kernel, plan=plan, num_query_blocks=n),
        grid=(plan.num_tiles * P, B, H),
        in_specs=_specs(plan, T, D, Dv, nc_pad, n, W, whole_rows=True)
        + [_rows_spec(plan, Dv, whole=T), _rows_spec(plan, None, whole=T), _rows_spec(plan, None, whole=T)],
        out_specs=[part(D), part(Dv), part(None)],
        out_shape=[jax.ShapeDtypeStruct((P, B, H, nc_pad, D), jnp.float32),
                   jax.ShapeDtypeStruct((P, B, H, nc_pad, Dv), jnp.float32),
                   jax.ShapeDtypeStruct((P, B, H, nc_pad), jnp.float32)],
        interpret=plan.interpret,
        compiler_params=fixed_params(plan.interpret),
        name="sparseformer_pool_dsum",
    )(*args)
    dk, dv, dvar = (jnp.sum(x, axis=0) for x in (dk, dv, dvar))  # the pieces in order
    daux = jnp.zeros_like(aux).at[:, :, 0].set(dvar) if plan.moments else jnp.zeros_like(aux)
    return dq, None, dk.astype(k_mean.dtype), daux, dv.astype(v_mean.dtype), None


_attention.defvjp(_attention_fwd, _attention_bwd)


def pool_attention(q, q_pos, k_mean, var, v_mean, cnt, sel, *, p: int, moments: bool, causal: bool,
                   scale: float, rows: int):
    """`compression._pool_attention`, fused: `q [B, T, H, D]` (unscaled; `scale` applied), the
    summaries `k_mean [B, H, nc, D]` (float32), `var [B, H, nc]` (or None), `v_mean [B, H, nc, Dv]`,
    `cnt [B|1, 1|H, nc]`, the selection to leave out (or None); `rows` query rows a program (the
    selection's block). Returns out `[B, H, T, Dv]` in q's dtype and the float32 lse `[B, H, T]`."""
    B, T, H, D = q.shape
    nc = k_mean.shape[2]
    C = min(SUMMARY_TILE, max(16, _next_pow2(nc)))
    nc_pad = -(-nc // C) * C
    def pad(x):  # to whole tiles (a no-op, and no copy kept for the backward, when they are whole)
        return x if nc_pad == nc else jnp.pad(x, [(0, 0)] * 2 + [(0, nc_pad - nc)] + [(0, 0)] * (x.ndim - 3))

    cnt = jnp.broadcast_to(cnt, (B, H, nc)).astype(jnp.float32)
    var = jnp.zeros((B, H, nc), jnp.float32) if var is None else var.astype(jnp.float32)
    aux = jnp.stack([var, jnp.log(jnp.maximum(cnt, 1.0)), cnt, jnp.zeros_like(cnt)], axis=2)  # [B, H, 4, nc]
    aux = jnp.pad(aux, ((0, 0), (0, 0), (0, 0), (0, nc_pad - nc)))  # padded summaries count 0: unused
    n = T // rows
    slots, meta, per_block = 0, None, 0
    if sel is not None:
        K = sel.idx.shape[-1]
        start = jnp.zeros_like(sel.idx) if sel.row_start is None else sel.row_start
        meta = jnp.concatenate([sel.idx, sel.valid.astype(jnp.int32), start], -1).astype(jnp.int32)
        meta = jnp.pad(meta, ((0, 0), (0, 0), (0, 0), (0, _next_pow2(3 * K) - 3 * K)))  # [B, H, n, W]
        slots, per_block = K, sel.block_size // p
    pieces = max(1, min(MAX_PIECES, n, T // (8 * nc_pad) or 1))
    _, interpret = kernel_target()
    plan = PoolPlan(rows=rows, tile=C, num_tiles=nc_pad // C, p=p, per_block=per_block, slots=slots,
                    moments=moments, causal=causal, scale=float(scale), pieces=pieces, interpret=interpret)
    return _attention(plan, q, q_pos.astype(jnp.int32), pad(k_mean.astype(jnp.float32)), aux, pad(v_mean), meta)
