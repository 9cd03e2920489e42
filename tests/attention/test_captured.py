"""`aux["captured"]`: the share of the approximate attention's mass computed exactly (and the
per-head `captured_heads`, `fidelity_heads`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparseformer.attention import attend, presets


def _qkv(T=64, H=2, D=8, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    return tuple(jax.random.normal(k, (1, T, H, D)) for k in keys)


def _pool_config(window: int, block: int = 16):
    c = presets.get("rsa")
    c.selection.update(window=window, global_blocks=0, top_k=0, block_size=block)
    c.compression.pool_moments = False
    return c


@pytest.mark.parametrize("causal", [False, True])
def test_full_budget_captures_everything(causal):
    q, k, v = _qkv()
    c = _pool_config(window=3)  # 4 blocks of 16: the window covers every block
    _, aux = attend(q, k, v, c, causal=causal)
    np.testing.assert_allclose(np.asarray(aux["captured_heads"]), 1.0, rtol=1e-6)
    assert float(aux["captured"]) == pytest.approx(1.0, rel=1e-6)
    assert aux["fidelity_heads"].shape == (2,)
    assert float(aux["fidelity"]) == pytest.approx(float(jnp.mean(aux["fidelity_heads"])), abs=1e-9)


@pytest.mark.parametrize("window, expected", [(0, 0.25), (1, 0.75)])
def test_planted_uniform_keys_give_the_selected_share(window, expected):
    # every logit is 0: each key weighs 1, a pooled block stands for its 16 keys with weight 16,
    # so the exact part holds (selected blocks / all blocks) of the mass (edges slide inwards)
    q, _, v = _qkv()
    k = jnp.zeros_like(q)
    _, aux = attend(q, k, v, _pool_config(window=window))
    np.testing.assert_allclose(np.asarray(aux["captured_heads"]), expected, rtol=1e-5)


def test_padded_rows_do_not_count():
    q, _, v = _qkv()
    k = jnp.zeros_like(q)
    mask = jnp.arange(64)[None] < 32  # two real blocks of 16: window 0 keeps one of two
    _, aux = attend(q, k, v, _pool_config(window=0), kv_mask=mask)
    assert float(aux["captured"]) == pytest.approx(0.5, rel=1e-5)


def test_dense_selection_alone_and_compression_alone():
    q, k, v = _qkv()
    for name, expected in (("dense", 1.0), ("local", 1.0), ("performer", 0.0)):
        c = presets.get(name)
        c.selection.block_size = 16
        c.compression.rank = 16
        _, aux = attend(q, k, v, c, rng=None)
        assert float(aux["captured"]) == expected, name


def test_gated_sum_shares_are_the_gates():
    q, k, v = _qkv()
    c = presets.get("nsa")
    c.selection.update(block_size=16, window=1, global_blocks=0, top_k=0)
    gate = jnp.log(jnp.asarray([[3.0, 1.0], [1.0, 1.0]]))  # sigmoid logits -> gates 0.75/0.5 and 0.5/0.5
    _, aux = attend(q, k, v, c, params={"gate": gate})
    np.testing.assert_allclose(np.asarray(aux["captured_heads"]), [0.75 / 1.25, 0.5], rtol=1e-5)
