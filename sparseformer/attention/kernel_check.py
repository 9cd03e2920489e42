"""What the kernel tests (`tests/attention/test_pallas.py`, interpret mode on a CPU) and the GPU
check (`benchmarks/gpu_check.py`, compiled on a GPU) both compare the fused kernel against: a random
`Selection` with the awkward cases in it, and the `scan` kernel in the fused kernel's layout."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sparseformer.attention.selection import Selection, block_sparse_attention, to_blocks


def random_selection(rng: np.random.Generator, *, B: int, Hk: int, G: int, n: int, K: int, b: int, causal: bool,
                     row_starts: bool, p_valid: float) -> Selection:
    """`K` slots per query block and key head, each valid with probability `p_valid`: slot 0 the
    diagonal block, slot 1 block 0 (every query block chose it: a long inverted list), repeats
    made invalid (distinct blocks only), causal choices in the past, and with `row_starts` a random
    first row per slot; one choice per group of `G` query heads."""
    idx = rng.integers(0, n, size=(B, Hk, n, K))
    if causal:
        idx = np.minimum(idx, np.arange(n)[:, None])
    idx[..., 0] = np.arange(n)
    idx[..., 1] = 0
    valid = rng.random(idx.shape) < p_valid
    valid[..., 0] = True
    for j in range(1, K):
        valid[..., j] &= ~np.any((idx[..., :j] == idx[..., j : j + 1]) & valid[..., :j], -1)
    start = None
    if row_starts:
        start = rng.integers(0, b, size=idx.shape)
        start[..., 0] = 0
    rep = lambda x: None if x is None else jnp.asarray(np.repeat(x, G, axis=1), jnp.int32)  # noqa: E731
    return Selection(idx=rep(idx), valid=jnp.asarray(np.repeat(valid, G, axis=1)), qids=jnp.arange(n),
                     block_size=b, num_key_blocks=n, row_start=rep(start), group=G)


def scan_block_attention(causal: bool, q_BHTD: jax.Array, k_BHkSD: jax.Array, v_BHkSD: jax.Array,
                         sel: Selection, kv_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """The `scan` kernel with `fused_block_attention`'s arguments and outputs (`[B, H, T, D]`,
    `[B, H, T]`): keys and values repeated over each group's query heads."""
    B, H, T, D = q_BHTD.shape
    b, G = sel.block_size, H // k_BHkSD.shape[1]
    kr, vr = jnp.repeat(k_BHkSD, G, axis=1), jnp.repeat(v_BHkSD, G, axis=1)
    kmask_b = None if kv_mask is None else kv_mask.reshape(B, kv_mask.shape[1] // b, b)
    out, lse = block_sparse_attention(causal, to_blocks(q_BHTD, b), to_blocks(kr, b), to_blocks(vr, b),
                                      sel.idx, sel.valid, sel.row_start, kmask_b, sel.qids)
    return out.reshape(B, H, T, D), lse.reshape(B, H, T)
