"""The fused pooled branch (`pallas_pool`, interpreted here) equals the XLA one: outputs, log-sum-exp
and gradients, with exclusion of selected blocks (row starts included), causal masking, padded
summaries, the variance feature on and off, several summary tiles and several pieces of the
summaries' gradient; and `attend` takes it with the `pallas` exact kernel."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparseformer.attention import compression, pallas_pool, presets
from sparseformer.attention.kernel_check import random_selection
from tests.attention.helpers import loss_by_kernel, random_qkv, rel_error


def _summaries(key, B, H, nc, D, *, padded: bool):
    ks = jax.random.split(key, 4)
    k_mean = jax.random.normal(ks[0], (B, H, nc, D))
    var = jax.random.uniform(ks[1], (B, H, nc))
    v_mean = jax.random.normal(ks[2], (B, H, nc, D))
    cnt = jnp.full((B, 1, nc), 4.0)
    if padded:  # one summary of padding only (never used), one half padding
        cnt = cnt.at[:, :, -1].set(0.0).at[:, :, 1].set(2.0)
    return k_mean, var, v_mean, cnt


@pytest.mark.parametrize("causal,moments,excluded,row_starts,shape", [
    (False, True, True, False, (512, 32, 8)),  # 64 summaries of 8 keys: one tile; blocks of 32 rows
    (True, True, True, True, (512, 32, 8)),  # causal, anchors' row starts
    (False, False, False, False, (1024, 32, 32)),  # no selection: 32 summaries, 4 pieces of the gradient
    (True, False, True, False, (1024, 64, 8)),  # 128 summaries in 2 tiles, blocks of 64 rows
    # 80 summaries in 2 tiles: query block 64's last row sees exactly the second tile's first summary
    # (the edge of the causal skips: tiles past a block's last row, blocks before a tile's first
    # summary), its own block not always selected (so not always left out)
    (True, True, "no diagonal", False, (1280, 16, 16)),
])
def test_fused_pool_equals_the_xla_pool(causal, moments, excluded, row_starts, shape):
    T, b, p = shape
    B, H, D = 2, 2, 16
    nc = T // p
    q = jax.random.normal(jax.random.key(1), (B, T, H, D))
    q_pos = jnp.arange(T)
    k_mean, var, v_mean, cnt = _summaries(jax.random.key(2), B, H, nc, D, padded=not causal)
    var = var if moments else None
    sel = None
    if excluded:
        sel = random_selection(np.random.default_rng(0), B=B, Hk=H, G=1, n=T // b, K=4, b=b, causal=causal,
                               row_starts=row_starts, p_valid=0.8, diagonal=excluded != "no diagonal")
    rows = b if sel is not None else compression.FUSED_POOL_ROWS
    scale = 0.25
    static = compression._PoolStatic(p, moments, causal, 40, scale)  # XLA: chunks of 40 rows

    def xla(q, k_mean, var, v_mean):
        return compression._pool_attention(static, q, q_pos, k_mean, var, v_mean, cnt, sel)

    def fused(q, k_mean, var, v_mean):
        return pallas_pool.pool_attention(q, q_pos, k_mean, var, v_mean, cnt, sel, p=p, moments=moments,
                                          causal=causal, scale=scale, rows=rows)

    args = (q, k_mean, var, v_mean)
    (out_x, lse_x), vjp_x = jax.vjp(xla, *args)
    (out_f, lse_f), vjp_f = jax.vjp(fused, *args)
    assert out_f.shape == out_x.shape == (B, H, T, D)
    np.testing.assert_allclose(np.asarray(out_f), np.asarray(out_x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(lse_f), np.asarray(lse_x), rtol=1e-5, atol=1e-5)
    if causal:  # the first rows see no whole summary: zeros and LOG0, not NaN
        assert np.all(np.asarray(out_f[:, :, 0]) == 0) and np.all(np.asarray(lse_f[:, :, 0]) < -1e29)
    cts = (jax.random.normal(jax.random.key(3), out_x.shape), jax.random.normal(jax.random.key(4), lse_x.shape))
    for name, g_f, g_x in zip(("q", "k_mean", "var", "v_mean"), vjp_f(cts), vjp_x(cts)):
        if g_x is None:
            assert g_f is None
            continue
        assert rel_error(g_f, g_x) < 1e-5, name


def test_the_summaries_gradient_is_cut_into_pieces_and_tiles():
    """The shapes above reach several pieces and several tiles (else a fault there would hide)."""
    plans = []
    orig = pallas_pool._attention

    def spy(plan, *args):
        plans.append(plan)
        return orig(plan, *args)

    q = jnp.zeros((1, 1024, 1, 16))
    for T, p, rows in ((1024, 32, 64), (1024, 8, 64)):
        k_mean, var, v_mean, cnt = _summaries(jax.random.key(0), 1, 1, T // p, 16, padded=False)
        pallas_pool._attention = spy
        try:
            pallas_pool.pool_attention(q, jnp.arange(T), k_mean, var, v_mean, cnt, None, p=p, moments=True,
                                       causal=False, scale=1.0, rows=rows)
        finally:
            pallas_pool._attention = orig
    assert (plans[0].pieces, plans[0].num_tiles) == (4, 1)
    assert (plans[1].pieces, plans[1].num_tiles) == (1, 2)


@pytest.mark.parametrize("causal,padding,group", [(False, True, 2), (True, False, 1)])
def test_attend_takes_the_fused_pool_with_the_pallas_kernel(causal, padding, group):
    T = 128
    q, k, v = random_qkv(jax.random.key(0), T=T, H=4)
    k, v = k[:, :, :4 // group], v[:, :, :4 // group]
    kv_mask = jnp.ones((2, T), bool).at[1, 100:].set(False) if padding else None
    c = presets.get("rsa")  # pooled summaries with the variance feature, exclusion of the selection
    c.selection.update(block_size=16, top_k=3)
    res = loss_by_kernel(c, q, k, v, causal=causal, kv_mask=kv_mask)
    for kernel, (jaxpr, _, _) in res.items():
        names = {n for n in ("sparseformer_pool_fwd", "sparseformer_pool_dq", "sparseformer_pool_dsum") if n in jaxpr}
        assert names == ({"sparseformer_pool_fwd"} if kernel == "pallas" else set())  # the backward's: traced later
    assert rel_error(res["pallas"][1], res["scan"][1]) < 1e-5
    for a, b in zip(res["pallas"][2], res["scan"][2]):
        assert rel_error(a, b) < 1e-5


def test_queries_that_blocks_do_not_tile_keep_the_xla_pool():
    assert pallas_pool.usable(1024, 64, 64)
    assert not pallas_pool.usable(1000, 64, 64)  # rows not a whole number of blocks
    assert not pallas_pool.usable(1024, 48, 64)  # a head dim Triton tiles do not take
