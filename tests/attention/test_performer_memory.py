"""The Performer branch (`compression.performer`, Scatterbrain's compression) computed over chunks of
rows with its own VJP equals plain autodiff of the one-shot FAVOR+ formulas it replaced (outputs,
denominators, log scales and gradients), bidirectional and causal, with padding, Scatterbrain's
exclusion, grouped-query heads and decoding."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparseformer.attention import compression, presets
from sparseformer.attention.dense import LOG0
from sparseformer.attention.registry import COMPRESSIONS
from sparseformer.attention.selection import Selection, to_blocks
from tests.attention.helpers import rel_error

B, H, T, D, R, BLOCK = 2, 2, 64, 8, 16, 8  # 8 blocks of 8 rows, 16 random features


def _config():
    c = presets.get("scatterbrain")
    c.selection.block_size = BLOCK
    c.compression.rank = R
    return c


# ---- the one-shot formulas (the code before the chunked branch), differentiated by JAX


def _favor(x, w, mask=None, *, per_row, causal=False):
    proj = jnp.einsum("bhtd,rd->bhtr", x.astype(jnp.float32), w)
    logphi = proj - 0.5 * jnp.sum(jnp.square(x.astype(jnp.float32)), -1, keepdims=True)
    if mask is not None:
        logphi = jnp.where(mask[:, None, :, None], logphi, LOG0)
    if causal and not per_row:
        stab = jnp.full((1, 1, 1, 1), 0.5 * jnp.max(jnp.sum(jnp.square(w), -1)), jnp.float32)
    else:
        stab = jax.lax.stop_gradient(jnp.max(logphi, axis=(-1,) if per_row else (-2, -1), keepdims=True))
    phi = jnp.exp(logphi - stab) / math.sqrt(w.shape[0])
    if mask is not None:
        phi = jnp.where(mask[:, None, :, None], phi, 0.0)
    return phi, stab


def _causal_linear(phq, phk, v, q_pos, c):
    kc, vc = to_blocks(phk, c), to_blocks(v, c)
    state = jnp.einsum("bhncr,bhncd->bhnrd", kc, vc)
    shift = lambda x: jnp.concatenate([jnp.zeros_like(x[:, :, :1]), jnp.cumsum(x, 2)[:, :, :-1]], 2)  # noqa: E731
    prefix, zprefix = shift(state), shift(jnp.sum(kc, 3))
    qc, chunk = to_blocks(phq, c), q_pos[::c] // c
    num = jnp.einsum("bhncr,bhnrd->bhncd", qc, prefix[:, :, chunk])
    den = jnp.einsum("bhncr,bhnr->bhnc", qc, zprefix[:, :, chunk])
    a = jnp.einsum("bhncr,bhnkr->bhnck", qc, kc[:, :, chunk]) * jnp.tril(jnp.ones((c, c)))
    num = num + jnp.einsum("bhnck,bhnkd->bhncd", a, vc[:, :, chunk])
    Tq = phq.shape[2]
    return num.reshape(B, -1, Tq, v.shape[-1]), (den + jnp.sum(a, -1)).reshape(B, -1, Tq)


def _reference(q, k, v, kv_mask, q_pos, *, causal, sel, rng):
    """q `[B, H, T, D]` scaled, k, v head-major (repeated to the query heads)."""
    w = compression.orthogonal_features(rng, R, D)
    phq, sq = _favor(q * D**0.25, w, per_row=True)
    phk, sk = _favor(k * D**-0.25, w, kv_mask, per_row=False, causal=causal)
    vf = v.astype(jnp.float32)
    if not causal:
        num = jnp.einsum("bhtr,bhrd->bhtd", phq, jnp.einsum("bhsr,bhsd->bhrd", phk, vf))
        den = jnp.einsum("bhtr,bhr->bht", phq, jnp.sum(phk, 2))
    else:
        num, den = _causal_linear(phq, phk, vf, q_pos, BLOCK)
    if sel is not None:
        num_x, den_x = compression._subtract_on_support(phq, phk, v, kv_mask, sel, causal)
        num, den = num - num_x, den - den_x
    return num, den, sq[..., 0] + sk[..., 0]


# ----


def _selection(causal, row_start, heads=H, qids=None):
    rng = np.random.default_rng(3)
    n = T // BLOCK
    qids = np.arange(n) if qids is None else np.asarray(qids)
    idx = rng.integers(0, n, size=(B, heads, len(qids), 3))
    if causal:
        idx = np.minimum(idx, qids[:, None])
    idx[..., 0] = qids
    valid = np.ones(idx.shape, bool)
    valid[..., 1:] &= idx[..., 1:] != idx[..., :1]
    valid[..., 2] &= (idx[..., 2] != idx[..., 1]) & (rng.random(idx.shape[:-1]) < 0.7)
    start = None
    if row_start:
        start = rng.integers(0, BLOCK, size=idx.shape)
        start[..., 0] = 0
        start = jnp.asarray(start, jnp.int32)
    return Selection(idx=jnp.asarray(idx, jnp.int32), valid=jnp.asarray(valid), qids=jnp.asarray(qids, jnp.int32),
                     block_size=BLOCK, num_key_blocks=n, row_start=start)


def _inputs(Tq=T, Hk=H):
    kq, kk, kv, kw = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(kq, (B, H, Tq, D)) * 0.6
    k = jax.random.normal(kk, (B, Hk, T, D)) * 0.9 + (jnp.arange(T)[:, None] % 3) * 0.3
    v = jax.random.normal(kv, (B, Hk, T, D))
    return q, k, v, jax.random.normal(kw, (B, H, Tq, D)), jax.random.normal(kw, (B, H, Tq))


def _values_and_grads(fn, q, k, v, w_num, w_den):
    def loss(q, k, v):
        num, den, ls = fn(q, k, v)
        return jnp.sum(num * w_num) + jnp.sum(den * w_den) + jnp.sum(ls), (num, den, ls)

    (_, outs), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return outs, grads


def _assert_equal(got, ref):
    for a, b in zip(got[0] + got[1], ref[0] + ref[1]):
        assert a.shape == b.shape and np.all(np.isfinite(np.asarray(a)))
        assert rel_error(a, b) < 2e-5


def _branch(kv_mask, q_pos, causal, sel, rng, public_scale=None):
    fn, config = COMPRESSIONS.get("performer").fn, _config()

    def f(q, k, v):
        kw = {}
        if public_scale is not None:  # what attend passes: unscaled [B, T, H, D], [B, S, Hk, D]
            kw["public"] = compression.Public(*(jnp.swapaxes(x, 1, 2) for x in (q / public_scale, k, v)), public_scale)
        br, _ = fn(q, k, v, kv_mask, q_pos=q_pos, causal=causal, config=config, params={}, rng=rng, sel=sel, **kw)
        return br.num, br.den, jnp.broadcast_to(br.ls, br.den.shape)

    return f


def _check(q, k, v, w_num, w_den, kv_mask, q_pos, *, causal, sel, public_scale=None, ref_kv=lambda x: x):
    """The chunked branch against the one-shot formulas (keys and values through `ref_kv` for them)."""
    rng = jax.random.key(4)
    ref = _values_and_grads(
        lambda q, k, v: _reference(q, ref_kv(k), ref_kv(v), kv_mask, q_pos, causal=causal, sel=sel, rng=rng),
        q, k, v, w_num, w_den)
    got = _values_and_grads(_branch(kv_mask, q_pos, causal, sel, rng, public_scale), q, k, v, w_num, w_den)
    _assert_equal(got, ref)
    return got


CASES = [  # chunks, causal, padded, exclusion ("rows": slots that serve only some rows of a block)
    (4, False, False, None), (4, True, False, None), (4, False, True, "blocks"), (4, True, True, "blocks"),
    (4, False, False, "rows"), (4, True, True, "rows"), (1, False, True, "blocks"), (1, True, True, "rows"),
]


@pytest.mark.parametrize("chunks,causal,padded,exclusion", CASES)
def test_performer_equals_one_shot_autodiff(monkeypatch, chunks, causal, padded, exclusion):
    # 64 rows in one chunk, or in 4 chunks of 16 (one row per feature)
    monkeypatch.setattr(compression, "PERFORMER_ROWS_PER_FEATURE", 4 if chunks == 1 else 1)
    assert compression.performer_chunk_rows(T, R, BLOCK) == T // chunks
    q, k, v, w_num, w_den = _inputs()
    kv_mask = jnp.ones((B, T), bool).at[1, 40:].set(False).at[0, 8:12].set(False) if padded else None
    sel = None if exclusion is None else _selection(causal, exclusion == "rows")
    _check(q, k, v, w_num, w_den, kv_mask, jnp.arange(T), causal=causal, sel=sel)


@pytest.mark.parametrize("causal", [False, True])
def test_performer_reading_the_public_layout_with_grouped_heads(monkeypatch, causal):
    """What attend passes (unscaled queries, one key/value head for two query heads) gives the
    head-major one-shot values and gradients; every key padded in one batch row gives zeros, not NaN."""
    monkeypatch.setattr(compression, "PERFORMER_ROWS_PER_FEATURE", 1)
    q, k, v, w_num, w_den = _inputs(Hk=1)
    kv_mask = jnp.ones((B, T), bool).at[1].set(False)
    sel = _selection(causal, False)
    got = _check(q, k, v, w_num, w_den, kv_mask, jnp.arange(T), causal=causal, sel=sel, public_scale=0.7,
                 ref_kv=lambda x: jnp.repeat(x, H, axis=1))
    assert np.all(np.asarray(got[0][0][1]) == 0.0) and np.all(np.asarray(got[0][1][1]) == 0.0)


def test_performer_decoding_one_block_equals_the_full_pass_rows():
    """Causal decoding (`q_pos` one block from the middle, every earlier key summarised in chunks):
    the one-shot formulas on the same rows."""
    first = 3 * BLOCK
    q, k, v, w_num, w_den = _inputs(Tq=BLOCK)
    sel = _selection(True, True, qids=[3])
    _check(q, k, v, w_num, w_den, None, first + jnp.arange(BLOCK), causal=True, sel=sel)


@pytest.mark.parametrize("padded", [False, True])
def test_performer_with_chunks_that_do_not_divide_the_length(monkeypatch, padded):
    """Without a block to respect (bidirectional, no exclusion), 61 query rows and 45 keys (primes
    and their neighbours would otherwise give chunks of one row) run in chunks of 16, the last
    overlapping the one before: every row and key counted once, in values and gradients."""
    monkeypatch.setattr(compression, "PERFORMER_ROWS_PER_FEATURE", 1)
    Tq, S = 61, 45
    assert compression.performer_chunk_rows(Tq, R) == 16 and compression.performer_chunk_rows(S, R) == 16
    kq, kk, kv, kw = jax.random.split(jax.random.key(1), 4)
    q = jax.random.normal(kq, (B, H, Tq, D)) * 0.6
    k = jax.random.normal(kk, (B, H, S, D)) * 0.9 + (jnp.arange(S)[:, None] % 3) * 0.3
    v = jax.random.normal(kv, (B, H, S, D))
    w_num, w_den = jax.random.normal(kw, (B, H, Tq, D)), jax.random.normal(kw, (B, H, Tq))
    kv_mask = jnp.ones((B, S), bool).at[1, 40:].set(False) if padded else None
    _check(q, k, v, w_num, w_den, kv_mask, jnp.arange(Tq), causal=False, sel=None, public_scale=0.5)
