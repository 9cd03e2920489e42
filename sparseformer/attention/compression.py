"""Compression: a low-rank summary of the keys selection left out.

Every compression is registered in `COMPRESSIONS` with one function

    fn(q, k, v, kv_mask, *, q_pos, causal, config, params, rng, sel) -> (Branch, state)

(`q [B, H, T, D]` scaled by 1/sqrt(D), `k, v [B, H, S, D]`, `q_pos [T]` absolute query
positions, `sel` the `Selection` whose blocks must be left out, or None) and two companions
in `extras`:

  row_logw(state, q_rows, t_rows, excluded, *, causal, kv_mask, start, size) -> [B, H, R, size]
      the absolute log-weight the branch gives keys `start .. start + size - 1` for a few query
      rows `t_rows [R]` (for the regulariser and the fidelity metric; LOG0 where it gives none).
      `start` may be traced, `size` is static; `excluded [B, H, R, size]` and `kv_mask [B, size]`
      (or None) are already cut to those keys. The regulariser calls it chunk by chunk, so
      memory stays `R x size`;
  init(config, key, *, num_heads, head_dim, max_len) -> dict of parameters (optional);
  public_layout: True when `fn` also takes `public=Public(q, k, v, scale)`: the same queries, keys
      and values in `attend`'s own layout (`[B, T, H, D]` unscaled, `[B, S, Hk, D]`). Reading those
      instead of the head-major copies, the branch's backward pass keeps the caller's arrays, not
      copies of them (`pool` does).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from sparseformer.attention import rand
from sparseformer.attention.config import pool_block_size
from sparseformer.attention.correction import Branch
from sparseformer.attention.dense import LOG0, masked_softmax, softmax_delta
from sparseformer.attention.registry import COMPRESSIONS
from sparseformer.attention.selection import Selection, _gather, _slots, slot_mask, to_blocks

TINY = 1e-30


def _row_key_mask(t_rows, k_pos, *, causal, kv_mask, excluded_keys=None):
    """`[B or 1, H or 1, R, C]` which of the keys at positions `k_pos [C]` a row may see
    (`kv_mask [B, C]` and `excluded_keys [B, H, R, C]` are given for those keys)."""
    mask = jnp.ones((1, 1, t_rows.shape[0], k_pos.shape[0]), bool)
    if causal:
        mask = mask & (k_pos[None, :] <= t_rows[:, None])[None, None]
    if kv_mask is not None:
        mask = mask & kv_mask[:, None, None, :]
    if excluded_keys is not None:
        mask = mask & ~excluded_keys
    return mask


# ---------------------------------------------------------------- pool


class Public(NamedTuple):
    """Queries, keys and values in `attend`'s own layout: `q [B, T, H, D]` (unscaled: multiply by
    `scale`), `k, v [B, S, Hk, D]` (`H % Hk == 0`)."""

    q: jax.Array
    k: jax.Array
    v: jax.Array
    scale: float

    @classmethod
    def of(cls, public, q, k, v):
        """`public`, or (a caller that passed none) the head-major `q [B, H, T, D]` (scaled), `k, v
        [B, Hk, S, D]` in the public layout."""
        return public if public is not None else cls(*(jnp.swapaxes(x, 1, 2) for x in (q, k, v)), 1.0)


def _chunk_start(i, size, total):
    """First row of chunk `i` of `size` rows out of `total`: `i * size`, clamped so that the last
    chunk ends at `total` (overlapping the one before when `size` does not divide `total`; its rows
    `>= i * size` are the ones no earlier chunk covered). Shared by the pooled and Performer branches."""
    return i * size if total % size == 0 else jnp.minimum(i * size, total - size)


def _pool_summaries(k, v, kv_mask, p):
    """Mean key and value of each chunk of `p` keys, the count of real keys, and the keys'
    variance around their mean (averaged over dimensions), from `k, v [B, S, Hk, D]` (the public
    layout, read in place): `[B, Hk, nc, D]` x 2, `[B|1, 1, nc]`, `[B, Hk, nc]`. The sum of squares
    is one float32-accumulating contraction of `k` with itself, so the backward pass keeps `k`
    (kept anyway), not a float32 copy of it."""
    B, S, H, D = k.shape
    kc, vc = k.reshape(B, S // p, p, H, D), v.reshape(B, S // p, p, H, D)
    k_sq_tok = jnp.einsum("bshd,bshd->bhs", k, k, preferred_element_type=jnp.float32).reshape(B, H, S // p, p)
    if kv_mask is None:
        k_mean = jnp.mean(kc, 2, dtype=jnp.float32)
        k_sq = jnp.mean(k_sq_tok, 3) / D
        cnt, v_mean = jnp.full((1, 1, S // p), float(p)), jnp.mean(vc, 2)
    else:
        w = kv_mask.reshape(B, S // p, p, 1, 1).astype(jnp.float32)
        cnt = jnp.swapaxes(jnp.sum(w, axis=2)[..., 0], 1, 2)  # [B, 1, nc]
        safe = jnp.maximum(cnt, 1.0)
        k_mean = jnp.sum(kc * w, 2) / jnp.swapaxes(safe, 1, 2)[..., None]
        k_sq = jnp.sum(k_sq_tok * kv_mask.reshape(B, 1, S // p, p).astype(jnp.float32), 3) / (safe * D)
        v_mean = jnp.sum(vc * w, 2) / jnp.swapaxes(safe, 1, 2)[..., None]
    k_mean, v_mean = jnp.swapaxes(k_mean, 1, 2), jnp.swapaxes(v_mean, 1, 2)  # [B, H, nc, D]: small
    var = jnp.maximum(k_sq - jnp.mean(jnp.square(k_mean), -1), 0.0)  # E[k^2] - E[k]^2
    return k_mean, v_mean, cnt, var


def _pool_logits(q, k_mean, var, moments: bool):
    """Per-key log-weight a summary stands for: `q . mean`, plus, with moments, the log-normal
    correction `|q|^2 var / 2` (E exp(q.k) = exp(q.mean + q^T Cov q / 2) for Gaussian keys,
    with an isotropic covariance), so a block of spread-out keys is not undercounted. The
    correction rides in the same matmul as one more feature (`[q, |q|^2/2] . [mean, var]`),
    so it costs no `T x nc` temporary of its own."""
    q = q.astype(jnp.float32)
    if moments:
        q = jnp.concatenate([q, 0.5 * jnp.sum(jnp.square(q), -1, keepdims=True)], -1)
        k_mean = jnp.concatenate([k_mean, var[..., None]], -1)
    return jnp.einsum("bhtd,bhcd->bhtc", q, k_mean.astype(jnp.float32))


def _pool_chunk_mask(q_pos, cnt, p, *, causal, sel: Selection | None, rows=None):
    """`[B|1, H|1, T, nc]` summary tokens a query may use (`rows`: the queries' offsets into the
    selection's rows, needed with `sel`)."""
    nc = cnt.shape[-1]
    mask = (cnt > 0)[:, :, None, :]
    if causal:  # only chunks entirely in the past
        mask = mask & (((jnp.arange(nc) + 1) * p - 1)[None, :] <= q_pos[:, None])[None, None]
    if sel is not None:  # exclusion: chunks inside blocks selection computed exactly for that row
        chunk_sel = jnp.repeat(sel.rows_block_mask(rows), sel.block_size // p, axis=-1)  # [B, H, T, nc]
        mask = mask & ~chunk_sel
    return mask


# The pooled branch is computed in chunks of query rows, each holding `[B, H, rows, nc]` logits:
# at most POOL_CHUNK_SHARE times as many elements as `[B, H, T, D]` (each float32 temporary is then
# at most half a bfloat16 q), and at most POOL_MAX_CHUNKS chunks (on a GPU each chunk is a few kernel
# launches), whichever gives the larger chunk.
POOL_CHUNK_SHARE = 0.25
POOL_MAX_CHUNKS = 64


def pool_chunk_rows(num_rows: int, num_summaries: int, head_dim: int) -> int:
    """Query rows per chunk of the pooled branch."""
    budget = int(POOL_CHUNK_SHARE * num_rows * head_dim / max(1, num_summaries))
    return max(1, min(num_rows, max(budget, -(-num_rows // POOL_MAX_CHUNKS))))


class _PoolStatic(NamedTuple):
    p: int
    moments: bool
    causal: bool
    chunk: int
    scale: float  # q is `[B, T, H, D]` unscaled, multiplied by `scale` chunk by chunk


def _pool_chunk(static: _PoolStatic, i, q, q_pos, cnt, sel):
    """Chunk `i` of the query rows of `q [B, T, H, D]`: its first row (clamped so that the last
    chunk ends at T), which of its rows are `fresh` (not covered by an earlier chunk), its
    head-major scaled queries `[B, H, rows, D]` and its summary mask."""
    T, c = q.shape[1], static.chunk
    start = _chunk_start(i, c, T)
    rows = start + jnp.arange(c)
    pos = jax.lax.dynamic_slice_in_dim(q_pos, start, c)
    mask = _pool_chunk_mask(pos, cnt, static.p, causal=static.causal, sel=sel, rows=rows)
    q_c = jax.lax.dynamic_slice_in_dim(q, start, c, axis=1)
    q_c = jnp.swapaxes(q_c * jnp.asarray(static.scale, q.dtype), 1, 2)
    return start, rows >= i * c, q_c, mask


def _pool_scores(moments: bool, q_c, k_mean, var, cnt):
    """`[B, H, rows, nc]` logits: `_pool_logits` plus `log(count)`, so one token stands for its keys."""
    return _pool_logits(q_c, k_mean, var, moments) + jnp.log(jnp.maximum(cnt, 1.0))[:, :, None, :]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _pool_attention(static: _PoolStatic, q, q_pos, k_mean, var, v_mean, cnt, sel):
    """Softmax attention of every query (`q [B, T, H, D]`, unscaled) over the summary tokens: out
    `[B, H, T, D]` in q's dtype (as the fused exact kernel stores its output: half the bytes kept for
    the backward in bfloat16) and its float32 log-sum-exp `[B, H, T]` (zero and LOG0 on rows with no
    summary). Flash-style: computed over chunks of query rows (sliced from q, not copied), the
    backward pass keeps only the inputs, `out` and `lse` and recomputes each chunk's probabilities,
    so nothing `T x nc` outlives a chunk."""
    return _pool_attention_fwd(static, q, q_pos, k_mean, var, v_mean, cnt, sel)[0]


def _pool_attention_fwd(static, q, q_pos, k_mean, var, v_mean, cnt, sel):
    B, T, H = q.shape[:3]

    def chunk(i):
        start, fresh, q_c, mask = _pool_chunk(static, i, q, q_pos, cnt, sel)
        s = _pool_scores(static.moments, q_c, k_mean, var, cnt)
        return start, fresh, masked_softmax(s, mask, v_mean, "bhtc,bhcd->bhtd")

    def body(i, acc):
        out, lse = acc
        start, fresh, (out_c, lse_c) = chunk(i)
        take = lambda x: jax.lax.dynamic_slice_in_dim(x, start, static.chunk, axis=2)  # noqa: E731
        out_c = jnp.where(fresh[:, None], out_c.astype(out.dtype), take(out))
        lse_c = jnp.where(fresh, lse_c, take(lse))
        return (jax.lax.dynamic_update_slice_in_dim(out, out_c, start, axis=2),
                jax.lax.dynamic_update_slice_in_dim(lse, lse_c, start, axis=2))

    n = -(-T // static.chunk)
    if n == 1:
        out, lse = chunk(0)[2]
        out = out.astype(q.dtype)
    else:
        init = (jnp.zeros((B, H, T, v_mean.shape[-1]), q.dtype), jnp.full((B, H, T), LOG0, jnp.float32))
        out, lse = jax.lax.fori_loop(0, n, body, init)
    return (out, lse), (q, q_pos, k_mean, var, v_mean, cnt, sel, out, lse)


def _pool_attention_bwd(static, res, cts):
    q, q_pos, k_mean, var, v_mean, cnt, sel, out, lse = res
    d_out, d_lse = (x.astype(jnp.float32) for x in cts)
    delta = softmax_delta(out, d_out, d_lse)  # [B, H, T]
    v32 = v_mean.astype(jnp.float32)

    def body(i, acc):
        dq, dk, dvar, dv = acc
        start, fresh, q_c, mask = _pool_chunk(static, i, q, q_pos, cnt, sel)
        take = lambda x: jax.lax.dynamic_slice_in_dim(x, start, static.chunk, axis=2)  # noqa: E731
        do_c = take(d_out)
        s, vjp = jax.vjp(lambda q_c, k_mean, var: _pool_scores(static.moments, q_c, k_mean, var, cnt), q_c, k_mean, var)
        p = jnp.where(mask & fresh[:, None], jnp.exp(s - take(lse)[..., None]), 0.0)  # [B, H, rows, nc]
        dp = jnp.einsum("bhtd,bhcd->bhtc", do_c, v32)
        ds = p * (dp - take(delta)[..., None])
        dq_c, dk_c, dvar_c = vjp(ds)
        dq_c = jnp.swapaxes(dq_c, 1, 2) * static.scale  # the gradient of the unscaled [B, T, H, D] rows
        rows_of_dq = jax.lax.dynamic_slice_in_dim(dq, start, static.chunk, axis=1)
        dq_c = jnp.where(fresh[:, None, None], dq_c.astype(dq.dtype), rows_of_dq)
        dv = dv + jnp.einsum("bhtc,bhtd->bhcd", p, do_c)
        dvar = None if dvar is None else dvar + dvar_c
        return jax.lax.dynamic_update_slice_in_dim(dq, dq_c, start, axis=1), dk + dk_c, dvar, dv

    init = (jnp.zeros(q.shape, jnp.float32), jnp.zeros(k_mean.shape, jnp.float32),
            None if var is None else jnp.zeros(var.shape, jnp.float32), jnp.zeros(v_mean.shape, jnp.float32))
    n = -(-q.shape[1] // static.chunk)
    dq, dk, dvar, dv = body(0, init) if n == 1 else jax.lax.fori_loop(0, n, body, init)
    cast = lambda d, x: None if x is None else d.astype(x.dtype)  # noqa: E731
    return cast(dq, q), None, cast(dk, k_mean), cast(dvar, var), cast(dv, v_mean), None, None


_pool_attention.defvjp(_pool_attention_fwd, _pool_attention_bwd)


@COMPRESSIONS.register("pool", exact_when_full=True, supports_exclusion=True)
def pool(q, k, v, kv_mask, *, q_pos, causal, config, params, rng, sel, public: Public | None = None):
    """One summary token per key block (mean key, mean value), with `log(count)` added to its
    logit so that one token stands for the block's keys. Exact when blocks are one token.

    With `public` (what `attend` passes), it reads the queries, keys and values from there, so its
    backward pass keeps the caller's arrays and not the head-major copies `q`, `k`, `v`. With the
    `pallas` exact kernel (`fused_pool`) the attention over the summaries runs as the fused kernels
    of `pallas_pool` (the same outputs and gradients); otherwise in chunks of query rows."""
    p = pool_block_size(config)
    moments = config.compression.pool_moments
    public = Public.of(public, q, k, v)
    k_mean, v_mean, cnt, var = _pool_summaries(public.k, public.v, kv_mask, p)
    group = public.q.shape[2] // k_mean.shape[1]
    if group > 1:  # the summaries are small: one per query head
        k_mean, v_mean, var = (jnp.repeat(x, group, axis=1) for x in (k_mean, v_mean, var))
    T, D = public.q.shape[1], public.q.shape[-1]
    rows = sel.block_size if sel is not None else FUSED_POOL_ROWS
    if fused_pool(config, public, rows):  # the same attention, one kernel a pass (pallas_pool)
        from sparseformer.attention.pallas_pool import pool_attention

        out, lse = pool_attention(public.q, q_pos, k_mean, var if moments else None, v_mean, cnt, sel, p=p,
                                  moments=moments, causal=causal, scale=float(public.scale), rows=rows)
    else:
        static = _PoolStatic(p, moments, causal, pool_chunk_rows(T, k_mean.shape[2], D), float(public.scale))
        out, lse = _pool_attention(static, public.q, q_pos, k_mean, var if moments else None, v_mean, cnt, sel)
    return Branch.from_softmax(out, lse), dict(k_mean=k_mean, var=var, cnt=cnt, p=p, moments=moments)


# query rows a fused pooled program holds when no selection sets them (its block size does)
FUSED_POOL_ROWS = 64


def fused_pool(config, public: Public, rows: int) -> bool:
    """Whether the pooled branch runs as the fused kernels (`pallas_pool`): with the `pallas` exact
    kernel (`selection.kernel`, `auto` on a GPU), where the Triton tiles take its shapes."""
    from sparseformer.attention.config import selection_kernel
    from sparseformer.attention.pallas_pool import usable

    T, D = public.q.shape[1], public.q.shape[-1]
    kernel = selection_kernel(config, public.k.shape[1], head_dim=D, dtype=public.q.dtype)
    return kernel == "pallas" and usable(T, D, rows)


def _pool_rows(state, q_rows, t_rows, excluded, *, causal, kv_mask, start, size):
    p, cnt = state["p"], state["cnt"]
    nc = cnt.shape[-1]
    n = min(nc, (size - 1) // p + 2)  # the summaries keys start .. start + size - 1 fall in
    first = jnp.minimum(start // p, nc - n)
    cut = lambda x, axis: jax.lax.dynamic_slice_in_dim(x, first, n, axis=axis)  # noqa: E731
    s = _pool_logits(q_rows, cut(state["k_mean"], 2), cut(state["var"], 2), state["moments"])
    mask = cut(_pool_chunk_mask(t_rows, cnt, p, causal=causal, sel=None), 3)
    k_pos = start + jnp.arange(size)
    logw = jnp.take(jnp.where(mask, s, LOG0), k_pos // p - first, axis=-1)  # each key carries its chunk's mean score
    keys = _row_key_mask(t_rows, k_pos, causal=False, kv_mask=kv_mask, excluded_keys=excluded)
    return jnp.where(keys, logw, LOG0)


COMPRESSIONS.add_extra("pool", "row_logw", _pool_rows)
COMPRESSIONS.add_extra("pool", "public_layout", True)


# ---------------------------------------------------------------- low-rank kernels (shared)


def _subtract_on_support(phq, phk, v, kv_mask, sel: Selection, causal: bool):
    """Low-rank estimate of the selected pairs, to subtract (Scatterbrain's exclusion).

    `phq [B, H, T, r]`, `phk [B, H, S, r]`: the estimate of pair (t, s) is `phq_t . phk_s`.
    Scans the chosen slots like the exact kernel, so the support matches it pair for pair.
    """
    b = sel.block_size
    B, H, T, _ = phq.shape
    D = v.shape[-1]
    phq_b, phk_b, vb = to_blocks(phq, b), to_blocks(phk, b), to_blocks(v, b)
    kmask_b = None if kv_mask is None else kv_mask.reshape(B, -1, b)

    @jax.checkpoint
    def body(carry, slot):
        num, den = carry
        idx_j, valid_j, start_j = slot
        w = jnp.einsum("bhnqr,bhnkr->bhnqk", phq_b, _gather(phk_b, idx_j))
        w = jnp.where(slot_mask(idx_j, valid_j, kmask_b, sel.qids, causal, b, start_j), w, 0.0)
        num = num + jnp.einsum("bhnqk,bhnkd->bhnqd", w, _gather(vb, idx_j).astype(jnp.float32))
        return (num, den + jnp.sum(w, -1)), None

    init = (jnp.zeros(phq_b.shape[:4] + (D,), jnp.float32), jnp.zeros(phq_b.shape[:4], jnp.float32))
    (num, den), _ = jax.lax.scan(body, init, _slots(sel.idx, sel.valid, sel.row_start))
    return num.reshape(B, H, T, D), den.reshape(B, H, T)


def _lowrank_rows(phq_rows, ls_rows, phk, t_rows, excluded, *, causal, kv_mask, start):
    """Absolute log-weights `[B, H, R, C]` of a low-rank branch for a few query rows (features
    `phq_rows`, log scale `ls_rows`) on the keys `start ..` whose features are `phk [B, H, C, f]`."""
    w = jnp.einsum("bhrf,bhsf->bhrs", phq_rows, phk)
    keys = _row_key_mask(t_rows, start + jnp.arange(phk.shape[2]), causal=causal, kv_mask=kv_mask, excluded_keys=excluded)
    return jnp.where(keys & (w > TINY), jnp.log(jnp.maximum(w, TINY)) + ls_rows[..., None], LOG0)


# ---------------------------------------------------------------- performer (FAVOR+)


def orthogonal_features(key: jax.Array, rank: int, dim: int) -> jax.Array:
    """`[rank, dim]` positive-orthogonal random features: orthogonal blocks with chi norms."""
    n_blocks = math.ceil(rank / dim)
    gauss = rand.normal(key, (n_blocks, dim, dim), stream=11)
    qmat, _ = jnp.linalg.qr(gauss)  # batched: one orthogonal block per `dim` features
    w = jnp.swapaxes(qmat, -1, -2).reshape(n_blocks * dim, dim)[:rank]
    norms = jnp.linalg.norm(rand.normal(key, (rank, dim), stream=13), axis=1)
    return w * norms[:, None]


def _log_features(x, w):
    """`[..., r]` float32 log-features `w . x - |x|^2 / 2` of `x [..., D]`: `phi(q) . phi(k) ~= exp(q . k)`."""
    x = x.astype(jnp.float32)
    return jnp.einsum("...d,rd->...r", x, w) - 0.5 * jnp.sum(jnp.square(x), -1, keepdims=True)


def _query_features(q, w):
    """FAVOR+ features of queries `[..., T, D]` with a log scale per row (their largest
    log-feature): `[..., T, r]` float32 and the scale `[..., T]`."""
    logphi = _log_features(q, w)
    stab = jax.lax.stop_gradient(jnp.max(logphi, axis=-1, keepdims=True))
    return jnp.exp(logphi - stab) / math.sqrt(w.shape[0]), stab[..., 0]


def _key_features(k, w, stab, mask=None):
    """FAVOR+ features of keys `[..., S, D]` under their shared log scale `stab` (broadcast to
    `[..., S, r]`): `[..., S, r]` float32, zero at keys where `mask [..., S]` is False (even when
    every key is masked)."""
    logphi = _log_features(k, w)
    if mask is not None:
        logphi = jnp.where(mask[..., None], logphi, LOG0)
    phi = jnp.exp(logphi - stab) / math.sqrt(w.shape[0])
    return phi if mask is None else jnp.where(mask[..., None], phi, 0.0)


# The Performer branch runs over chunks of query (and key) rows: `PERFORMER_ROWS_PER_FEATURE x
# rank` rows each, or more to stay within POOL_MAX_CHUNKS chunks (where chunks must hold whole
# blocks, a multiple of the block dividing the length; elsewhere the last chunk overlaps the one
# before, see `performer_chunk_rows`). A chunk's transient features are `rows x rank` float32; the causal
# backward holds one `[rank, D]` summary gradient per chunk (transient), `2 / PERFORMER_ROWS_PER_FEATURE`
# of a bfloat16 `[T, D]` input.
PERFORMER_ROWS_PER_FEATURE = 4


def performer_chunk_rows(num_rows: int, rank: int, unit: int = 1) -> int:
    """Rows per chunk of the Performer branch. Without a block to respect (`unit` 1): the target,
    the last chunk overlapping the one before where it does not divide `num_rows` (its rows already
    covered are masked, as in the pooled branch). Otherwise (causal, or an exclusion: chunks hold whole
    blocks `unit`): the largest multiple of `unit` that divides `num_rows` and is at most the target."""
    target = max(unit, PERFORMER_ROWS_PER_FEATURE * rank, -(-num_rows // POOL_MAX_CHUNKS))
    if unit == 1:
        return min(num_rows, target)
    n = num_rows // unit
    return unit * max(d for d in range(1, min(n, target // unit) + 1) if n % d == 0)


class _FavorStatic(NamedTuple):
    causal: bool
    chunk: int  # query rows per chunk (causal: key rows too)
    key_chunk: int  # key rows per chunk of the bidirectional summaries
    block: int  # causal: the exact lower triangle's block; exclusion: the selection's block
    scale: float  # q is `[B, T, H, D]` unscaled: multiplied by `scale` chunk by chunk
    group: int  # query heads per key/value head


def _head_major(x, start, size):
    """Rows `start .. start + size - 1` of `x [B, T, H, D]`, head-major: `[B, H, size, D]`."""
    return jnp.swapaxes(jax.lax.dynamic_slice_in_dim(x, start, size, axis=1), 1, 2)


def _add_rows(acc, start, x_BHCD):
    """`acc [B, T, H, D]` with the head-major rows `x [B, H, C, D]` added at `start`."""
    rows = jax.lax.dynamic_slice_in_dim(acc, start, x_BHCD.shape[2], axis=1)
    return jax.lax.dynamic_update_slice_in_dim(acc, rows + jnp.swapaxes(x_BHCD, 1, 2).astype(acc.dtype), start, axis=1)


def _scaled_keys(k):
    return k * k.shape[-1] ** -0.25  # q is already scaled by 1/sqrt(D): the scale split evenly


def _key_summary(w, stab, k_c, v_c, mask_c):
    """`sum_s phi(k_s) v_s^T [B, Hk, r, D]` and `sum_s phi(k_s) [B, Hk, r]` over a chunk of keys
    `k_c, v_c [B, Hk, C, D]` (`mask_c [B, C]` or None)."""
    phk = _key_features(_scaled_keys(k_c), w, stab, None if mask_c is None else mask_c[:, None])
    return jnp.einsum("bhsr,bhsd->bhrd", phk, v_c.astype(jnp.float32)), jnp.sum(phk, 2)


def _key_rows(k, v, kv_mask, start, size):
    """Keys, values `[B, Hk, size, D]` and key mask `[B, size]` (or None) from `start`."""
    mask = None if kv_mask is None else jax.lax.dynamic_slice_in_dim(kv_mask, start, size, axis=1)
    return _head_major(k, start, size), _head_major(v, start, size), mask


def _key_chunk(k, v, kv_mask, j, size):
    """Chunk `j` of `size` keys: `(start, keys, values, mask)` as `_key_rows`, the keys an earlier
    chunk covered masked out, so every key is counted once."""
    B, S = k.shape[:2]
    start = _chunk_start(j, size, S)
    k_c, v_c, mask = _key_rows(k, v, kv_mask, start, size)
    if S % size:
        own = jnp.broadcast_to(start + jnp.arange(size) >= j * size, (B, size))
        mask = own if mask is None else mask & own
    return start, k_c, v_c, mask


def _sum_keys(static, w, stab, k, v, kv_mask, n, init):
    """`init` plus the key summaries of the first `n` chunks of `static.key_chunk` keys (n may be traced)."""
    def body(j, acc):
        s = _key_summary(w, stab, *_key_chunk(k, v, kv_mask, j, static.key_chunk)[1:])
        return acc[0] + s[0], acc[1] + s[1]

    return jax.lax.fori_loop(0, n, body, init)


def _to_query_heads(x, group):
    return jnp.repeat(x, group, axis=1) if group > 1 else x


def _causal_chunk(phq, phk, v, ctx, c):
    """Causal linear attention of a chunk of rows on itself, after the keys summarised in `ctx`
    (`[B, H, r, D]`, `[B, H, r]`): per block of `c`, the prefix state before it plus the exact
    lower triangle inside it (no per-token `r x D` state). Exclusive prefix sums by shifting, not
    `cumsum - own`: that cancels a block's own (partly future) keys mathematically, not bit for bit."""
    B, H, C, r = phk.shape
    qc, kc, vc = (x.reshape(B, H, C // c, c, x.shape[-1]) for x in (phq, phk, v))
    state = jnp.einsum("bhncr,bhncd->bhnrd", kc, vc)
    zs = jnp.sum(kc, 3)
    shift = lambda x: jnp.concatenate([jnp.zeros_like(x[:, :, :1]), jnp.cumsum(x, 2)[:, :, :-1]], 2)  # noqa: E731
    prefix, zprefix = ctx[0][:, :, None] + shift(state), ctx[1][:, :, None] + shift(zs)
    num = jnp.einsum("bhncr,bhnrd->bhncd", qc, prefix)
    den = jnp.einsum("bhncr,bhnr->bhnc", qc, zprefix)
    a = jnp.einsum("bhncr,bhnkr->bhnck", qc, kc) * jnp.tril(jnp.ones((c, c)))
    num = num + jnp.einsum("bhnck,bhnkd->bhncd", a, vc)
    den = den + jnp.sum(a, -1)
    return num.reshape(B, H, C, -1), den.reshape(B, H, C)


def _slot_keys(static, sel, k, v, kv_mask, i):
    """Chunk `i`'s query blocks: their selection slots `(idx, valid, row_start)` `[B, H, nb, K]`, the
    blocks' indices `[nb]`, and the keys, values `[B, H, nb, K, b, D]` and key mask `[B, H, nb, K, b]`
    (or None) of every slot, gathered from the public layout (the same index scatters the gradients)."""
    nb, b = static.chunk // static.block, static.block
    cut = lambda x: None if x is None else jax.lax.dynamic_slice_in_dim(x, i * nb, nb, axis=2)  # noqa: E731
    idx, valid, start = cut(sel.idx), cut(sel.valid), cut(sel.row_start)
    where = _slot_index(idx, b, static.group)
    mask = None if kv_mask is None else kv_mask[where[0], where[1]]
    return (idx, valid, start), jax.lax.dynamic_slice_in_dim(sel.qids, i * nb, nb), k[where], v[where], mask


def _slot_index(idx, b, group):
    """Index of the `[B, S, Hk, D]` rows behind slots `idx [B, H, nb, K]`: batch, key position
    `[B, H, nb, K, b]` and key head."""
    B, H = idx.shape[:2]
    bi = jnp.arange(B)[:, None, None, None, None]
    hi = (jnp.arange(H) // group)[None, :, None, None, None]
    return bi, idx[..., None] * b + jnp.arange(b), hi


def _excluded(phq, w, stab, slots, qids, kg, vg, kmask_g, causal, b):
    """The low-rank estimate of the pairs selection computed exactly (Scatterbrain's exclusion), for
    a chunk of query rows `phq [B, H, C, r]`: `num [B, H, C, D]`, `den [B, H, C]`. Slot by slot, with
    the exact kernel's mask, so the support matches it pair for pair."""
    B, H, C, r = phq.shape
    idx, valid, start = slots
    phq_b = phq.reshape(B, H, C // b, b, r)
    num, den = 0.0, 0.0
    for j in range(idx.shape[-1]):
        m_j = None if kmask_g is None else kmask_g[:, :, :, j]
        phk_j = _key_features(_scaled_keys(kg[:, :, :, j]), w, stab[..., None], m_j)  # [B, H, nb, b, r]
        a = jnp.einsum("bhnqr,bhnkr->bhnqk", phq_b, phk_j)
        mask = _slot_pair_mask(idx[..., j], valid[..., j], m_j, qids, causal, b, None if start is None else start[..., j])
        a = jnp.where(mask, a, 0.0)
        num = num + jnp.einsum("bhnqk,bhnkd->bhnqd", a, vg[:, :, :, j].astype(jnp.float32))
        den = den + jnp.sum(a, -1)
    return num.reshape(B, H, C, -1), den.reshape(B, H, C)


def _slot_pair_mask(idx_j, valid_j, kmask_j, qids, causal, b, start_j):
    """`slot_mask` with the slot's key mask already gathered (`[B, H, nb, b]`)."""
    mask = slot_mask(idx_j, valid_j, None, qids, causal, b, start_j)
    return mask if kmask_j is None else mask & kmask_j[..., None, :]


def _chunk_out(static, w, stab, q_c, ctx, diag, excl):
    """num `[B, H, C, D]`, den `[B, H, C]` and the row log scale `[B, H, C]` of one chunk of query
    rows (`q_c [B, H, C, D]` unscaled): its features against the summaries `ctx` (bidirectional: of
    every key; causal: of the keys before the chunk, plus the chunk's own keys `diag`), less the
    exclusion on the selection's slots `excl` (or None)."""
    q_c = q_c * jnp.asarray(static.scale, q_c.dtype) * q_c.shape[-1] ** 0.25
    phq, sq = _query_features(q_c, w)
    ctx = tuple(_to_query_heads(x, static.group) for x in ctx)
    stab_h = stab if stab.shape[1] == 1 else _to_query_heads(stab, static.group)
    if static.causal:
        k_c, v_c, mask_c = diag
        phk = _key_features(_scaled_keys(k_c), w, stab, None if mask_c is None else mask_c[:, None])
        phk, v_c = _to_query_heads(phk, static.group), _to_query_heads(v_c.astype(jnp.float32), static.group)
        num, den = _causal_chunk(phq, phk, v_c, ctx, static.block)
    else:
        num = jnp.einsum("bhtr,bhrd->bhtd", phq, ctx[0])
        den = jnp.einsum("bhtr,bhr->bht", phq, ctx[1])
    if excl is not None:
        slots, qids, kg, vg, kmask_g = excl
        num_x, den_x = _excluded(phq, w, stab_h, slots, qids, kg, vg, kmask_g, static.causal, static.block)
        num, den = num - num_x, den - den_x
    return num, den, sq


def _chunk_inputs(static, q, k, v, kv_mask, q_pos, sel, i):
    """What chunk `i` of query rows reads: its queries `[B, H, C, D]`, its own keys (causal) and
    its slots' keys (exclusion)."""
    C = static.chunk
    diag = _key_rows(k, v, kv_mask, q_pos[0] + i * C, C) if static.causal else None
    excl = None if sel is None else _slot_keys(static, sel, k, v, kv_mask, i)
    return _head_major(q, _chunk_start(i, C, q.shape[1]), C), diag, excl


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _favor_attention(static: _FavorStatic, q, k, v, w, stab, kv_mask, q_pos, sel):
    """FAVOR+ linear attention of `q [B, T, H, D]` (unscaled) over `k, v [B, S, Hk, D]` under the
    key log scale `stab [B|1, Hk|1, 1, 1]`, less the exclusion on `sel`'s slots (or None): num
    `[B, H, T, D]` float32, den and the row log scale `[B, H, T]` (no gradient flows through it).

    Over chunks of query rows (bidirectional: after one pass over chunks of keys for the summaries
    `sum phi(k) v^T`, `sum phi(k)`; causal: the summaries carried from chunk to chunk, queries
    contiguous from `q_pos[0]`, a multiple of the chunk, as attend passes them). The backward pass keeps the inputs and the `[r, D]` summaries
    and recomputes every feature chunk by chunk (causal: the summaries too, in the forward
    order), so nothing of size `T x r` outlives a chunk."""
    return _favor_attention_fwd(static, q, k, v, w, stab, kv_mask, q_pos, sel)[0]


def _favor_attention_fwd(static, q, k, v, w, stab, kv_mask, q_pos, sel):
    B, T, H, D = q.shape
    Hk, C = k.shape[2], static.chunk
    n = -(-T // C)  # the last chunk overlaps the one before where C does not divide T (no block, no exclusion)
    zeros = (jnp.zeros((B, Hk, w.shape[0], v.shape[-1]), jnp.float32), jnp.zeros((B, Hk, w.shape[0]), jnp.float32))
    if static.causal:  # the keys before the first chunk (decoding: the whole cache before the block)
        ctx = _sum_keys(static._replace(key_chunk=C), w, stab, k, v, kv_mask, q_pos[0] // C, zeros)
    else:
        ctx = _sum_keys(static, w, stab, k, v, kv_mask, -(-k.shape[1] // static.key_chunk), zeros)

    def body(i, carry):
        num, den, sq, ctx = carry
        q_c, diag, excl = _chunk_inputs(static, q, k, v, kv_mask, q_pos, sel, i)
        num_c, den_c, sq_c = _chunk_out(static, w, stab, q_c, ctx, diag, excl)
        # rows an earlier chunk covered are written again with the same values (rows are independent)
        put = lambda x, x_c: jax.lax.dynamic_update_slice_in_dim(x, x_c, _chunk_start(i, C, T), axis=2)  # noqa: E731
        return put(num, num_c), put(den, den_c), put(sq, sq_c), _absorb(static, w, stab, ctx, diag)

    init = (jnp.zeros((B, H, T, v.shape[-1]), jnp.float32), jnp.zeros((B, H, T), jnp.float32),
            jnp.zeros((B, H, T), jnp.float32), ctx)
    num, den, sq, _ = jax.lax.fori_loop(0, n, body, init)
    return (num, den, sq), (q, k, v, w, stab, kv_mask, q_pos, sel, ctx)


def _absorb(static, w, stab, ctx, diag):
    """Causal: the summaries the next chunk sees, `ctx` plus this chunk's own keys `diag`."""
    if not static.causal:
        return ctx
    s = _key_summary(w, stab, *diag)
    return ctx[0] + s[0], ctx[1] + s[1]


def _favor_attention_bwd(static, res, cts):
    q, k, v, w, stab, kv_mask, q_pos, sel, ctx = res
    d_num, d_den = cts[0].astype(jnp.float32), cts[1].astype(jnp.float32)  # the row scale has no gradient
    T, C = q.shape[1], static.chunk
    n, b = -(-T // C), static.block

    def chunk_vjp(i, ctx_i, acc):
        """Chunk i's share of dq, dk, dv (its slots' keys and, causal, its own keys) and of the
        summaries' gradient."""
        dq, dk, dv = acc
        q_c, diag, excl = _chunk_inputs(static, q, k, v, kv_mask, q_pos, sel, i)
        kg, vg = (None, None) if excl is None else excl[2:4]
        dkv = (None, None) if diag is None else diag[:2]

        def f(q_c, kg, vg, dkv, ctx_i):
            e = None if excl is None else excl[:2] + (kg, vg) + excl[4:]
            d = None if diag is None else dkv + diag[2:]
            return _chunk_out(static, w, stab, q_c, ctx_i, d, e)[:2]

        start = _chunk_start(i, C, T)

        def take(x):  # the chunk's cotangent rows; zero on rows an earlier chunk covered (counted there)
            x_c = jax.lax.dynamic_slice_in_dim(x, start, C, axis=2)
            fresh = (start + jnp.arange(C) >= i * C).reshape((C,) + (1,) * (x_c.ndim - 3))
            return x_c if T % C == 0 else jnp.where(fresh, x_c, 0.0)

        _, vjp = jax.vjp(f, q_c, kg, vg, dkv, ctx_i)
        dq_c, dkg, dvg, ddiag, dctx = vjp((take(d_num), take(d_den)))
        dq = _add_rows(dq, start, dq_c)
        if excl is not None:
            where = _slot_index(excl[0][0], b, static.group)
            dk, dv = dk.at[where].add(dkg.astype(dk.dtype)), dv.at[where].add(dvg.astype(dv.dtype))
        return (dq, dk, dv), ddiag, dctx

    def summary_vjp(start, k_c, v_c, mask_c, dctx, acc):
        """The keys `k_c, v_c` from `start` enter the summaries whose gradient is `dctx`."""
        dk, dv = acc
        _, vjp = jax.vjp(lambda k_c, v_c: _key_summary(w, stab, k_c, v_c, mask_c), k_c, v_c)
        dk_c, dv_c = vjp(dctx)
        return _add_rows(dk, start, dk_c), _add_rows(dv, start, dv_c)

    acc = tuple(jnp.zeros(x.shape, jnp.float32) for x in (q, k, v))
    if static.causal:
        def body(i, carry):  # the summaries recomputed chunk by chunk as the forward pass made them
            acc, ctx_i, dpre = carry
            acc, (dk_d, dv_d), dctx = chunk_vjp(i, ctx_i, acc)
            start = q_pos[0] + i * C
            acc = (acc[0], _add_rows(acc[1], start, dk_d), _add_rows(acc[2], start, dv_d))
            dpre = tuple(jax.lax.dynamic_update_index_in_dim(a, x, i, 0) for a, x in zip(dpre, dctx))
            return acc, _absorb(static, w, stab, ctx_i, _key_rows(k, v, kv_mask, start, C)), dpre

        dpre = tuple(jnp.zeros((n,) + x.shape, jnp.float32) for x in ctx)  # each chunk's summaries' gradient
        acc, _, dpre = jax.lax.fori_loop(0, n, body, (acc, ctx, dpre))
        later = tuple(jnp.cumsum(x[::-1], 0)[::-1] for x in dpre)  # [i]: from chunks i, i + 1, ...
        # chunk i's keys enter the summaries of the chunks after it; the last chunk's, none
        dk, dv = jax.lax.fori_loop(0, n - 1, lambda i, kv: summary_vjp(
            q_pos[0] + i * C, *_key_rows(k, v, kv_mask, q_pos[0] + i * C, C), tuple(x[i + 1] for x in later), kv),
            acc[1:])
        acc, dctx = (acc[0], dk, dv), tuple(x[0] for x in later)
        # the keys before the first chunk (decoding), in chunks of C ending at q_pos[0]
        n_keys, key_chunk = q_pos[0] // C, (lambda j: (j * C,) + _key_rows(k, v, kv_mask, j * C, C))
    else:
        def body(i, carry):
            acc, dsum = carry
            acc, _, dctx = chunk_vjp(i, ctx, acc)
            return acc, tuple(a + d for a, d in zip(dsum, dctx))

        acc, dctx = jax.lax.fori_loop(0, n, body, (acc, tuple(jnp.zeros(x.shape, jnp.float32) for x in ctx)))
        # every key, in the forward pass's chunks
        n_keys, key_chunk = -(-k.shape[1] // static.key_chunk), (lambda j: _key_chunk(k, v, kv_mask, j, static.key_chunk))
    # the keys every chunk summarised (bidirectional: all; causal: those before the first chunk)
    dk, dv = jax.lax.fori_loop(0, n_keys, lambda j, kv: summary_vjp(*key_chunk(j), dctx, kv), acc[1:])
    return acc[0].astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None, None


_favor_attention.defvjp(_favor_attention_fwd, _favor_attention_bwd)


def _key_log_scale(static, w, k, kv_mask):
    """The keys' shared log scale `[B|1, Hk|1, 1, 1]`. Bidirectional: their largest log-feature
    (one pass over chunks of keys). Causal: the bound `max_r |w_r|^2 / 2` of any log-feature
    (`w.x - |x|^2/2 <= |w|^2/2`), which depends on no key, so no output depends on a later key even
    through rounding (a shared maximum over all keys cancels mathematically but not bit for bit)."""
    if static.causal:
        return jnp.full((1, 1, 1, 1), 0.5 * jnp.max(jnp.sum(jnp.square(w), -1)), jnp.float32)

    def body(j, m):
        _, k_c, _, mask_c = _key_chunk(k, k, kv_mask, j, static.key_chunk)
        logphi = _log_features(_scaled_keys(k_c), w)
        if mask_c is not None:
            logphi = jnp.where(mask_c[:, None, :, None], logphi, LOG0)
        return jnp.maximum(m, jnp.max(logphi, axis=(-2, -1), keepdims=True))

    B, S, Hk, _ = k.shape
    m = jax.lax.fori_loop(0, -(-S // static.key_chunk), body, jnp.full((B, Hk, 1, 1), LOG0, jnp.float32))
    return jax.lax.stop_gradient(m)


@COMPRESSIONS.register("performer", supports_exclusion=True)
def performer(q, k, v, kv_mask, *, q_pos, causal, config, params, rng, sel, public: Public | None = None):
    """FAVOR+ positive orthogonal random features; causal through prefix sums over blocks.

    Computed over chunks of rows with its own VJP (`_favor_attention`): its backward pass keeps
    q, k, v and the `[rank, D]` summaries, not the `T x rank` features. With `public` (what `attend`
    passes) it reads q, k, v in the caller's layout, so what it keeps is the caller's arrays."""
    public = Public.of(public, q, k, v)
    T, H, D = public.q.shape[1:]
    S, Hk = public.k.shape[1:3]
    b = config.selection.block_size
    w = orthogonal_features(rng, config.compression.rank, D)
    unit = b if (causal or sel is not None) else 1
    chunk = performer_chunk_rows(T, w.shape[0], unit)
    key_chunk = chunk if causal else performer_chunk_rows(S, w.shape[0])
    static = _FavorStatic(causal, chunk, key_chunk, b, float(public.scale), H // Hk)
    stab = _key_log_scale(static, w, public.k, kv_mask)
    num, den, sq = _favor_attention(static, public.q, public.k, public.v, w, stab, kv_mask, q_pos, sel)
    sk = (stab if stab.shape[1] == 1 else _to_query_heads(stab, H // Hk))[..., 0]  # [B|1, H|1, 1]
    return Branch(num, den, sq + sk), dict(w=w, k=public.k, k_scale=sk, group=H // Hk)


def _performer_rows(state, q_rows, t_rows, excluded, *, causal, kv_mask, start, size):
    phq, sq = _query_features(q_rows * q_rows.shape[-1] ** 0.25, state["w"])
    k_c = _to_query_heads(_head_major(state["k"], start, size), state["group"])
    phk = _key_features(_scaled_keys(k_c), state["w"], state["k_scale"][..., None], None if kv_mask is None else kv_mask[:, None])
    # absolute log weight = log(phq . phk) + row scale + key scale; the key scale is shared
    return _lowrank_rows(phq, sq + state["k_scale"], phk, t_rows, excluded, causal=causal, kv_mask=kv_mask, start=start)


COMPRESSIONS.add_extra("performer", "row_logw", _performer_rows)
COMPRESSIONS.add_extra("performer", "public_layout", True)


# ---------------------------------------------------------------- nystrom


def _segment_means(x, L, mask=None):
    B, H, S, D = x.shape
    xs = x.reshape(B, H, L, S // L, D).astype(jnp.float32)
    if mask is None:
        return jnp.mean(xs, 3)
    w = mask.reshape(B, 1, L, S // L, 1).astype(jnp.float32)
    return jnp.sum(xs * w, 3) / jnp.maximum(jnp.sum(w, 3), 1.0)


def iterative_pinv(a: jax.Array, iters: int) -> jax.Array:
    """Newton-Schulz pseudo-inverse (Nystromformer's iteration) of `[..., L, L]` matrices."""
    abs_a = jnp.abs(a)
    scale = jnp.max(jnp.sum(abs_a, -2), -1) * jnp.max(jnp.sum(abs_a, -1), -1)
    z = jnp.swapaxes(a, -1, -2) / scale[..., None, None]
    eye = jnp.eye(a.shape[-1], dtype=a.dtype)
    for _ in range(iters):
        az = a @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


@COMPRESSIONS.register("nystrom", supports_causal=False, supports_exclusion=True)
def nystrom(q, k, v, kv_mask, *, q_pos, causal, config, params, rng, sel):
    """Nystrom approximation of the kernel `exp(q . k)` through segment-mean landmarks:
    `exp(Q K~^T) pinv(exp(Q~ K~^T)) exp(Q~ K^T)`, kept in log-scaled factors so that it
    merges with exact branches. Bidirectional only."""
    L = config.compression.rank
    q_land = _segment_means(q, L)
    k_land = _segment_means(k, L, kv_mask)
    f = jnp.einsum("bhtd,bhld->bhtl", q.astype(jnp.float32), k_land)
    a = jax.lax.stop_gradient(jnp.max(f, -1))
    w = jnp.einsum("bhld,bhmd->bhlm", q_land, k_land)
    g = jnp.einsum("bhld,bhsd->bhls", q_land, k.astype(jnp.float32))
    if kv_mask is not None:
        g = jnp.where(kv_mask[:, None, None, :], g, LOG0)
    c = jax.lax.stop_gradient(jnp.max(g, -1))
    r = jax.lax.stop_gradient(jnp.max(w, -1))
    w_exp = jnp.exp(w - r[..., None])
    z = jnp.sum(w_exp, -1)
    pinv = iterative_pinv(w_exp / z[..., None], config.compression.pinv_iters)
    phq = jnp.einsum("bhtl,bhlm->bhtm", jnp.exp(f - a[..., None]), pinv) * (jnp.exp(c - r) / z)[:, :, None, :]
    phk = jnp.swapaxes(jnp.exp(g - c[..., None]), -1, -2)  # [B, H, S, L]
    num = jnp.einsum("bhtl,bhld->bhtd", phq, jnp.einsum("bhsl,bhsd->bhld", phk, v.astype(jnp.float32)))
    den = jnp.einsum("bhtl,bhl->bht", phq, jnp.sum(phk, 2))
    if sel is not None:
        num_x, den_x = _subtract_on_support(phq, phk, v, kv_mask, sel, causal)
        num, den = num - num_x, den - den_x
    state = dict(k_land=k_land, pinv=pinv, scale=jnp.exp(c - r) / z, phk=phk)
    return Branch(num, den, a), state


def _nystrom_rows(state, q_rows, t_rows, excluded, *, causal, kv_mask, start, size):
    f = jnp.einsum("bhrd,bhld->bhrl", q_rows.astype(jnp.float32), state["k_land"])
    a = jax.lax.stop_gradient(jnp.max(f, -1))
    phq = jnp.einsum("bhrl,bhlm->bhrm", jnp.exp(f - a[..., None]), state["pinv"]) * state["scale"][:, :, None, :]
    phk = jax.lax.dynamic_slice_in_dim(state["phk"], start, size, axis=2)
    return _lowrank_rows(phq, a, phk, t_rows, excluded, causal=causal, kv_mask=kv_mask, start=start)


COMPRESSIONS.add_extra("nystrom", "row_logw", _nystrom_rows)


# ---------------------------------------------------------------- linformer


@COMPRESSIONS.register("linformer", supports_causal=False, fixed_length=True)
def linformer(q, k, v, kv_mask, *, q_pos, causal, config, params, rng, sel):
    """Learned projections along the length (`E`, `F`: `[max_len, rank]`), then exact
    attention over the `rank` projected keys and values. Bidirectional, fixed maximum length."""
    S = k.shape[2]
    e, f = params["linformer_e"][:S], params["linformer_f"][:S]
    if kv_mask is not None:
        keep = kv_mask[:, None, :, None].astype(k.dtype)
        k, v = k * keep, v * keep
    k_proj = jnp.einsum("bhsd,sr->bhrd", k, e.astype(k.dtype))
    v_proj = jnp.einsum("bhsd,sr->bhrd", v, f.astype(v.dtype))
    s = jnp.einsum("bhtd,bhrd->bhtr", q, k_proj, preferred_element_type=jnp.float32)
    out, lse = masked_softmax(s, None, v_proj, "bhtr,bhrd->bhtd")
    return Branch.from_softmax(out, lse), dict(k_proj=k_proj, f=f)


def _linformer_rows(state, q_rows, t_rows, excluded, *, causal, kv_mask, start, size):
    # effective weight on value s: sum_r softmax_r * F[s, r] (clipped at 0: it can be negative)
    s = jnp.einsum("bhrd,bhpd->bhrp", q_rows, state["k_proj"], preferred_element_type=jnp.float32)
    lse = jax.nn.logsumexp(s, -1, keepdims=True)
    f = jax.lax.dynamic_slice_in_dim(state["f"], start, size, axis=0)
    eff = jnp.einsum("bhrp,sp->bhrs", jnp.exp(s - lse), f.astype(jnp.float32))
    keys = _row_key_mask(t_rows, start + jnp.arange(size), causal=False, kv_mask=kv_mask)
    return jnp.where(keys & (eff > TINY), jnp.log(jnp.maximum(eff, TINY)) + lse, LOG0)


def _linformer_init(config, key, *, num_heads, head_dim, max_len):
    ke, kf = jax.random.split(key)
    shape, std = (max_len, config.compression.rank), 1.0 / math.sqrt(max_len)
    return {
        "linformer_e": jax.random.normal(ke, shape) * std,
        "linformer_f": jax.random.normal(kf, shape) * std,
    }


COMPRESSIONS.add_extra("linformer", "row_logw", _linformer_rows)
COMPRESSIONS.add_extra("linformer", "init", _linformer_init)
