"""The fused estimate (`pallas_estimate`, interpreted here) scores as the XLA estimators do, so the
blocks chosen with it are the same, and `attend` takes it with the `pallas` exact kernel."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparseformer.attention import pallas_estimate, pallas_kernel, presets, selection
from sparseformer.attention.registry import ESTIMATORS
from tests.attention.helpers import loss_by_kernel, random_qkv, rel_error


@pytest.mark.parametrize("estimator", ["maxkey", "lsekey"])
@pytest.mark.parametrize("padding", [False, True])
@pytest.mark.parametrize("n,p", [(5, 1), (20, 4)])  # 5 mean queries in one padded program; 80 in two
def test_fused_scores_equal_the_xla_estimators(estimator, padding, n, p):
    B, H, r, D, m, b = 2, 3, 16, 16, 6, 16
    ks = jax.random.split(jax.random.key(n + p), 3)
    q = jax.random.normal(ks[0], (B, H, n, r, D))
    kb = jax.random.normal(ks[1], (B, H, m, b, D))
    kmask = jax.random.bernoulli(ks[2], 0.7, (B, m, b)).at[0, 2].set(False) if padding else None  # one block all padding
    cfg = presets.get("rsa").selection
    ref = selection.sub_block_scores(ESTIMATORS.get(estimator).fn, q, p, kb, kmask, jnp.ones((n, m), bool),
                                     cfg=cfg, rng=None, qids=jnp.arange(n))
    got = pallas_estimate.sub_block_scores(estimator, q, p, kb, kmask)
    assert got.shape == (B, H, n, p, m)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-6, atol=2e-6)
    if padding:  # an all-padding block scores as the XLA estimators score it (never chosen)
        assert float(got[0, 0, 0, 0, 2]) < -1e29


@pytest.mark.parametrize("causal,group", [(False, 2), (True, 1)])
def test_choose_blocks_with_the_fused_estimate_chooses_the_same_blocks(causal, group):
    T, b, H = 256, 16, 4
    q, k, _ = random_qkv(jax.random.key(3), T=T, H=H)
    qh, kh = jnp.swapaxes(q, 1, 2) * 0.25, jnp.swapaxes(k, 1, 2)
    cfg = presets.get("rsa").selection
    cfg.update(block_size=b, top_k=4, random_blocks=1)
    n = T // b
    qids = jnp.arange(n)
    q_est = (selection.causal_queries(qh, qids, b, cfg.causal_choice, cfg.anchors) if causal
             else selection.to_blocks(qh, b))
    kmask = None if causal else jnp.ones((2, n, b), bool).at[1, -3:].set(False)
    kb = selection.to_blocks(kh, b)

    def choose(fused):
        return selection.choose_blocks(q_est, kb, kmask, qids, num_query_blocks=n, cfg=cfg, causal=causal,
                                       rng=jax.random.key(5), group=group, fused_estimate=fused)

    a, f = choose(False), choose(True)
    for x, y in ((a.idx, f.idx), (a.valid, f.valid), (a.row_start, f.row_start)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    if causal:
        assert f.row_start is not None  # anchors kept apart: each serves its rows on


def test_attend_takes_the_fused_estimate_with_the_pallas_kernel():
    q, k, v = random_qkv(jax.random.key(0), T=128, H=2)
    c = presets.get("rsa")
    c.selection.update(block_size=16, top_k=3)
    res = loss_by_kernel(c, q, k, v, causal=True)
    for kernel, (jaxpr, _, _) in res.items():
        assert ("sparseformer_maxkey_scores" in jaxpr) == (kernel == "pallas")
    assert rel_error(res["pallas"][1], res["scan"][1]) < 1e-5
    for a, b in zip(res["pallas"][2], res["scan"][2]):
        assert rel_error(a, b) < 1e-4


def test_only_key_exact_estimators_with_triton_tiles_are_fused():
    assert pallas_estimate.fused_estimator("maxkey", 64, 64)
    assert pallas_estimate.fused_estimator("lsekey", 16, 128)
    assert not pallas_estimate.fused_estimator("pooled", 64, 64)  # not key-exact: the XLA estimator
    assert not pallas_estimate.fused_estimator("maxkey", 8, 64)  # a Triton matmul needs blocks >= 16
    assert not pallas_estimate.fused_estimator("maxkey", 64, 48)  # and a power-of-two head dim
    with pallas_kernel.tpu_interpret():  # the TPU keeps the XLA estimators
        assert not pallas_estimate.fused_estimator("maxkey", 64, 64)
