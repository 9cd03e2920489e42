"""The regulariser and the fidelity metric evaluated over chunks of keys: the same values and
gradients as one call, the same KL as a direct dense computation, and nothing `aux_rows x S` kept
for the backward pass."""

import jax
import jax.numpy as jnp
import pytest

from sparseformer.attention import attend, compose, init_params, presets
from sparseformer.bench import methods, residuals
from tests.attention.helpers import random_qkv, rel_error

T, B, R = 64, 8, 8


def _config(name):
    if name in ("linformer+sel", "nystrom+sel"):  # a low-rank compression under selection, correction on
        c = presets.get("rsa")
        c.compression.update(kind=name.split("+")[0], rank=8)
        c.correction.exclusion = name == "nystrom+sel"  # linformer cannot leave blocks out
    else:
        c = presets.get(name.split("_")[0])
    c.selection.update(block_size=B, kernel="scan", top_k=min(c.selection.top_k, 2),
                       random_blocks=min(c.selection.random_blocks, 1), global_blocks=min(c.selection.global_blocks, 1),
                       window=min(c.selection.window, 1))
    if c.compression.kind == "performer":
        c.compression.rank = 16
    if name == "nsa_uncorrected":  # the naive sum (correction off): fidelity measured, no regulariser
        c.correction.update(enabled=False, gate=False)
    c.correction.update(aux_rows=R, aux_weight=0.3)
    return c


def _aux_and_grads(c, causal, padded):
    q, k, v = random_qkv(jax.random.key(3), T=T, H=2, D=8)
    kv_mask = jnp.ones((2, T), bool).at[1, 45:].set(False) if padded else None
    params = init_params(c, jax.random.key(7), num_heads=2, head_dim=8, max_len=T)
    params = jax.tree.map(lambda p: p + 0.5 * jax.random.normal(jax.random.key(9), p.shape), params)  # gates off 1/2

    def loss(q, k, v, params):
        aux = attend(q, k, v, c, params=params, causal=causal, kv_mask=kv_mask, rng=jax.random.key(5))[1]
        return aux["aux_loss"], aux

    (_, aux), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(q, k, v, params)
    return {n: aux[n] for n in ("aux_loss", "fidelity", "fidelity_heads")}, grads


CASES = [("rsa", False, True), ("rsa", True, False), ("rsa", True, True), ("nsa", False, False), ("nsa", True, True),
         ("scatterbrain", False, True), ("scatterbrain", True, False), ("linformer+sel", False, True),
         ("nystrom+sel", False, True), ("nsa_uncorrected", True, True)]


@pytest.mark.parametrize("name,causal,padded", CASES)
def test_chunks_of_keys_equal_one_call(monkeypatch, name, causal, padded):
    c = _config(name)
    assert compose.fidelity_chunk(R, T) == T  # tiny inputs: one call
    aux1, g1 = _aux_and_grads(c, causal, padded)
    # 24 keys a chunk: 3 chunks, the last overlapping the second (24 does not divide 64)
    monkeypatch.setattr(compose, "FIDELITY_CHUNK_ELEMENTS", R * 24)
    assert compose.fidelity_chunk(R, T) == 24
    aux2, g2 = _aux_and_grads(c, causal, padded)
    assert float(aux1["fidelity"]) > 1e-3
    for n in ("fidelity", "fidelity_heads"):
        assert rel_error(aux2[n], aux1[n]) < 1e-5, n
    assert float(aux2["aux_loss"]) == pytest.approx(float(aux1["aux_loss"]), rel=1e-5)  # 0 without correction
    # Nystrom's pseudo-inverse amplifies rounding; Linformer's effective weights cross zero (a 1e-7
    # relative change of q moves its gradients by 6e-3), so the chunks' own matmul rounding shows
    tol = {"nystrom+sel": 1e-4, "linformer+sel": 2e-3}.get(name, 1e-5)
    for a, b in zip(jax.tree.leaves(g2), jax.tree.leaves(g1)):  # dv is zero: aux_loss does not read v
        assert float(jnp.linalg.norm(a - b)) <= tol * float(jnp.linalg.norm(b))
    trained = c.correction.enabled
    assert (float(jnp.max(jnp.abs(g1[1]))) > 0) == trained  # the regulariser trains only with correction on
    if c.correction.gate:
        assert float(jnp.max(jnp.abs(g1[3]["gate"]))) > 0


