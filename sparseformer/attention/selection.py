"""Selection: which key blocks each query block computes exactly.

For every query block a static budget of key blocks is chosen (XLA needs static shapes):
the window around it, the global blocks, random blocks, and the top-k blocks of an
importance estimate. The chosen blocks are attended exactly by a block-sparse kernel that
never forms a `T x S` tensor: a `lax.scan` over the chosen slots with an online softmax,
whose custom VJP stores only the output and its log-sum-exp and re-gathers blocks in the
backward pass (flash-attention style), so memory grows like `T * D`, not `T * K * b`.

Shapes: `B` batch, `H` heads, `n` query blocks, `m` key blocks, `b` block size, `D` head
dim, `K` slots (chosen blocks) per query block.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections

from sparseformer.attention import rand
from sparseformer.attention import dense as _dense
from sparseformer.attention.dense import LOG0
from sparseformer.attention.registry import ESTIMATORS

NEG_INF = -jnp.inf


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["idx", "valid", "qids", "row_start"],
    meta_fields=["block_size", "num_key_blocks", "group"],
)
@dataclasses.dataclass(frozen=True)
class Selection:
    """The chosen key blocks of each query block: the contract between choosing and computing.

    Every exact kernel (`masked`, `scan`, `pallas`) consumes exactly this. With grouped-query
    attention the query heads of one key/value head share their choice (`group` heads in a row
    hold equal `idx`, `valid` and `row_start`), so a fused kernel loads a key block once for the
    whole group. A pytree: it passes through `jax.jit` and `lax` control flow.
    """

    idx: jax.Array  # [B, H, n, K] int32 key-block index per slot
    valid: jax.Array  # [B, H, n, K] bool: slot holds a real, distinct block
    qids: jax.Array  # [n] int32: the index of each query block
    block_size: int
    num_key_blocks: int
    # [B, H, n, K] int32 or None: slot j of a query block is used only by its rows r >= row_start
    # (offset inside the block); None means every row. The one per-row freedom the kernels support.
    row_start: jax.Array | None = None
    group: int = 1  # query heads per key/value head sharing one choice

    def block_mask(self) -> jax.Array:
        """`[B, H, n, m]` bool: key block chosen for (some row of) the query block."""
        return slots_to_blocks(self.idx, self.valid, self.num_key_blocks)

    def rows_block_mask(self, rows: jax.Array) -> jax.Array:
        """`[B, H, R, m]` bool: the key blocks computed exactly for each of `rows` (`[R]` offsets
        into the selection's query rows, i.e. `block * block_size + row in block`)."""
        b = self.block_size
        blk = rows // b
        if self.row_start is None:  # rows of a block share its blocks: no per-row scatter
            return self.block_mask()[:, :, blk]
        use = self.valid[:, :, blk]
        if self.row_start is not None:
            use = use & ((rows % b)[:, None] >= self.row_start[:, :, blk])
        return slots_to_blocks(self.idx[:, :, blk], use, self.num_key_blocks)


def slots_to_blocks(idx: jax.Array, use: jax.Array, m: int) -> jax.Array:
    """`[..., K]` slots -> `[..., m]` bool block mask, by a scatter (no `K x m` one-hot)."""
    lead, K = idx.shape[:-1], idx.shape[-1]
    flat_idx, flat_use = idx.reshape(-1, K), use.reshape(-1, K)
    rows = jnp.arange(flat_idx.shape[0])[:, None]
    hit = jnp.zeros((flat_idx.shape[0], m), jnp.int8).at[rows, flat_idx].max(flat_use.astype(jnp.int8))
    return hit.reshape(lead + (m,)) > 0


def to_blocks(x: jax.Array, b: int) -> jax.Array:
    """`[B, H, T, ...]` -> `[B, H, T // b, b, ...]`."""
    return x.reshape(x.shape[:2] + (x.shape[2] // b, b) + x.shape[3:])


def _batch_head_index(B: int, H: int) -> tuple[jax.Array, jax.Array]:
    return jnp.arange(B)[:, None, None], jnp.arange(H)[None, :, None]


# ---------------------------------------------------------------- importance estimators
# Each takes query blocks `[B, H, n, r, D]` (already scaled; causal calls pass only queries that
# every row of the block may see: `causal_queries`), key blocks
# `[B, H, m, b, D]`, the key mask in blocks `[B, m, b]` (or None), the allowed block pairs
# `[n, m]`, and keywords `cfg` (model.attention.selection), `rng` and `qids` (`[n]`, the index
# of each query block, for draws that must not depend on which blocks share a call), and
# returns scores `[B, H, n, m]` (higher = more important). Scores are row-local: query block i's
# scores depend only on its own inputs, so `choose_blocks` may score the blocks in chunks
# (bounded memory). The extra `rows_scored(cfg) -> int` (default 1) says how many rows of S
# scores one query block needs, which sizes the chunks; `block_summaries` (True) that each row
# holds one score per key block (`m`), not per key. Gradients never flow through them: the
# choice is discrete.


def _masked(kb: jax.Array, kmask_b: jax.Array | None, fill: float) -> jax.Array:
    if kmask_b is None:
        return kb
    return jnp.where(kmask_b[:, None, :, :, None], kb, fill)


@ESTIMATORS.register("pooled", exact_when_full=True)
def pooled_estimator(qb, kb, kmask_b, allowed, *, cfg, rng, qids):
    """Mean query of the block against the mean key of each block: cheap, but a single
    strong key is averaged away among the other keys of its block."""
    q_mean = jnp.mean(qb, axis=3)
    if kmask_b is None:
        k_mean = jnp.mean(kb, axis=3)
    else:
        w = kmask_b[:, None, :, :, None].astype(kb.dtype)
        k_mean = jnp.sum(kb * w, axis=3) / jnp.maximum(jnp.sum(w, axis=3), 1.0)
    return jnp.einsum("bhnd,bhmd->bhnm", q_mean, k_mean, preferred_element_type=jnp.float32)


# pooled scores one mean query against one mean key a block: `m` scores a query block, not `S`
ESTIMATORS.add_extra("pooled", "block_summaries", True)


@ESTIMATORS.register("bound", exact_when_full=True)
def bound_estimator(qb, kb, kmask_b, allowed, *, cfg, rng, qids):
    """Upper bound of any key's score in a block, maximised over the queries of the block.

    Per key block, the elementwise min and max of its keys bound every key's score:
    `q . k <= sum_d max(q_d * min_d, q_d * max_d) = q+ . max + q- . min`. A block holding one
    strong key gets a high bound, so it is not missed (unlike `pooled`). Two matmuls.
    """
    big = jnp.asarray(1e9, kb.dtype) if kb.dtype == jnp.float32 else jnp.asarray(1e4, kb.dtype)
    k_max = jnp.max(_masked(kb, kmask_b, -big), axis=3)  # [B, H, m, D]
    k_min = jnp.min(_masked(kb, kmask_b, big), axis=3)
    q_pos, q_neg = jnp.maximum(qb, 0), jnp.minimum(qb, 0)
    upper = jnp.einsum("bhnqd,bhmd->bhnqm", q_pos, k_max, preferred_element_type=jnp.float32)
    upper += jnp.einsum("bhnqd,bhmd->bhnqm", q_neg, k_min, preferred_element_type=jnp.float32)
    return jnp.max(upper, axis=3)


@ESTIMATORS.register("maxkey", exact_when_full=True)
def maxkey_estimator(qb, kb, kmask_b, allowed, *, cfg, rng, qids):
    """The score of each block's best key for the query block's mean query.

    Exact per key, so a lone strong key is neither averaged away (as in `pooled`) nor drowned
    by a loose bound (`bound` is safe, but per-dimension extremes of 64 random keys in 64
    dimensions make every block look alike). One matmul of the `n` mean queries with all keys.
    """
    q_mean = jnp.mean(qb, axis=3)  # [B, H, n, D]
    s = jnp.einsum("bhnd,bhmkd->bhnmk", q_mean, kb, preferred_element_type=jnp.float32)
    if kmask_b is not None:  # a padded key is never a block's best key
        s = jnp.where(kmask_b[:, None, None], s, LOG0)
    return jnp.max(s, axis=-1)


@ESTIMATORS.register("lsekey", exact_when_full=True)
def lsekey_estimator(qb, kb, kmask_b, allowed, *, cfg, rng, qids):
    """The attention mass of each block for the query block's mean query: the log-sum-exp of its
    scores against the block's keys.

    The same matmul as `maxkey`, reduced by log-sum-exp instead of max: a block holding one
    strong key scores about that key's logit (as in `maxkey`), and a block holding many fairly
    good keys (a recurring topic) scores their summed mass, which `maxkey` ignores.
    """
    q_mean = jnp.mean(qb, axis=3)  # [B, H, n, D]
    s = jnp.einsum("bhnd,bhmkd->bhnmk", q_mean, kb, preferred_element_type=jnp.float32)
    if kmask_b is not None:
        s = jnp.where(kmask_b[:, None, None], s, LOG0)
    return jax.nn.logsumexp(s, axis=-1)


def _block_mass(s_BHnrS: jax.Array, kmask_b, allowed, m: int) -> jax.Array:
    """log attention mass per key block, summed over the sampled rows: `[B, H, n, m]`."""
    B, H, n, r, S = s_BHnrS.shape
    b = S // m
    mask = jnp.repeat(allowed, b, axis=-1)[None, None, :, None, :]  # future keys never count
    if kmask_b is not None:
        mask = mask & kmask_b.reshape(B, 1, 1, 1, S)
    s = jnp.where(mask, s_BHnrS, LOG0)
    logp = s - jax.nn.logsumexp(s, axis=-1, keepdims=True)
    return jax.nn.logsumexp(logp.reshape(B, H, n, r, m, b), axis=(3, 5))


@ESTIMATORS.register("sampled", exact_when_full=True)
def sampled_estimator(qb, kb, kmask_b, allowed, *, cfg, rng, qids):
    """Exact scores of a few query rows per block against every key, reduced to the
    attention mass of each key block: a random estimate of the block's mass."""
    B, H, n, b, D = qb.shape
    r = min(cfg.sample_rows, b)
    width = b // r
    if rng is None:
        rows = jnp.broadcast_to((jnp.arange(r) * width)[None, :], (n, r))
    else:  # one draw per stratum, indexed by the query block (the same in any chunking)
        u = rand.uniform_at(rng, qids[:, None] * r + jnp.arange(r)[None, :], stream=3)
        rows = jnp.arange(r) * width + jnp.minimum((u * width).astype(jnp.int32), width - 1)
    q_rows = jnp.take_along_axis(qb, rows[None, None, :, :, None], axis=3)  # [B, H, n, r, D]
    k = kb.reshape(B, H, -1, D)
    s = jnp.einsum("bhnrd,bhsd->bhnrs", q_rows, k, preferred_element_type=jnp.float32)
    return _block_mass(s, kmask_b, allowed, kb.shape[2])


ESTIMATORS.add_extra("sampled", "rows_scored", lambda cfg: min(cfg.sample_rows, cfg.block_size))


@ESTIMATORS.register("oracle", exact_when_full=True)
def oracle_estimator(qb, kb, kmask_b, allowed, *, cfg, rng, qids):
    """The exact attention mass of each block (quadratic: for analysis, and as the upper
    bound of what any estimator can reach)."""
    B, H, n, b, D = qb.shape
    k = kb.reshape(B, H, -1, D)
    s = jnp.einsum("bhnqd,bhsd->bhnqs", qb, k, preferred_element_type=jnp.float32)
    return _block_mass(s, kmask_b, allowed, kb.shape[2])


ESTIMATORS.add_extra("oracle", "rows_scored", lambda cfg: cfg.block_size)


# ---------------------------------------------------------------- choosing the blocks


def _static_slots(qids: jax.Array, m: int, cfg: ml_collections.ConfigDict, causal: bool):
    """Window and global blocks for each query block: `idx, valid` of shape `[n, K0]`."""
    w, g = cfg.window, cfg.global_blocks
    if w >= m - 1:  # the window alone covers every block: one slot per key block
        idx = jnp.broadcast_to(jnp.arange(m)[None, :], (qids.shape[0], m))
        valid = idx <= qids[:, None] if causal else jnp.ones_like(idx, dtype=bool)
        return idx.astype(jnp.int32), valid
    if causal:
        w_idx = qids[:, None] + jnp.arange(-w, 1)[None, :]
        w_valid = w_idx >= 0
    else:  # at the edges the window slides inwards, so every query block computes 2w + 1 blocks
        start = jnp.clip(qids - w, 0, m - (2 * w + 1))
        w_idx = start[:, None] + jnp.arange(2 * w + 1)[None, :]
        w_valid = jnp.ones(w_idx.shape, bool)
    g_idx = jnp.broadcast_to(jnp.arange(g)[None, :], (qids.shape[0], g))
    in_window = (g_idx >= w_idx[:, :1]) & (g_idx <= w_idx[:, -1:])
    g_valid = ~in_window & ((g_idx <= qids[:, None]) if causal else True)
    idx = jnp.concatenate([jnp.clip(w_idx, 0, m - 1), g_idx], axis=1).astype(jnp.int32)
    return idx, jnp.concatenate([w_valid, g_valid], axis=1)


def anchor_scores(est, q_est, kb, kmask_b, allowed, *, cfg, rng, qids) -> jax.Array:
    """Scores `[B, H, n, m]` of estimator `est` with `cfg.anchors` query sub-blocks per block.

    Each query block's rows are cut into `anchors` equal sub-blocks, each scored as a block of
    its own; a key block's score is the best over the sub-blocks. A query block that holds
    two groups of queries wanting different keys then ranks what each group wants, where one
    mean query of the whole block would blur them. Row-local: query block i's scores depend
    only on its own rows.
    """
    p = min(cfg.anchors, q_est.shape[3])
    if p == 1:
        return est(q_est, kb, kmask_b, allowed, cfg=cfg, rng=rng, qids=qids)
    return jnp.max(sub_block_scores(est, q_est, p, kb, kmask_b, allowed, cfg=cfg, rng=rng, qids=qids), axis=3)


def sub_block_scores(est, q_est, p, kb, kmask_b, allowed, *, cfg, rng, qids) -> jax.Array:
    """Scores `[B, H, n, p, m]`: each query block's `r` rows cut into `p` equal sub-blocks, each
    scored by `est` as a query block of its own (same `allowed` and `qids` as its block)."""
    B, H, n, r, D = q_est.shape
    q_sub = q_est.reshape(B, H, n * p, r // p, D)
    scores = est(q_sub, kb, kmask_b, jnp.repeat(allowed, p, axis=0), cfg=cfg, rng=rng, qids=jnp.repeat(qids, p))
    return scores.reshape(B, H, n, p, -1)


def _top(scores: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    vals, idx = jax.lax.top_k(scores, k)
    return idx.astype(jnp.int32), vals > NEG_INF


# Transient scores of one chunk of query blocks: at most this many per (batch, head). The
# estimators hold `rows_scored x S` scores per query block, which would grow like `T x S / b` if
# all blocks were scored at once (1 GB at 64K tokens for `maxkey`, 4 heads, float32). (With the
# `pallas` kernel, `maxkey` and `lsekey` are a fused kernel that holds none: `pallas_estimate`.)
ESTIMATE_CHUNK_ELEMENTS = 1 << 20
# Query blocks chosen together (`_take_by_mass`, random draws): at most this many `[m]` score rows
# of their anchors per (batch, head). The choice is a few dozen small ops: scoring and choosing
# in one loop over small estimate chunks made a GPU launch them for every chunk (thousands of
# kernels at 64K tokens), so the choice takes chunks of its own, `b` times larger.
CHOICE_CHUNK_ELEMENTS = 1 << 20


def estimate_chunk(cfg: ml_collections.ConfigDict, num_query_blocks: int, kv_len: int) -> int:
    """Query blocks scored together: as many as keep one chunk's scores within budget."""
    extras = ESTIMATORS.get(cfg.estimator).extras if cfg.top_k else {}
    rows = min(cfg.block_size, extras.get("rows_scored", lambda c: 1)(cfg) * cfg.anchors)  # anchors: blocks of their own
    # scores one query block holds: `rows` rows of S (one of `m` for an estimator of block summaries)
    held = rows * (kv_len // cfg.block_size if extras.get("block_summaries") else kv_len)
    return max(1, min(num_query_blocks, ESTIMATE_CHUNK_ELEMENTS // max(1, held)))


def choice_chunk(cfg: ml_collections.ConfigDict, num_query_blocks: int, num_key_blocks: int, causal: bool) -> int:
    """Query blocks chosen together: as many as keep their anchors' `[m]` score rows within
    `CHOICE_CHUNK_ELEMENTS` (causal anchors are kept apart; bidirectional ones are reduced first)."""
    rows = causal_anchor_rows(cfg, cfg.block_size) if causal and cfg.top_k else None
    per_block = num_key_blocks * (len(rows) if rows else 1)
    return max(1, min(num_query_blocks, CHOICE_CHUNK_ELEMENTS // per_block))


def map_chunks(fn, chunk: int, n: int, blocked: tuple, axes: tuple[int, ...], shared: tuple = ()):
    """`fn(*chunk_of_blocked, *shared)` over chunks of `chunk` blocks along `axes` (one per
    `blocked` array); every output has its block axis at 2 and is concatenated back there. One
    call when `chunk >= n`; else a `lax.map` over equal chunks (n padded by repeating the last
    block, the padding dropped)."""
    if chunk >= n:
        return fn(*blocked, *shared)
    n_pad = -(-n // chunk) * chunk

    def split(x, axis):
        if n_pad > n:
            edge = jax.lax.slice_in_dim(x, n - 1, n, axis=axis)
            x = jnp.concatenate([x, jnp.repeat(edge, n_pad - n, axis=axis)], axis=axis)
        x = x.reshape(x.shape[:axis] + (n_pad // chunk, chunk) + x.shape[axis + 1:])
        return jnp.moveaxis(x, axis, 0)

    outs = jax.lax.map(lambda xs: fn(*xs, *shared), tuple(split(x, a) for x, a in zip(blocked, axes)))

    def join(y):
        y = jnp.moveaxis(y, 0, 2)
        return y.reshape(y.shape[:2] + (n_pad,) + y.shape[4:])[:, :, :n]

    return jax.tree.map(join, outs)


def _dynamic_slots(q_est, qids, idx0, valid0, kb, kmask_b, rng, *, cfg, causal, num_query_blocks, group, est_chunk,
                   fused=False):
    """Random and top-k slots of some query blocks: `idx, valid` `[B, H // group, n, R + k]`; their
    scores estimated `est_chunk` query blocks at a time (`map_chunks`), or by the fused kernel
    (`pallas_estimate`, `fused`) all at once."""
    B, H, n, _, _ = q_est.shape
    m = kb.shape[2]
    Hk = H // group
    allowed = (jnp.arange(m)[None, :] <= qids[:, None]) if causal else jnp.ones((n, m), bool)
    taken = slots_to_blocks(idx0, valid0, m)  # [n, m]
    free = jnp.broadcast_to(allowed & ~taken, (B, Hk, n, m))
    if kmask_b is not None:
        free = free & jnp.any(kmask_b, axis=-1)[:, None, None, :]  # never choose an all-padding block
    idx_list, valid_list = [], []
    if cfg.random_blocks:
        # one table [Hk, all query blocks, m], drawn where needed: decoding draws what the full pass drew
        cell = (jnp.arange(Hk)[:, None, None] * num_query_blocks + qids[None, :, None]) * m + jnp.arange(m)
        u = rand.uniform_at(rng, cell, stream=1)
        idx_r, valid_r = _top(jnp.where(free, u[None], NEG_INF), cfg.random_blocks)
        idx_list.append(idx_r)
        valid_list.append(valid_r)
        free = free & ~slots_to_blocks(idx_r, valid_r, m)
    start_list = [jnp.zeros(x.shape, jnp.int32) for x in idx_list]
    if cfg.top_k:
        sg = jax.lax.stop_gradient
        est = ESTIMATORS.get(cfg.estimator).fn
        rows = causal_anchor_rows(cfg, kb.shape[3]) if causal else None

        def score(q_c, qids_c, allowed_c, kb, kmask_b, rng):  # noqa: ANN001, ANN202 (one estimate chunk)
            if fused:
                from sparseformer.attention import pallas_estimate

                p = len(rows) if rows is not None else min(cfg.anchors, q_c.shape[3])
                s = pallas_estimate.sub_block_scores(cfg.estimator, q_c, p, kb, kmask_b)
                return s if rows is not None else jnp.max(s, axis=3)
            if rows is None:
                return anchor_scores(est, q_c, kb, kmask_b, allowed_c, cfg=cfg, rng=rng, qids=qids_c)
            # one single-query anchor per row offset, scored apart
            return sub_block_scores(est, q_c, len(rows), kb, kmask_b, allowed_c, cfg=cfg, rng=rng, qids=qids_c)

        chunk = n if fused else est_chunk
        scores = sg(map_chunks(score, chunk, n, (sg(q_est), qids, allowed), (2, 0, 0), (sg(kb), kmask_b, rng)))
        scores_P = scores[..., None] if rows is None else jnp.moveaxis(scores, 3, 4)
        if group > 1:  # a group's heads share one choice: the blocks their masses favour together
            scores_P = jax.nn.logsumexp(scores_P.reshape(B, Hk, group, n, m, -1), axis=2)
        # causal: shares are estimated over the blocks strictly before the query block, since
        # the query block's own score includes keys later than its first rows
        norm = (jnp.arange(m)[None, :] < qids[:, None]) if causal else allowed
        idx_t, valid_t, start_t = _take_by_mass(scores_P, free, norm, cfg, rows or (0,))
        idx_list.append(idx_t)
        valid_list.append(valid_t)
        start_list.append(start_t)
    return jnp.concatenate(idx_list, -1), jnp.concatenate(valid_list, -1), jnp.concatenate(start_list, -1)


def _take_by_mass(scores_P, free, norm, cfg, rows):
    """The top-k slots from scores `[B, Hk, n, m, P]` of `P` anchors taken in turn.

    Each anchor takes its best free blocks while the estimated share of its attention mass
    already covered (the softmax of its scores over the blocks in `norm` `[n, m]`, summed over
    the blocks chosen so far, static ones included) is below `mass_threshold` and the budget of `top_k`
    slots lasts. Anchor p's slots serve the rows from `rows[p]` on; what it takes depends only on
    anchors 0..p, so a causal row never depends on a later anchor. Returns `[B, Hk, n, top_k]`
    idx, valid and row start (valid slots first).
    """
    k, tau = cfg.top_k, cfg.mass_threshold
    B, Hk, n, m, P = scores_P.shape
    left = jnp.full((B, Hk, n), k, jnp.int32)
    chosen = ~free & norm  # blocks already served exactly (static, random)
    idx_all, valid_all, start_all = [], [], []
    for p in range(P):
        scores = scores_P[..., p]
        idx, valid = _top(jnp.where(free, scores, NEG_INF), k)
        logz = jax.nn.logsumexp(jnp.where(norm, scores, NEG_INF), axis=-1, keepdims=True)
        share = jnp.where(norm & jnp.isfinite(logz), jnp.exp(scores - logz), 0.0)
        covered = jnp.sum(jnp.where(chosen, share, 0.0), axis=-1, keepdims=True)
        share_t = jnp.take_along_axis(share, idx, axis=-1)
        before = covered + jnp.cumsum(share_t, axis=-1) - share_t  # covered before each pick
        valid = valid & (jnp.arange(k) < left[..., None]) & ((before < tau) | (tau >= 1.0))
        left = left - jnp.sum(valid, axis=-1)
        hit = slots_to_blocks(idx, valid, m)
        free, chosen = free & ~hit, chosen | hit
        idx_all.append(idx)
        valid_all.append(valid)
        start_all.append(jnp.full(idx.shape, rows[p], jnp.int32))
    if P == 1:
        return idx_all[0], valid_all[0], start_all[0]
    idx, valid, start = (jnp.concatenate(x, axis=-1) for x in (idx_all, valid_all, start_all))
    order = jnp.argsort(~valid, axis=-1, stable=True)[..., :k]  # at most k are valid: keep those
    return tuple(jnp.take_along_axis(x, order, axis=-1) for x in (idx, valid, start))


def causal_anchor_rows(cfg: ml_collections.ConfigDict, b: int) -> tuple[int, ...] | None:
    """Causal `first_query` choice with `anchors > 1`: the row offsets of the anchor queries
    (the first row of each of `anchors` equal sub-blocks); None when one choice serves the block."""
    if cfg.causal_choice != "first_query" or min(cfg.anchors, b) == 1:
        return None
    return anchor_offsets(b, cfg.anchors)


def anchor_offsets(b: int, anchors: int) -> tuple[int, ...]:
    """First row of each of `anchors` equal sub-blocks of a `b`-row block (every row at `anchors >= b`)."""
    return tuple(range(0, b, b // min(anchors, b)))


def choose_blocks(
    q_est: jax.Array,
    kb: jax.Array,
    kmask_b: jax.Array | None,
    qids: jax.Array,
    *,
    num_query_blocks: int,
    cfg: ml_collections.ConfigDict,
    causal: bool,
    rng: jax.Array,
    group: int = 1,
    fused_estimate: bool = False,
) -> Selection:
    """Pick the key blocks of each query block.

    Args:
      q_est: query rows the estimator sees per query block `[B, H, n, r, D]` (bidirectional: the
        block's own `b` rows; causal: `causal_queries`).
      kb: key blocks `[B, H, m, b, D]` (grouped-query attention: repeated to the query heads).
      kmask_b: key padding mask in blocks `[B, m, b]` or None.
      qids: `[n]` index of each query block among all `num_query_blocks`.
      rng: drives random blocks and the `sampled` estimator.
      group: query heads per key/value head; the heads of a group share one choice.
      fused_estimate: score with the fused Pallas kernel (`pallas_estimate`) when the estimator
        is one it computes (`maxkey`, `lsekey`): `attend` asks for it with the `pallas` exact
        kernel. It needs no estimate chunks (no `rows x S` scores are held).

    The choice is made per chunk of query blocks (`choice_chunk`), and within it the estimate per
    smaller chunk (`estimate_chunk`), so the transient scores stay bounded whatever the length
    while the choice's many small ops run a few times, not once per estimate chunk; the result
    does not depend on the chunking.
    """
    B, H, n = q_est.shape[:3]
    m, b = kb.shape[2], kb.shape[3]
    if H % group:
        raise ValueError(f"model.attention: {H} query heads are not a multiple of the group size {group}")
    idx0, valid0 = _static_slots(qids, m, cfg, causal)
    row_start = None
    idx = jnp.broadcast_to(idx0, (B, H // group) + idx0.shape)
    valid = jnp.broadcast_to(valid0, (B, H // group) + valid0.shape)
    if cfg.random_blocks or cfg.top_k:
        chunk = choice_chunk(cfg, n, m, causal)
        fused = False  # the estimate fused: asked for, something to score, an estimator the kernel computes
        if fused_estimate and cfg.top_k:
            from sparseformer.attention.pallas_estimate import fused_estimator

            fused = fused_estimator(cfg.estimator, b, q_est.shape[-1])
        fn = functools.partial(
            _dynamic_slots, cfg=cfg, causal=causal, num_query_blocks=num_query_blocks, group=group,
            est_chunk=estimate_chunk(cfg, chunk, m * b), fused=fused,
        )
        idx_d, valid_d, start_d = map_chunks(fn, chunk, n, (q_est, qids, idx0, valid0), (2, 0, 0, 0), (kb, kmask_b, rng))
        idx = jnp.concatenate([idx, idx_d], axis=-1)
        valid = jnp.concatenate([valid, valid_d], axis=-1)
        if causal and cfg.top_k and causal_anchor_rows(cfg, b) is not None:
            zeros = jnp.zeros(start_d.shape[:3] + idx0.shape[-1:], jnp.int32)  # static slots serve every row
            row_start = jnp.concatenate([zeros, start_d], axis=-1)
    if group > 1:
        idx, valid = jnp.repeat(idx, group, axis=1), jnp.repeat(valid, group, axis=1)
        row_start = None if row_start is None else jnp.repeat(row_start, group, axis=1)
    return Selection(idx=idx, valid=valid, qids=qids, block_size=b, num_key_blocks=m, row_start=row_start, group=group)


def causal_queries(qh_BHTD: jax.Array, qids: jax.Array, b: int, how: str, anchors: int = 1) -> jax.Array:
    """The queries a causal query block chooses its key blocks from: `[B, H, n, r, D]`.

    Every row of the block may depend on them, so the choice leaks nothing from the future:
      first_query     the block's first query (`r = 1`): no lag, whatever changes at or before
                      the block's start is seen by the block itself; with `anchors > 1`, the
                      first query of each of `anchors` sub-blocks, each choosing slots that only
                      the rows from it on use (`Selection.row_start`);
      previous_block  the previous block's `b` queries (block 0 uses its own first query): the
                      choice is one block late.
    """
    if how == "first_query":  # with anchors: the first query of each sub-block (`r = anchors`)
        return qh_BHTD[:, :, (qids * b)[:, None] + jnp.asarray(anchor_offsets(b, anchors))]
    prev = to_blocks(qh_BHTD, b)[:, :, jnp.maximum(qids - 1, 0)]
    first = qh_BHTD[:, :, qids * b][:, :, :, None]
    return jnp.where((qids > 0)[:, None, None], prev, first)


# ---------------------------------------------------------------- block-sparse exact attention


def slot_mask(idx_j, valid_j, kmask_b, qids, causal: bool, b: int, start_j=None) -> jax.Array:
    """Allowed (query, key) pairs of one slot: `[B, H, n, b, b]` (broadcastable)."""
    mask = valid_j[..., None, None]
    if start_j is not None:  # the slot serves only the rows from its start on
        mask = mask & (jnp.arange(b)[:, None] >= start_j[..., None, None])
    if kmask_b is not None:
        B, H = idx_j.shape[:2]
        bi, _ = _batch_head_index(B, H)
        mask = mask & kmask_b[bi, idx_j][..., None, :]
    if causal:
        tri = jnp.arange(b)[:, None] >= jnp.arange(b)[None, :]
        diag = (idx_j == qids)[..., None, None]
        mask = mask & (idx_j <= qids)[..., None, None] & (~diag | tri)
    return mask


def _gather(x_BHmbD: jax.Array, idx_BHn: jax.Array) -> jax.Array:
    B, H = idx_BHn.shape[:2]
    bi, hi = _batch_head_index(B, H)
    return x_BHmbD[bi, hi, idx_BHn]


def _slot_scores(qb, kb, slot, kmask_b, qids, causal):
    idx_j, valid_j, start_j = slot
    k_j = _gather(kb, idx_j)
    s = jnp.einsum("bhnqd,bhnkd->bhnqk", qb, k_j, preferred_element_type=jnp.float32)
    mask = slot_mask(idx_j, valid_j, kmask_b, qids, causal, qb.shape[3], start_j)
    return s, mask, k_j


def _slots(idx, valid, row_start):
    """The scan's per-slot inputs: `(idx, valid, row_start)` with the slot axis first."""
    first = lambda x: None if x is None else jnp.moveaxis(x, -1, 0)  # noqa: E731
    return (first(idx), first(valid), first(row_start))


def _forward(causal, qb, kb, vb, idx, valid, row_start, kmask_b, qids):
    B, H, n, b, D = qb.shape

    def body(carry, slot):
        m, l, acc = carry
        s, mask, _ = _slot_scores(qb, kb, slot, kmask_b, qids, causal)
        s = jnp.where(mask, s, LOG0)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        alpha = jnp.exp(m - m_new)
        p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
        v_j = _gather(vb, slot[0])
        acc = alpha[..., None] * acc + jnp.einsum("bhnqk,bhnkd->bhnqd", p, v_j, preferred_element_type=jnp.float32)
        return (m_new, alpha * l + jnp.sum(p, axis=-1), acc), None

    init = (
        jnp.full((B, H, n, b), LOG0, jnp.float32),
        jnp.zeros((B, H, n, b), jnp.float32),
        jnp.zeros((B, H, n, b, D), jnp.float32),
    )
    (m, l, acc), _ = jax.lax.scan(body, init, _slots(idx, valid, row_start))
    has = l > 0
    safe_l = jnp.where(has, l, 1.0)
    return acc / safe_l[..., None], jnp.where(has, m + jnp.log(safe_l), LOG0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def block_sparse_attention(causal, qb, kb, vb, idx, valid, row_start, kmask_b, qids):
    """Exact attention of each query block over its chosen key blocks (the `scan` kernel).

    Args:
      causal: apply the causal mask inside diagonal blocks (and refuse future blocks).
      qb: `[B, H, n, b, D]` query blocks, already scaled by 1/sqrt(D).
      kb, vb: `[B, H, m, b, D]` key and value blocks.
      idx, valid: `[B, H, n, K]` chosen blocks.
      row_start: `[B, H, n, K]` int32 first row of its query block each slot serves, or None.
      kmask_b: `[B, m, b]` bool key mask, or None.
      qids: `[n]` int32 index of each query block.

    Returns:
      out `[B, H, n, b, D]` float32 (zero rows where nothing is allowed) and its
      log-sum-exp `[B, H, n, b]` (LOG0 there).
    """
    return _forward(causal, qb, kb, vb, idx, valid, row_start, kmask_b, qids)


def _fwd_rule(causal, qb, kb, vb, idx, valid, row_start, kmask_b, qids):
    out, lse = _forward(causal, qb, kb, vb, idx, valid, row_start, kmask_b, qids)
    return (out, lse), (qb, kb, vb, idx, valid, row_start, kmask_b, qids, out, lse)


def _bwd_rule(causal, res, cts):
    qb, kb, vb, idx, valid, row_start, kmask_b, qids, out, lse = res
    d_out, d_lse = cts
    d_out = d_out.astype(jnp.float32)
    delta = jnp.sum(d_out * out, axis=-1)  # [B, H, n, b]
    B, H = qb.shape[:2]
    bi, hi = _batch_head_index(B, H)

    def body(carry, slot):
        dq, dk, dv = carry
        idx_j = slot[0]
        s, mask, k_j = _slot_scores(qb, kb, slot, kmask_b, qids, causal)
        p = jnp.where(mask, jnp.exp(s - lse[..., None]), 0.0)
        v_j = _gather(vb, idx_j)
        dv_j = jnp.einsum("bhnqk,bhnqd->bhnkd", p, d_out)
        dp = jnp.einsum("bhnqd,bhnkd->bhnqk", d_out, v_j, preferred_element_type=jnp.float32)
        ds = p * (dp - delta[..., None] + d_lse[..., None])
        dq = dq + jnp.einsum("bhnqk,bhnkd->bhnqd", ds, k_j, preferred_element_type=jnp.float32)
        dk_j = jnp.einsum("bhnqk,bhnqd->bhnkd", ds, qb, preferred_element_type=jnp.float32)
        return (dq, dk.at[bi, hi, idx_j].add(dk_j), dv.at[bi, hi, idx_j].add(dv_j)), None

    init = (
        jnp.zeros(qb.shape, jnp.float32),
        jnp.zeros(kb.shape, jnp.float32),
        jnp.zeros(vb.shape, jnp.float32),
    )
    (dq, dk, dv), _ = jax.lax.scan(body, init, _slots(idx, valid, row_start))
    return dq.astype(qb.dtype), dk.astype(kb.dtype), dv.astype(vb.dtype), None, None, None, None, None


block_sparse_attention.defvjp(_fwd_rule, _bwd_rule)


def masked_block_attention(causal, q_BHTD, k_BHSD, v_BHSD, selection: Selection, kv_mask, q_pos):
    """The same result as `block_sparse_attention`, from dense logits masked to the chosen blocks.

    `T x S` logits instead of `T x K*b`: for short inputs (a few hundred keys), one large matmul
    beats many `b x b` ones (the `auto` kernel's choice). `q` is scaled; `q_pos` `[T]` are the
    query positions (decoding passes one block). Returns out `[B, H, T, D]` float32 and lse.
    """
    b, S = selection.block_size, k_BHSD.shape[2]
    rows = jnp.arange(q_BHTD.shape[2])
    keep = jnp.repeat(selection.rows_block_mask(rows), b, axis=-1)  # [B, H, T, S]
    allowed = _dense.key_masks(q_pos, jnp.arange(S), causal=causal, kv_mask=kv_mask)
    if allowed is not None:
        keep = keep & allowed
    s = jnp.einsum("bhtd,bhsd->bhts", q_BHTD, k_BHSD, preferred_element_type=jnp.float32)
    return _dense.masked_softmax(s, keep, v_BHSD, "bhts,bhsd->bhtd")
