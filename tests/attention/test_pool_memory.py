"""The pooled branch (`compression.pool`) computed flash-style in chunks equals plain autodiff of the
one-shot softmax over the summary tokens (outputs, log-sum-exp and gradients), and its backward pass
keeps nothing `T x nc` and no float32 copy of the keys."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src import ad_checkpoint

from sparseformer.attention import compression, presets
from sparseformer.attention.dense import LOG0, masked_softmax
from sparseformer.attention.registry import COMPRESSIONS
from sparseformer.attention.selection import Selection
from tests.attention.helpers import rel_error

B, H, T, D, P, BLOCK = 2, 2, 64, 8, 4, 8  # 16 summary tokens of 4 keys; selection blocks of 8


def _config(moments: bool):
    c = presets.get("rsa")
    c.selection.block_size = BLOCK
    c.compression.update(enabled=True, kind="pool", block_size=P, pool_moments=moments)
    return c


def _reference(q, k, v, kv_mask, q_pos, *, causal, moments, sel):
    """The pooled branch written out in one shot with plain jnp (what autodiff differentiates)."""
    kc = k.reshape(B, H, T // P, P, D).astype(jnp.float32)
    vc = v.reshape(B, H, T // P, P, D).astype(jnp.float32)
    w = jnp.ones((B, 1, T // P, P, 1)) if kv_mask is None else kv_mask.reshape(B, 1, T // P, P, 1).astype(jnp.float32)
    cnt = jnp.sum(w, (3, 4))
    safe = jnp.maximum(cnt, 1.0)[..., None]
    k_mean, v_mean = jnp.sum(kc * w, 3) / safe, jnp.sum(vc * w, 3) / safe
    var = jnp.maximum(jnp.sum(jnp.square(kc) * w, (3, 4)) / (safe[..., 0] * D) - jnp.mean(jnp.square(k_mean), -1), 0.0)
    s = jnp.einsum("bhtd,bhcd->bhtc", q, k_mean) + jnp.log(safe[..., 0])[:, :, None, :]
    if moments:
        s = s + 0.5 * jnp.sum(jnp.square(q), -1)[..., None] * var[:, :, None, :]
    mask = cnt[:, :, None, :] > 0
    if causal:
        mask = mask & (((jnp.arange(T // P) + 1) * P - 1)[None, :] <= q_pos[:, None])[None, None]
    if sel is not None:
        mask = mask & ~jnp.repeat(sel.rows_block_mask(jnp.arange(T)), BLOCK // P, axis=-1)
    return masked_softmax(s, mask, v_mean, "bhtc,bhcd->bhtd")


def _selection(causal: bool, row_start: bool) -> Selection:
    rng = np.random.default_rng(3)
    n = T // BLOCK
    idx = rng.integers(0, n, size=(B, H, n, 3))
    if causal:
        idx = np.minimum(idx, np.arange(n)[:, None])
    idx[..., 0] = np.arange(n)
    valid = np.ones(idx.shape, bool)
    valid[..., 1:] &= idx[..., 1:] != idx[..., :1]
    valid[..., 2] &= idx[..., 2] != idx[..., 1]
    start = None
    if row_start:
        start = rng.integers(0, BLOCK, size=idx.shape)
        start[..., 0] = 0
        start = jnp.asarray(start, jnp.int32)
    return Selection(idx=jnp.asarray(idx, jnp.int32), valid=jnp.asarray(valid), qids=jnp.arange(n),
                     block_size=BLOCK, num_key_blocks=n, row_start=start)


def _inputs():
    kq, kk, kv, kw = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(kq, (B, H, T, D)) * 0.6
    k = jax.random.normal(kk, (B, H, T, D)) * 1.5 + jnp.arange(T)[:, None] % 3
    v = jax.random.normal(kv, (B, H, T, D))
    return q, k, v, jax.random.normal(kw, (B, H, T, D)), jax.random.normal(kw, (B, H, T))


def _values_and_grads(fn, q, k, v, w_out, w_lse):
    def loss(q, k, v):
        out, lse = fn(q, k, v)
        return jnp.sum(out * w_out) + jnp.sum(jnp.where(lse > LOG0 / 2, lse, 0.0) * w_lse), (out, lse)

    (_, (out, lse)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, lse, grads


def _pool(config, kv_mask, q_pos, causal, sel):
    fn = COMPRESSIONS.get("pool").fn

    def f(q, k, v):
        branch, _ = fn(q, k, v, kv_mask, q_pos=q_pos, causal=causal, config=config, params={}, rng=None, sel=sel)
        return branch.num, branch.ls

    return f


CASES = [  # causal, padded, exclusion ("rows": a Selection with per-row slots), moments
    (False, False, None, True),
    (True, False, None, True),
    (False, True, None, True),
    (True, True, "blocks", False),
    (False, False, "rows", True),
    (True, False, "rows", True),
    (False, True, "blocks", False),
]


@pytest.mark.parametrize("chunks", ["one", "several"])
@pytest.mark.parametrize("causal,padded,exclusion,moments", CASES)
def test_pool_equals_one_shot_autodiff(monkeypatch, chunks, causal, padded, exclusion, moments):
    # 64 rows x 16 summaries: one chunk, or chunks of 12 rows (0.38 * 64 * 8 / 16), the last one overlapping
    monkeypatch.setattr(compression, "POOL_CHUNK_SHARE", 8.0 if chunks == "one" else 0.38)
    assert compression.pool_chunk_rows(T, T // P, D) == (T if chunks == "one" else 12)
    q, k, v, w_out, w_lse = _inputs()
    kv_mask = jnp.ones((B, T), bool).at[1, 40:].set(False).at[0, 8:12].set(False) if padded else None
    sel = None if exclusion is None else _selection(causal, exclusion == "rows")
    q_pos = jnp.arange(T)
    ref = _values_and_grads(
        lambda q, k, v: _reference(q, k, v, kv_mask, q_pos, causal=causal, moments=moments, sel=sel), q, k, v, w_out, w_lse)
    got = _values_and_grads(_pool(_config(moments), kv_mask, q_pos, causal, sel), q, k, v, w_out, w_lse)
    assert rel_error(got[0], ref[0]) < 1e-6
    np.testing.assert_allclose(np.asarray(got[1]), np.asarray(ref[1]), rtol=1e-6, atol=1e-6)
    for a, b in zip(got[2], ref[2]):
        assert rel_error(a, b) < 1e-5
    if causal:  # the first 3 rows see no summary that has ended: zeros and LOG0, not NaN
        assert np.all(np.asarray(got[0][:, :, :3]) == 0.0) and np.all(np.asarray(got[1][:, :, :3]) == LOG0)


@pytest.mark.parametrize("padded", [False, True])
def test_pool_reading_the_public_layout_equals_head_major(monkeypatch, padded):
    """What attend passes (`public`: unscaled `[B, T, H, D]` queries, `[B, S, Hk, D]` keys and values,
    one key/value head for two query heads here) gives the head-major branch's values and gradients."""
    monkeypatch.setattr(compression, "POOL_CHUNK_SHARE", 0.38)  # several chunks, the last overlapping
    q, k, v, w_out, w_lse = _inputs()
    k, v = k[:, ::2], v[:, ::2]  # [B, H / 2, T, D]
    kv_mask = jnp.ones((B, T), bool).at[1, 40:].set(False) if padded else None
    scale = 0.7
    fn, config, q_pos = COMPRESSIONS.get("pool").fn, _config(True), jnp.arange(T)

    def public(q, k, v):  # the same arrays in the caller's layout
        pub = compression.Public(*(jnp.swapaxes(x, 1, 2) for x in (q, k, v)), scale)
        br, _ = fn(None, None, None, kv_mask, q_pos=q_pos, causal=True, config=config, params={}, rng=None, sel=None,
                   public=pub)
        return br.num, br.ls

    def head_major(q, k, v):
        k, v = (jnp.repeat(x, 2, axis=1) for x in (k, v))
        return _pool(config, kv_mask, q_pos, True, None)(q * scale, k, v)

    got = _values_and_grads(public, q, k, v, w_out, w_lse)
    ref = _values_and_grads(head_major, q, k, v, w_out, w_lse)
    assert rel_error(got[0], ref[0]) < 1e-6 and rel_error(got[1], ref[1]) < 1e-6
    for a, b in zip(got[2], ref[2]):
        assert rel_error(a, b) < 1e-5


