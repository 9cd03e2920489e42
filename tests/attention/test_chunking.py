"""Linear memory: the estimate and the pooled branch computed in chunks equal the one-shot versions,
and `Selection.row_start` (a slot that serves only the later rows of its query block) is honoured
alike by the exact kernels."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparseformer.attention import attend, compression, init_params, presets, selection
from sparseformer.attention.selection import Selection, block_sparse_attention, masked_block_attention, to_blocks
from tests.attention.helpers import random_qkv, rel_error

T, B = 128, 16


def _loss_and_grads(config, q, k, v, *, causal, kv_mask=None):
    params = init_params(config, jax.random.key(7), num_heads=q.shape[2], head_dim=q.shape[3], max_len=T)

    def loss(q, k, v):
        out, aux = attend(q, k, v, config, params=params, causal=causal, kv_mask=kv_mask, rng=jax.random.key(4))
        return jnp.sum(out * jnp.arange(q.shape[-1])) + aux["aux_loss"], out

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)


@pytest.mark.parametrize("estimator,causal", [("maxkey", False), ("sampled", True)])
def test_chunked_choice_and_pool_equal_one_shot(monkeypatch, estimator, causal):
    q, k, v = random_qkv(jax.random.key(0), T=T, H=4)
    k, v = k[:, :, :2], v[:, :, :2]  # grouped-query attention: one choice per group
    kv_mask = None if causal else jnp.ones((2, T), bool).at[1, 100:].set(False)
    c = presets.get("rsa")
    c.selection.update(block_size=B, window=1, global_blocks=1, top_k=2, random_blocks=1, estimator=estimator,
                       kernel="scan")
    monkeypatch.setattr(compression, "POOL_CHUNK_SHARE", 1e9)  # the pooled branch in one chunk
    assert compression.pool_chunk_rows(T, T // B, 16) == T
    (_, out1), g1 = _loss_and_grads(c, q, k, v, causal=causal, kv_mask=kv_mask)
    # choice: 5 query blocks a chunk (the last one padded), each scored 3 blocks at a time by maxkey
    # (the last one padded again), 1 by sampled; pool: 5 query rows a chunk (0.02 * T * D / (T / B)
    # = 5.12), the last chunk overlapping the one before
    anchors = len(selection.causal_anchor_rows(c.selection, B) or (0,)) if causal else 1
    monkeypatch.setattr(selection, "CHOICE_CHUNK_ELEMENTS", 5 * (T // B) * anchors)
    monkeypatch.setattr(selection, "ESTIMATE_CHUNK_ELEMENTS", 3 * T)
    assert selection.choice_chunk(c.selection, T // B, T // B, causal) == 5
    monkeypatch.setattr(compression, "POOL_CHUNK_SHARE", 0.02)
    assert compression.pool_chunk_rows(T, T // B, 16) == 5
    (_, out2), g2 = _loss_and_grads(c, q, k, v, causal=causal, kv_mask=kv_mask)
    assert rel_error(out2, out1) < 1e-6
    for a, b in zip(g2, g1):
        assert rel_error(a, b) < 1e-5


def test_chunking_bounds_the_choice_estimate():
    c = presets.get("rsa").selection
    assert selection.estimate_chunk(c, 1024, 65536) * 65536 <= selection.ESTIMATE_CHUNK_ELEMENTS
    assert selection.estimate_chunk(c, 8, 128) == 8  # short inputs: one chunk, no loop
    c.estimator = "oracle"
    assert selection.estimate_chunk(c, 1024, 65536) == 1  # 64 rows of 64K scores already exceed the budget
    # pooled holds one score a key block (m = 1024), not a key: 64K tokens in one chunk, no loop
    c = presets.get("nsa").selection
    assert c.estimator == "pooled" and c.anchors == 1
    assert selection.estimate_chunk(c, 1024, 65536) == 1024
    c.anchors = 4
    assert selection.estimate_chunk(c, 1024, 65536) == 256


def test_choice_chunks_are_b_times_larger_than_estimate_chunks():
    # the choice's small ops run once per choice chunk: 1 chunk bidirectionally at 64K (1024 blocks
    # of 64), 4 causally (4 anchors kept apart), where the estimate takes 256 chunks of 4
    c = presets.get("rsa").selection
    assert selection.choice_chunk(c, 1024, 1024, causal=False) == 1024
    assert selection.choice_chunk(c, 1024, 1024, causal=True) == 256
    assert selection.estimate_chunk(c, 1024, 65536) == 4
    assert selection.choice_chunk(c, 64, 64, causal=True) == 64  # short inputs: one chunk



def test_pool_chunks_hold_a_quarter_of_q_and_are_at_most_64():
    # rows x nc <= T x D / 4 (each float32 temporary at most half a bfloat16 q): 64 chunks at 64K
    assert compression.pool_chunk_rows(65536, 1024, 64) == 1024
    assert compression.pool_chunk_rows(4096, 64, 64) == 1024
    assert compression.pool_chunk_rows(256, 4, 64) == 256  # short inputs: one chunk, no loop
    assert compression.pool_chunk_rows(1 << 20, 1 << 14, 64) == (1 << 20) // 64  # at most 64 chunks


def _row_start_case(causal):
    q, k, v = random_qkv(jax.random.key(1), T=64, H=2, D=8)
    b, n = 8, 8
    qh, kh, vh = (jnp.swapaxes(x, 1, 2) for x in (q * 8**-0.5, k, v))
    rng = np.random.default_rng(0)
    qids = jnp.arange(n)
    idx = rng.integers(0, n, size=(2, 2, n, 3))
    if causal:
        idx = np.minimum(idx, np.arange(n)[:, None])
    idx[..., 0] = np.arange(n)  # the own block, always
    valid = np.ones(idx.shape, bool)
    valid[..., 1:] &= idx[..., 1:] != idx[..., :1]
    valid[..., 2] &= idx[..., 2] != idx[..., 1]
    start = rng.integers(0, b, size=idx.shape)
    start[..., 0] = 0
    sel = Selection(idx=jnp.asarray(idx, jnp.int32), valid=jnp.asarray(valid), qids=qids, block_size=b,
                    num_key_blocks=n, row_start=jnp.asarray(start, jnp.int32))
    return qh, kh, vh, sel, idx, valid, start


@pytest.mark.parametrize("causal", [False, True])
def test_row_start_is_honoured_by_both_exact_kernels(causal):
    qh, kh, vh, sel, idx, valid, start = _row_start_case(causal)
    b = sel.block_size
    out_s, lse_s = block_sparse_attention(causal, to_blocks(qh, b), to_blocks(kh, b), to_blocks(vh, b),
                                          sel.idx, sel.valid, sel.row_start, None, sel.qids)
    out_m, lse_m = masked_block_attention(causal, qh, kh, vh, sel, None, jnp.arange(qh.shape[2]))
    assert rel_error(out_s.reshape(out_m.shape), out_m) < 1e-6
    # an explicit reference for one row: the keys of the slots whose start it has reached
    bb, hh, blk, r = 1, 0, 5, 3
    keys = sorted({int(idx[bb, hh, blk, j]) for j in range(3) if valid[bb, hh, blk, j] and r >= start[bb, hh, blk, j]})
    cols = np.concatenate([np.arange(j * b, (j + 1) * b) for j in keys])
    t = blk * b + r
    if causal:
        cols = cols[cols <= t]
    s = np.asarray(qh[bb, hh, t] @ kh[bb, hh, cols].T)
    p = np.exp(s - s.max())
    ref = (p / p.sum()) @ np.asarray(vh[bb, hh, cols])
    np.testing.assert_allclose(np.asarray(out_m[bb, hh, t]), ref, rtol=1e-5, atol=1e-6)


def test_row_start_zero_is_no_row_start():
    qh, kh, vh, sel, *_ = _row_start_case(False)
    b = sel.block_size
    args = (to_blocks(qh, b), to_blocks(kh, b), to_blocks(vh, b), sel.idx, sel.valid)
    a = block_sparse_attention(False, *args, jnp.zeros_like(sel.row_start), None, sel.qids)
    c = block_sparse_attention(False, *args, None, None, sel.qids)
    np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(c[0]))


@pytest.mark.parametrize("padding", [False, True])
def test_key_chunked_dense_rows_equal_dense_attention_with_gradients(padding):
    """BigBird's global query rows: the same output, log-sum-exp and gradients in chunks of keys read
    from the public [B, S, Hk, D] layout (GQA: one key/value head for two query heads), including a
    chunk whose keys are all padding (it must add nothing, not NaN)."""
    from sparseformer.attention.dense import dense_attention, dense_attention_chunked

    q, k, v = (jnp.swapaxes(x, 1, 2) for x in random_qkv(jax.random.key(3), B=2, T=64, H=2, D=8))
    q_rows = q[:, :, :5]
    kv_mask = jnp.ones((2, 64), bool).at[1, 16:32].set(False).at[0, 60:].set(False) if padding else None
    w = jax.random.normal(jax.random.key(4), (2, 2, 5, 8))

    def loss(fn, k, v):
        def f(q_rows, k, v):
            out, lse = fn(q_rows, k, v)
            return jnp.sum(out * w) + jnp.sum(lse), (out, lse)

        return jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(q_rows, k, v)

    k_kv, v_kv = (jnp.swapaxes(x[:, ::2], 1, 2) for x in (k, v))  # one key/value head for the two query heads
    chunked = lambda q, k, v: dense_attention_chunked(q, k, v, kv_mask=kv_mask, chunk=16)  # noqa: E731
    (_, (out_c, lse_c)), g_c = loss(chunked, k_kv, v_kv)
    (_, (out_d, lse_d)), g_d = loss(
        lambda q, k, v: dense_attention(q, *(jnp.repeat(jnp.swapaxes(x, 1, 2), 2, axis=1) for x in (k, v)), kv_mask=kv_mask),
        k_kv, v_kv)
    assert rel_error(out_c, out_d) < 1e-5 and rel_error(lse_c, lse_d) < 1e-6
    for a, b in zip(g_c, g_d):
        assert bool(jnp.all(jnp.isfinite(a))) and rel_error(a, b) < 1e-5
