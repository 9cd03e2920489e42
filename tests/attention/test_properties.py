"""Properties: causality by gradients, padding, dtypes, randomness, the robust estimator,
compiled memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparseformer.attention import (
    COMPRESSIONS, ESTIMATORS, attend, choose_blocks, default_config, init_params, presets,
)
from sparseformer.attention.selection import to_blocks
from tests.attention.helpers import causal_presets, future_gradient, random_qkv, rel_error, run

T, B = 64, 8


def _small(name):
    c = presets.get(name)
    c.selection.block_size = B
    c.selection.update(top_k=min(c.selection.top_k, 1), random_blocks=min(c.selection.random_blocks, 1),
                       global_blocks=min(c.selection.global_blocks, 1), window=min(c.selection.window, 1))
    c.compression.rank = 16
    return c


def _causal_presets():
    return causal_presets(_small, T)


def test_causal_presets_are_those_whose_components_support_it():
    names = _causal_presets()
    assert "linformer" not in names and "nystrom" not in names
    assert {"dense", "local", "rsa", "nsa", "performer", "scatterbrain"} <= set(names)


@pytest.mark.parametrize("name", _causal_presets())
def test_causal_by_gradients(name):
    q, k, v = random_qkv(jax.random.key(1), B=1, T=T)
    c = _small(name)
    c.selection.global_queries = False
    params = init_params(c, jax.random.key(0), num_heads=2, head_dim=16, max_len=T)
    # a row in the middle of a block, and the last row of a block
    rows = (B + 5, 2 * B - 1)
    assert future_gradient(c, q, k, v, rows, params=params) == 0.0, f"{name}: an output of rows {rows} sees the future"
    # and the gradient to the past is not zero (the test can fail)
    g = jax.jit(jax.grad(lambda k: jnp.sum(attend(q, k, v, c, params=params, causal=True)[0][:, B + 5])))(k)
    assert float(jnp.max(jnp.abs(g[:, : B + 5]))) > 0


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("name", ["rsa", "nsa", "scatterbrain", "bigbird", "performer", "nystrom", "linformer", "dense"])
def test_padded_rows_are_zero_and_gradients_finite(name, dtype):
    q, k, v = random_qkv(jax.random.key(2), T=T, dtype=dtype)
    mask = jnp.ones((2, T), bool).at[1].set(False).at[0, 50:].set(False)  # row 1: nothing to attend
    c = _small(name)
    params = init_params(c, jax.random.key(0), num_heads=2, head_dim=16, max_len=T)

    def loss(q, k, v):
        out, aux = attend(q, k, v, c, params=params, kv_mask=mask, rng=jax.random.key(4))
        return jnp.sum(out.astype(jnp.float32) ** 2) + aux["aux_loss"], out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    assert out.dtype == dtype
    assert bool(jnp.all(out[1] == 0)), "a fully padded row must give zeros"
    assert bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))
    for g in grads:
        assert bool(jnp.all(jnp.isfinite(g.astype(jnp.float32))))
    # padded keys get no gradient
    assert float(jnp.max(jnp.abs(grads[1][0, 50:].astype(jnp.float32)))) == 0.0


def test_bfloat16_close_to_float32():
    q, k, v = random_qkv(jax.random.key(3), T=T)
    c = _small("rsa")
    ref, _ = run(c, q, k, v)
    out, _ = run(c, q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16))
    assert rel_error(out, ref) < 0.05


def test_lengths_not_a_block_multiple_are_padded_with_a_mask():
    q, k, v = random_qkv(jax.random.key(3), T=T - 7)
    c = _small("rsa")
    with pytest.raises(ValueError, match="model.attention.selection.block_size"):
        attend(q, k, v, c)
    mask = jnp.ones((2, T - 7), bool)
    out, _ = run(c, q, k, v, kv_mask=mask)
    assert out.shape == q.shape and bool(jnp.all(jnp.isfinite(out)))


@pytest.mark.parametrize("name", ["bigbird", "performer"])
def test_randomness_is_reproducible_under_one_rng_and_changes_under_another(name):
    q, k, v = random_qkv(jax.random.key(4), T=T)
    c = _small(name)
    a, _ = run(c, q, k, v, rng=jax.random.key(10))
    b, _ = run(c, q, k, v, rng=jax.random.key(10))
    d, _ = run(c, q, k, v, rng=jax.random.key(11))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert rel_error(a, d) > 1e-3


def _needle_case(D=32, T_=256):
    """One query block whose queries all match one key planted in a far block; every other
    key is noise, with a few strong-but-random keys that inflate block means elsewhere."""
    rng = np.random.default_rng(0)
    b = 16
    k = rng.normal(size=(1, T_, 1, D)).astype(np.float32)
    direction = rng.normal(size=D).astype(np.float32)
    direction /= np.linalg.norm(direction)
    q = rng.normal(size=(1, T_, 1, D)).astype(np.float32) * 0.3 + 3 * direction
    needle_block = 12
    k[0, needle_block * b + 5, 0] = 20 * direction  # one strong key in block 12 (score ~60)
    # a decoy block whose mean leans toward the query direction (score ~6 each), none strong
    k[0, 4 * b : 5 * b, 0] += 2.0 * direction
    return jnp.asarray(q), jnp.asarray(k), needle_block, b


def _top1(q, k, b, est):
    c = default_config().selection
    c.update(enabled=True, block_size=b, window=1, top_k=1, estimator=est)
    qb, kb = to_blocks(jnp.swapaxes(q, 1, 2), b), to_blocks(jnp.swapaxes(k, 1, 2), b)
    sel = choose_blocks(qb, kb, None, jnp.arange(qb.shape[2]), num_query_blocks=qb.shape[2],
                        cfg=c, causal=False, rng=jax.random.key(0))
    return np.asarray(sel.idx[0, :, 0, -1])  # every head's top-1 block for query block 0


def test_maxkey_finds_needles_of_ordinary_norm_that_bound_and_pooled_miss():
    """Why `rsa` ranks blocks with `maxkey`: at D=64 with 64 keys a block, the per-dimension
    extremes behind `bound` look alike in every block, so a needle whose norm is that of an
    ordinary key (it only points the right way) does not stand out; its exact score does."""
    rng = np.random.default_rng(1)
    b, T, D, H = 64, 1024, 64, 4
    q = rng.normal(size=(1, T, H, D)).astype(np.float32) / np.sqrt(D)
    k = rng.normal(size=(1, T, H, D)).astype(np.float32)
    needle = 11
    for h in range(H):  # block 0's queries share a direction; one key far away points that way
        direction = rng.normal(size=D)
        direction /= np.linalg.norm(direction)
        q[0, :b, h] += 1.0 * direction
        k[0, needle * b + 7, h] = np.sqrt(D) * direction
    q, k = jnp.asarray(q), jnp.asarray(k)
    assert (_top1(q, k, b, "maxkey") == needle).all()
    assert (_top1(q, k, b, "oracle") == needle).all()
    assert (_top1(q, k, b, "bound") != needle).any()
    assert (_top1(q, k, b, "pooled") != needle).any()


def test_bound_estimator_finds_a_planted_needle_that_pooled_misses():
    q, k, needle, b = _needle_case()
    picks = {}
    for est in ("pooled", "bound"):
        c = default_config().selection
        c.update(enabled=True, block_size=b, window=1, top_k=1, estimator=est)
        qb, kb = to_blocks(jnp.swapaxes(q, 1, 2), b), to_blocks(jnp.swapaxes(k, 1, 2), b)
        sel = choose_blocks(qb, kb, None, jnp.arange(qb.shape[2]), num_query_blocks=qb.shape[2],
                            cfg=c, causal=False, rng=jax.random.key(0))
        picks[est] = np.asarray(sel.idx[0, 0, 0, -1])  # query block 0's top-1 block
    assert picks["bound"] == needle
    assert picks["pooled"] != needle


def _compiled_bytes(f, length):
    """XLA's compiled memory (temp + output) of forward+backward at B=1, T=S=length, H=4, D=64
    (compiled, not run)."""
    shape = jax.ShapeDtypeStruct((1, length, 4, 64), jnp.float32)
    g = jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v) ** 2), argnums=(0, 1, 2)))
    m = g.lower(shape, shape, shape).compile().memory_analysis()
    return m.temp_size_in_bytes + m.output_size_in_bytes


def _rsa(q, k, v):
    return attend(q, k, v, presets.get("rsa"), rng=jax.random.key(0))[0]


def test_rsa_forward_backward_compiled_memory_is_at_most_a_sixteenth_of_dense():
    dense = _compiled_bytes(lambda q, k, v: jax.nn.dot_product_attention(q, k, v), 8192)
    rsa = _compiled_bytes(_rsa, 8192)
    assert rsa * 16 <= dense, f"rsa {rsa / 1e6:.0f} MB vs dense {dense / 1e6:.0f} MB"


def test_rsa_forward_backward_compiled_memory_grows_linearly():
    """The estimate and the pooled branch are chunked: nothing `T x S/b` is kept, so 4x the length
    costs about 4x the memory (it was 10.5x from 16K to 64K when both held such tensors)."""
    small, large = _compiled_bytes(_rsa, 8192), _compiled_bytes(_rsa, 32768)
    assert large <= 4.5 * small, f"{small / 1e6:.0f} MB at 8K, {large / 1e6:.0f} MB at 32K"


def test_fidelity_is_positive_when_approximate_and_the_regulariser_has_gradients():
    q, k, v = random_qkv(jax.random.key(6), T=T)
    c = _small("rsa")
    c.selection.top_k = 0

    def loss(q, k):
        aux = attend(q, k, v, c, rng=jax.random.key(0))[1]
        return aux["aux_loss"], aux

    # one compiled program for the values and the gradients (eager dispatch op by op is slower)
    (_, aux), (gq, gk) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(q, k)
    assert float(aux["fidelity"]) > 1e-3
    assert float(aux["aux_loss"]) == pytest.approx(c.correction.aux_weight * float(aux["fidelity"]), rel=1e-5)
    assert float(jnp.max(jnp.abs(gk))) > 0


def test_correction_off_measures_fidelity_but_trains_no_regulariser():
    """The ablation's naive sum (and selection or compression alone) keep the preset's
    `aux_weight`: with correction off it must not reach the loss."""
    q, k, v = random_qkv(jax.random.key(6), T=T)
    c = _small("rsa")
    c.correction.enabled = False
    assert c.correction.aux_weight > 0
    aux = attend(q, k, v, c, rng=jax.random.key(0))[1]
    assert float(aux["fidelity"]) > 1e-3 and float(aux["aux_loss"]) == 0.0


def test_registries_carry_capability_flags():
    assert not COMPRESSIONS.get("linformer").supports_causal and COMPRESSIONS.get("linformer").fixed_length
    assert COMPRESSIONS.get("pool").exact_when_full and COMPRESSIONS.get("pool").supports_exclusion
    assert set(ESTIMATORS.names()) >= {"pooled", "bound", "sampled", "oracle"}