def test_pool_bfloat16_gradients_keep_dtypes():
    q, k, v, w_out, w_lse = (x.astype(jnp.bfloat16) for x in _inputs())
    out, lse, grads = _values_and_grads(_pool(_config(True), None, jnp.arange(T), True, None), q, k, v, w_out, w_lse)
    assert out.dtype == jnp.bfloat16 and lse.dtype == jnp.float32  # the output in the inputs' dtype
    assert all(g.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(g.astype(jnp.float32)))) for g in grads)


@pytest.mark.parametrize("causal,padded", [(False, False), (True, True)])
def test_pool_backward_keeps_no_logits_and_no_float32_keys(causal, padded):
    """Tracing only, at a length where the branch runs in one chunk (what the budget gives at 4K):
    every residual is O(T D) or smaller, none has a `T x nc` axis pair, none is float32 of k's size."""
    Tm, Dm, p = 1024, 16, 16  # nc = 64: `[.., T, nc]` and `[.., T, D]` differ
    nc = Tm // p
    q = jnp.zeros((1, 2, Tm, Dm), jnp.bfloat16)
    kv_mask = jnp.ones((1, Tm), bool).at[0, -5:].set(False) if padded else None
    c = presets.get("rsa")
    c.compression.update(enabled=True, kind="pool", block_size=p, pool_moments=True)
    fn = COMPRESSIONS.get("pool").fn

    def loss(q, k, v):  # [B, T, H, D], as attend passes them (`public`): read in place, not copied
        public = compression.Public(q, k, v, Dm**-0.5)
        head_major = [jnp.swapaxes(x, 1, 2) for x in (q, k, v)]  # unused when `public` is given
        br, _ = fn(*head_major, kv_mask, q_pos=jnp.arange(Tm), causal=causal, config=c, params={}, rng=None, sel=None,
                   public=public)
        return jnp.sum(br.num) + jnp.sum(br.ls)

    q = jnp.swapaxes(q, 1, 2)
    kept = [(aval, why) for aval, why in ad_checkpoint.saved_residuals(loss, q, q, q) if not why.startswith("from the argument")]
    assert kept  # the summaries, the output and its log-sum-exp at least
    for aval, why in kept:
        shape = tuple(aval.shape)
        assert not any(a == Tm and b == nc for a, b in zip(shape, shape[1:])), (aval, why)
    big_f32 = [(aval, why) for aval, why in kept if aval.dtype == jnp.float32 and aval.size >= q.size]
    assert not big_f32, big_f32  # the output is kept in the inputs' dtype; no float32 copy of k
    total = sum(aval.size * aval.dtype.itemsize for aval, _ in kept)
    assert total < q.size * 4, total  # less than a float32 output alone: the bfloat16 output, lse, the summaries
