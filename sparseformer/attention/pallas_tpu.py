"""The fused exact kernel on a TPU: the same block-sparse walk as `pallas_kernel`, in Mosaic TPU.

`pallas_kernel` reads a block's address from an index array *inside* a Triton program and loads
it itself. On a TPU the loads are DMAs that Pallas pipelines from the grid's `BlockSpec`s, so the
walk moves into the grid, with the lists in scalar memory (scalar prefetch), as splash attention
does with its mask info:

- **forward** and **dq**: grid `((batch, kv head) pair, query tile of the group, query block,
  slot)`. The key/value index
  map reads the slot's block from the prefetched list; slots past the query block's count repeat
  the last valid block, so Pallas issues no new DMA for them, and `pl.when` skips their compute:
  an unused slot costs one empty grid step. The online-softmax state (running max, normaliser,
  accumulator) lives in VMEM scratch across the slot axis; the output and log-sum-exp are written
  at the last slot.
- **dk, dv**: grid `((batch, kv head) pair, step)` over one *walk* per pair: every key
  block's entry, then the query blocks that chose it in ascending order (the inverted lists, one
  sort per call), then unused entries at the end. The output block follows the walk's key block,
  so a key block's gradient stays in VMEM while its list is walked and is written once: the first
  entry zeroes it, each query block adds its share (every query head of the group), in a fixed
  order: deterministic, without atomics or a second reduction kernel (the TPU runs the grid in
  order). A key block no query block chose still gets its zeros.

Scalar memory is small (1 MiB a core from TPU v4 on), so each kernel runs as several calls over
slices of the (batch, kv head) pairs whose lists fit `SMEM_BUDGET`; one pair too long for it is
refused with what to change.

Masks, dtypes and the stacking of a group's query heads into one tile are `pallas_kernel`'s (the
same `Plan` and lists); logits and statistics are float32; float32 inputs multiply at full
precision. Checked on a CPU by TPU interpret mode (`pltpu.InterpretParams`) against the `scan`
kernel and by lowering for `tpu`; not yet timed on a TPU (none was available), so `auto` does not
pick it there.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from sparseformer.attention.dense import LOG0, softmax_delta
from sparseformer.attention.pallas_kernel import pair_mask  # a key block's mask is `[1, b]` here

# Bytes of block lists one call takes into scalar memory (SMEM: 1 MiB per core from TPU v4 on; the
# compiler keeps some): a call covers as many (batch, kv head) pairs as fit.
SMEM_BUDGET = 256 * 1024
WALK_FIELDS = 4  # (key block, query block, kind, row start) per step of the dk/dv walk
SENTINEL, ENTRY, UNUSED = 0, 1, 2  # kinds of step


def _precision(dtype):
    return lax.Precision.HIGHEST if dtype == jnp.float32 else None


def _dot_t(a, b):
    """`a @ b.T`, float32 accumulation."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=_precision(a.dtype),
                           preferred_element_type=jnp.float32)


def _dot(a, b):
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=_precision(a.dtype),
                           preferred_element_type=jnp.float32)


def _t_dot(a, b):
    """`a.T @ b`, float32 accumulation."""
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), precision=_precision(a.dtype),
                           preferred_element_type=jnp.float32)


# ---------------------------------------------------------------- the dk/dv walk