@pytest.mark.parametrize("name,causal,padded", [("rsa", False, True), ("rsa", True, True), ("nsa", False, False)])
def test_fidelity_is_the_kl_from_dense_rows_to_the_attention_computed(monkeypatch, name, causal, padded):
    """With one-hot values (`v[s] = e_s`, `D = S`) the output rows are the approximate attention
    rows themselves: fidelity must be the KL from dense softmax rows to those (normalised: NSA's
    gated sum need not sum to one), with log-probabilities floored at `LOG_FLOOR`."""
    from sparseformer.attention.correction import LOG_FLOOR

    monkeypatch.setattr(compose, "FIDELITY_CHUNK_ELEMENTS", R * 24)
    c = _config(name)
    q, k, _ = random_qkv(jax.random.key(4), T=T, H=2, D=T)
    v = jnp.broadcast_to(jnp.eye(T)[None, :, None, :], (2, T, 2, T))
    kv_mask = jnp.ones((2, T), bool).at[1, 45:].set(False) if padded else None
    params = init_params(c, jax.random.key(7), num_heads=2, head_dim=T, max_len=T)
    out, aux = jax.jit(lambda q, k, v: attend(q, k, v, c, params=params, causal=causal, kv_mask=kv_mask))(q, k, v)
    rows = (jnp.arange(R) * T) // R + (T // R) // 2  # the fixed rows (rng=None)
    approx = jnp.swapaxes(out[:, rows], 1, 2)  # [B, H, R, S]
    approx = approx / jnp.sum(approx, -1, keepdims=True)
    s = jnp.einsum("bthd,bshd->bhts", q[:, rows], k) / jnp.sqrt(T)
    keys = jnp.ones((1, 1, R, T), bool)
    if causal:
        keys = keys & (jnp.arange(T)[None, :] <= rows[:, None])
    if padded:
        keys = keys & kv_mask[:, None, None, :]
    p = jax.nn.softmax(jnp.where(keys, s, -jnp.inf), -1)
    logq = jnp.maximum(jnp.log(jnp.maximum(approx, 1e-37)), LOG_FLOOR)
    kl = jnp.sum(jnp.where(p > 0, p * (jnp.log(jnp.where(p > 0, p, 1.0)) - logq), 0.0), -1)  # [B, H, R]
    want = jnp.mean(kl, axis=(0, 2))
    assert float(jnp.min(want)) > 1e-3
    assert rel_error(aux["fidelity_heads"], want) < 2e-4


def test_the_chunk_bounds_the_rows():
    assert compose.fidelity_chunk(16, 65536) * 16 <= compose.FIDELITY_CHUNK_ELEMENTS
    assert compose.fidelity_chunk(16, 1024) == 1024  # short inputs: one call, no loop
    assert compose.fidelity_chunk(1, 7) == 7


@pytest.mark.parametrize("causal", [False, True])
def test_the_regulariser_keeps_no_rows_by_keys_array(causal):
    """Traced with the fused kernel as for a GPU (`sparseformer.bench.residuals`), the training loss
    (with `aux_loss`): no residual has the regulariser's `aux_rows x S` shape (ten of them, about
    20 such float32 arrays' worth, before the keys were chunked)."""
    from jax._src import ad_checkpoint

    from sparseformer.attention.pallas_kernel import compile_for_gpu

    length = 1024
    shape = methods.Shape(1, length, 4, 64, causal=causal, dtype="bfloat16")
    rows = methods.preset_config("rsa").correction.aux_rows
    assert rows > 0
    x = jnp.zeros((1, length, 4, 64), jnp.bfloat16)
    with compile_for_gpu():
        saved = ad_checkpoint.saved_residuals(residuals.loss_fn("rsa", shape, train=True), x, x, x)
    by_rows = [(aval, why) for aval, why in saved if tuple(aval.shape[-2:]) == (rows, length)]
    assert not by_rows, by_rows
    regulariser = sum(aval.size * aval.dtype.itemsize for aval, why in saved if "_fidelity" in why or "kl_" in why
                      or "_rows" in why or "_row_key_mask" in why)
    assert regulariser < 4 * rows * length, regulariser  # one byte per head and row-key pair
