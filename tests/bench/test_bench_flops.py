"""FLOP counting against hand counts: `4 * D` per computed query-key pair, backward = 2x forward."""

from __future__ import annotations

import pytest

from sparseformer.bench import methods

B, T, H, D = 2, 4096, 4, 64


def test_bench_dense_baseline_counts_the_full_square() -> None:
    for causal in (False, True):  # XLA computes the full square even when causal
        counted = methods.dense_flops(methods.Shape(B, T, H, D, causal))
        assert counted["exact"] == counted["total"] == 4 * B * H * T * T * D


def test_backward_counts_twice_the_forward() -> None:
    m = methods.build("dense", methods.Shape(1, 256, 2, 16))
    fwd, _ = methods.pass_flops(m, "fwd")
    both, exact = methods.pass_flops(m, "fwd_bwd")
    assert both == exact == 3 * fwd == 3 * 4 * 256 * 256 * 2 * 16


attention = pytest.importorskip("sparseformer.attention")


def _count(name: str, causal: bool) -> tuple[dict, object]:
    config = attention.presets.get(name)
    got = attention.flops(config, batch=B, q_len=T, kv_len=T, heads=H, head_dim=D, causal=causal)
    return got, config


@pytest.mark.parametrize("causal", [False, True])
def test_dense_preset(causal: bool) -> None:
    got, _ = _count("dense", causal)
    assert got["exact"] == got["total"] == 4 * B * H * T * T * D


@pytest.mark.parametrize("causal", [False, True])
def test_local(causal: bool) -> None:
    got, c = _count("local", causal)
    w, b = c.selection.window, c.selection.block_size
    blocks = (w + 1) if causal else (2 * w + 1)  # the query block's own block and w on each (past) side
    assert got["exact"] == 4 * B * H * T * blocks * b * D
    assert got["total"] == got["exact"]


@pytest.mark.parametrize("causal", [False, True])
def test_rsa(causal: bool) -> None:
    got, c = _count("rsa", causal)
    s = c.selection
    blocks = ((s.window + 1) if causal else (2 * s.window + 1)) + s.global_blocks + s.random_blocks + s.top_k
    if not causal:
        assert blocks == 8  # the documented budget: 3 window + 1 global + 4 top-k
    assert got["exact"] == 4 * B * H * T * blocks * s.block_size * D
    parts = sum(v for k, v in got.items() if k not in ("total", "uncounted") and isinstance(v, int))
    assert got["total"] == parts > got["exact"]
    assert got["exact"] <= 4 * B * H * T * T * D / 8  # 512 of 4096 keys per query


def test_harness_uses_the_attention_count() -> None:
    m = methods.build("rsa", methods.Shape(B, T, H, D))
    got, _ = _count("rsa", False)
    assert m.flops["exact"] == got["exact"] and m.flops["total"] == got["total"]


@pytest.mark.parametrize("causal", [False, True])
def test_a_budget_past_the_key_blocks_counts_dense_attention(causal: bool) -> None:
    """Where rsa's 8-block budget exceeds the 4 key blocks, `attend` computes them all with dense
    attention (no estimate, no compressed branch): the count is dense's, and every block a slot."""
    config = attention.presets.get("rsa")
    L = 4 * config.selection.block_size
    got = attention.flops(config, batch=B, q_len=L, kv_len=L, heads=H, head_dim=D, causal=causal)
    assert got == {"exact": 4 * B * H * L * L * D, "estimator": 0, "compression": 0, "correction": 0,
                   "total": 4 * B * H * L * L * D}
    assert attention.slots_per_query_block(config, num_key_blocks=4, causal=causal) == 4