def dkv_walk(plan, idx, valid, row_start):
    """`[B, Hk, L, WALK_FIELDS]` int32 steps, `L = m + n*K`: for each key block in order its
    SENTINEL step (zero the gradient), then an ENTRY per query block that chose it (ascending),
    and the UNUSED steps (invalid slots) at the end, on the last key block. Steps that compute
    nothing keep the previous step's query block, so no query tile is fetched for them."""
    B, Hk, n, K = idx.shape
    m = plan.num_key_blocks
    qblock = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32)[:, None], (n, K))
    entry_key = jnp.where(valid, idx * (n + 1) + 1 + qblock, m * (n + 1)).reshape(B, Hk, n * K)
    sentinel_key = jnp.broadcast_to(jnp.arange(m, dtype=jnp.int32) * (n + 1), (B, Hk, m))
    key = jnp.concatenate([sentinel_key, entry_key.astype(jnp.int32)], -1)
    order = jnp.argsort(key, axis=-1, stable=True)
    key = jnp.take_along_axis(key, order, -1)
    kind = jnp.where(key >= m * (n + 1), UNUSED, jnp.where(key % (n + 1) == 0, SENTINEL, ENTRY))
    blk = jnp.minimum(key // (n + 1), m - 1)
    pos = jnp.where(kind == ENTRY, jnp.arange(key.shape[-1]), 0)
    last_entry = lax.cummax(pos, axis=pos.ndim - 1)
    qi = jnp.take_along_axis(jnp.where(kind == ENTRY, key % (n + 1) - 1, 0), last_entry, -1)
    if plan.has_start:
        starts = jnp.concatenate([jnp.zeros((B, Hk, m), jnp.int32), row_start.reshape(B, Hk, n * K)], -1)
        start = jnp.take_along_axis(starts.astype(jnp.int32), order, -1)
    else:
        start = jnp.zeros_like(key)
    return jnp.stack([blk, qi, kind, start], -1).astype(jnp.int32)


# ---------------------------------------------------------------- kernels
#
# A call covers `F` of the `B * Hk` (batch, key/value head) pairs, flattened (`f`), so its lists fit
# scalar memory; `f0` is the first pair of the call (key padding is per batch element: `(f0+f)//Hk`).


def _walk_step(plan, meta_ref, kmask_ref, M: int):
    """This program's slot `j`, its query block's count of valid slots, and a function giving the
    slot's pair mask (None when every pair is allowed), for the forward and dq walks."""
    f, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    base = (f * plan.num_query_blocks + i) * M
    count, qid = meta_ref[base], meta_ref[base + 1]

    def slot_mask():
        blk = meta_ref[base + 2 + j]
        start = meta_ref[base + 2 + plan.slots + j] if plan.has_start else None
        return pair_mask(plan, qid, blk, start, kmask_ref[...] if plan.has_mask else None)

    return j, count, slot_mask


def _forward_kernel(meta_ref, q_ref, k_ref, v_ref, *refs, plan, M: int):
    kmask_ref = refs[0] if plan.has_mask else None
    o_ref, lse_ref, m_sc, l_sc, acc_sc = refs[-5:]
    j, count, slot_mask = _walk_step(plan, meta_ref, kmask_ref, M)

    @pl.when(j == 0)
    def _():
        m_sc[...] = jnp.full(m_sc.shape, LOG0, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when(j < count)
    def _():
        s = _dot_t(q_ref[...], k_ref[...])
        mask = slot_mask()
        if mask is not None:
            s = jnp.where(mask, s, LOG0)
        m_prev = m_sc[...]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        alpha = jnp.exp(m_prev - m_new)
        p = jnp.exp(s - m_new)
        if mask is not None:  # a row with nothing allowed in this slot gains nothing
            p = jnp.where(mask, p, 0.0)
        v = v_ref[...]
        acc_sc[...] = acc_sc[...] * alpha + _dot(p.astype(v.dtype), v)
        l_sc[...] = l_sc[...] * alpha + jnp.sum(p, axis=1, keepdims=True)
        m_sc[...] = m_new

    @pl.when(j == plan.slots - 1)
    def _():
        l_i = l_sc[...]
        has = l_i > 0
        safe = jnp.where(has, l_i, 1.0)
        o_ref[...] = (acc_sc[...] / safe).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(has, m_sc[...] + jnp.log(safe), LOG0)


def _dq_kernel(meta_ref, q_ref, k_ref, v_ref, *refs, plan, M: int):
    kmask_ref = refs[0] if plan.has_mask else None
    do_ref, lse_ref, dd_ref, dq_ref, dq_sc = refs[-5:]
    j, count, slot_mask = _walk_step(plan, meta_ref, kmask_ref, M)

    @pl.when(j == 0)
    def _():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    @pl.when(j < count)
    def _():
        q, k = q_ref[...], k_ref[...]
        p = jnp.exp(_dot_t(q, k) - lse_ref[...])
        mask = slot_mask()
        if mask is not None:
            p = jnp.where(mask, p, 0.0)
        ds = p * (_dot_t(do_ref[...].astype(q.dtype), v_ref[...]) - dd_ref[...])
        dq_sc[...] += _dot(ds.astype(k.dtype), k)

    @pl.when(j == plan.slots - 1)
    def _():
        dq_ref[...] = dq_sc[...]


def _dkv_kernel(walk_ref, qid_ref, q_ref, k_ref, v_ref, *refs, plan, L: int):
    kmask_ref = refs[0] if plan.has_mask else None
    do_ref, lse_ref, dd_ref, dk_ref, dv_ref = refs[-5:]
    base = (pl.program_id(0) * L + pl.program_id(1)) * WALK_FIELDS
    blk, qi, kind = walk_ref[base], walk_ref[base + 1], walk_ref[base + 2]

    @pl.when(kind == SENTINEL)
    def _():
        dk_ref[...] = jnp.zeros(dk_ref.shape, jnp.float32)
        dv_ref[...] = jnp.zeros(dv_ref.shape, jnp.float32)

    @pl.when(kind == ENTRY)
    def _():
        start = walk_ref[base + 3] if plan.has_start else None
        mask = pair_mask(plan, qid_ref[qi], blk, start, kmask_ref[...] if plan.has_mask else None)
        k, v = k_ref[...], v_ref[...]
        dk, dv = dk_ref[...], dv_ref[...]
        for r in range(plan.tiles_per_group):  # every query head of the group, a tile at a time
            q = q_ref[r]
            do = do_ref[r].astype(q.dtype)
            p = jnp.exp(_dot_t(q, k) - lse_ref[r])
            if mask is not None:
                p = jnp.where(mask, p, 0.0)
            dv = dv + _t_dot(p.astype(do.dtype), do)
            ds = p * (_dot_t(do, v) - dd_ref[r])
            dk = dk + _t_dot(ds.astype(q.dtype), q)
        dk_ref[...] = dk
        dv_ref[...] = dv


# ---------------------------------------------------------------- calls


def _call(kernel, plan, grid_spec, out_shape, args, name, semantics):
    return pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=out_shape,
        interpret=pltpu.InterpretParams() if plan.interpret else False,
        compiler_params=None if plan.interpret else pltpu.CompilerParams(dimension_semantics=semantics),
        name=name,
    )(*args)


def _in_calls(lists, fn):
    """Run `fn(f0, lists[f0:f1]) -> tuple of [F, ...]` over slices of the flattened (batch, kv
    head) axis small enough for their lists to fit `SMEM_BUDGET`; concatenate the results."""
    total = lists.shape[0]
    per_head = lists[0].size * 4
    if per_head > SMEM_BUDGET:
        raise ValueError(
            f"model.attention.selection.kernel: 'pallas' on a TPU keeps one head's block lists in scalar "
            f"memory, {per_head} bytes here > {SMEM_BUDGET}; use a larger selection.block_size or kernel 'scan'")
    step = max(1, SMEM_BUDGET // per_head)
    parts = [fn(f0, lists[f0 : f0 + step]) for f0 in range(0, total, step)]
    return tuple(jnp.concatenate(xs, 0) if len(xs) > 1 else xs[0] for xs in zip(*parts))


def _list_specs(plan, Hk: int, f0: int, D: int):
    """Specs of (q, k, v[, kmask]) for the programs that walk a query block's slots, of one query
    tile and of its rows' statistics (`[.., rows, 1]`); index maps read the call's lists."""
    R, n = plan.tiles_per_group, plan.num_query_blocks

    def key_block(f, r, i, j, meta):
        M = 2 + plan.slots * (2 if plan.has_start else 1)
        base = (f * n + i) * M
        last = jnp.maximum(meta[base] - 1, 0)  # unused slots stay on the last valid block: no DMA
        return meta[base + 2 + jnp.minimum(j, last)]

    tile = pl.BlockSpec((None, None, plan.rows, D), lambda f, r, i, j, meta: (f0 + f, r, i, 0))
    rows = pl.BlockSpec((None, None, plan.rows, 1), lambda f, r, i, j, meta: (f0 + f, r, i, 0))
    out_tile = pl.BlockSpec((None, None, plan.rows, D), lambda f, r, i, j, meta: (f, r, i, 0))
    out_rows = pl.BlockSpec((None, None, plan.rows, 1), lambda f, r, i, j, meta: (f, r, i, 0))
    kv = pl.BlockSpec((None, plan.block, D), lambda f, r, i, j, meta: (f0 + f, key_block(f, r, i, j, meta), 0))
    specs = [tile, kv, kv]
    if plan.has_mask:
        specs.append(pl.BlockSpec((None, None, 1, plan.block), lambda f, r, i, j, meta: (
            lax.div(f0 + f, Hk), key_block(f, r, i, j, meta), 0, 0)))
    return specs, tile, rows, out_tile, out_rows


def _flat(x):
    """`[B, Hk, ...]` -> `[B * Hk, ...]`."""
    return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def _tpu_lists(plan, meta):
    """The forward lists without the Triton layout's padding to a power of two: `[B*Hk, n, M]`."""
    return _flat(meta[..., : 2 + plan.slots * (2 if plan.has_start else 1)])


def forward(plan, qg, k, v, meta, kmask):
    """Output `[B, Hk, R, n*rows, D]` float32 and log-sum-exp `[B, Hk, R, n*rows]`."""
    B, Hk, R, TR, D = qg.shape
    lists = _tpu_lists(plan, meta)
    M = lists.shape[-1]
    qf, kf, vf = _flat(qg), _flat(k), _flat(v)

    def call(f0, part):
        F = part.shape[0]
        specs, tile, rows, out_tile, out_rows = _list_specs(plan, Hk, f0, D)
        grid_spec = pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(F, R, plan.num_query_blocks, plan.slots), in_specs=specs,
            out_specs=[out_tile, out_rows],
            scratch_shapes=[pltpu.VMEM((plan.rows, 1), jnp.float32), pltpu.VMEM((plan.rows, 1), jnp.float32),
                            pltpu.VMEM((plan.rows, D), jnp.float32)],
        )
        out_shape = (jax.ShapeDtypeStruct((F, R, TR, D), qg.dtype), jax.ShapeDtypeStruct((F, R, TR, 1), jnp.float32))
        args = (part.reshape(-1), qf, kf, vf) + ((kmask,) if plan.has_mask else ())
        return _call(functools.partial(_forward_kernel, plan=plan, M=M), plan, grid_spec, out_shape, args,
                     "sparseformer_block_sparse_fwd_tpu", ("parallel", "parallel", "parallel", "arbitrary"))

    out, lse = _in_calls(lists, call)
    return out.reshape(qg.shape), lse.reshape(qg.shape[:-1])


def backward(plan, qg, k, v, meta, idx, valid, row_start, qids, kmask, out, lse, d_out, d_lse):
    """dq `[B, Hk, R, n*rows, D]`, dk and dv `[B, Hk, S, D]`, float32."""
    B, Hk, R, TR, D = qg.shape
    S, n, b = k.shape[2], plan.num_query_blocks, plan.block
    dd = _flat(softmax_delta(out, d_out, d_lse))[..., None]
    lse_f, do_f = _flat(lse)[..., None], _flat(d_out.astype(qg.dtype))
    qf, kf, vf = _flat(qg), _flat(k), _flat(v)
    mask_args = (kmask,) if plan.has_mask else ()
    lists = _tpu_lists(plan, meta)
    M = lists.shape[-1]

    def dq_call(f0, part):
        F = part.shape[0]
        specs, tile, rows, out_tile, _ = _list_specs(plan, Hk, f0, D)
        grid_spec = pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(F, R, n, plan.slots), in_specs=specs + [tile, rows, rows],
            out_specs=out_tile, scratch_shapes=[pltpu.VMEM((plan.rows, D), jnp.float32)],
        )
        return (_call(functools.partial(_dq_kernel, plan=plan, M=M), plan, grid_spec,
                      jax.ShapeDtypeStruct((F, R, TR, D), jnp.float32),
                      (part.reshape(-1), qf, kf, vf) + mask_args + (do_f, lse_f, dd),
                      "sparseformer_block_sparse_dq_tpu", ("parallel", "parallel", "parallel", "arbitrary")),)

    (dq,) = _in_calls(lists, dq_call)

    walk = _flat(dkv_walk(plan, idx, valid, row_start))
    L = walk.shape[1]

    def dkv_call(f0, part):
        F = part.shape[0]

        def field(c):
            return lambda f, t, w, q: w[(f * L + t) * WALK_FIELDS + c]

        blk, qi = field(0), field(1)
        group = pl.BlockSpec((None, R, plan.rows, D), lambda f, t, w, q: (f0 + f, 0, qi(f, t, w, q), 0))
        group_rows = pl.BlockSpec((None, R, plan.rows, 1), lambda f, t, w, q: (f0 + f, 0, qi(f, t, w, q), 0))
        kv = pl.BlockSpec((None, b, D), lambda f, t, w, q: (f0 + f, blk(f, t, w, q), 0))
        in_specs = [group, kv, kv]
        if plan.has_mask:
            in_specs.append(pl.BlockSpec((None, None, 1, b), lambda f, t, w, q: (lax.div(f0 + f, Hk), blk(f, t, w, q), 0, 0)))
        in_specs += [group, group_rows, group_rows]
        out = pl.BlockSpec((None, b, D), lambda f, t, w, q: (f, blk(f, t, w, q), 0))
        grid_spec = pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=2, grid=(F, L), in_specs=in_specs,
                                                 out_specs=[out, out])
        grad_shape = jax.ShapeDtypeStruct((F, S, D), jnp.float32)
        return _call(functools.partial(_dkv_kernel, plan=plan, L=L), plan, grid_spec, (grad_shape, grad_shape),
                     (part.reshape(-1), qids.astype(jnp.int32), qf, kf, vf) + mask_args + (do_f, lse_f, dd),
                     "sparseformer_block_sparse_dkv_tpu", ("parallel", "arbitrary"))

    dk, dv = _in_calls(walk, dkv_call)
    return dq.reshape(qg.shape), dk.reshape(k.shape), dv.reshape(v.shape)


def key_mask(kv_mask, block: int):
    """`[B, S]` -> `[B, m, 1, b]` int32: a key block's mask is one `(1, b)` tile (TPU tiles need
    their last two dims whole or multiples of (8, 128))."""
    B, S = kv_mask.shape
    return kv_mask.astype(jnp.int32).reshape(B, S // block, 1, block)
