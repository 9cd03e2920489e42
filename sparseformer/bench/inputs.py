"""Benchmark inputs: random tensors for timing, and two kinds of input for fidelity.

- `peaky`: q and k Gaussian, scaled so that the attention logits `q.k / sqrt(D)` have a standard
  deviation of `PEAKY_LOGIT_STD` (3.0), the spread of a trained model's attention logits: each row
  is dominated by its few largest logits, far below the uniform row's entropy. There is no locality,
  so this is the hard, unstructured case for every approximation.
- `needle`: queries come in groups of `NEEDLE_GROUP` (64) consecutive tokens that share a search
  direction; for every group, `NEEDLES_PER_QUERY` (4) keys in distinct, distant key blocks (outside a
  quarter of the sequence around the group, never in the first two blocks, in the past when causal)
  point along that direction. Their logit `log(S) + 1` makes the 4 needles carry about 85% of each
  query row's attention mass whatever the length, so a method that misses them has an error near 1.

Shapes follow `jax.nn.dot_product_attention`: `[B, T, H, D]`. Inputs are built in float32 with numpy
(seeded), so they are identical across presets, processes and machines.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

PEAKY_LOGIT_STD = 3.0
NEEDLE_GROUP = 64
NEEDLES_PER_QUERY = 4
NEEDLE_QUERY_NORM = 8.0  # a query is mostly its group's direction (norm 8) ...
NEEDLE_QUERY_NOISE = 0.3  # ... plus a little per-query noise (per component)
NEEDLE_KEY_STD = 1.0  # background keys: logits against a query have std about 1

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray]


def random_qkv(batch: int, length: int, heads: int, head_dim: int, *, seed: int = 0) -> Arrays:
    """Standard-normal q, k, v `[B, T, H, D]` (float32), the timing inputs."""
    rng = np.random.default_rng(seed)
    shape = (batch, length, heads, head_dim)
    return tuple(rng.standard_normal(shape, dtype=np.float32) for _ in range(3))  # type: ignore[return-value]


def peaky_qkv(batch: int, length: int, heads: int, head_dim: int, *, causal: bool = False, seed: int = 1) -> Arrays:
    """q, k with logit std `PEAKY_LOGIT_STD`, v standard normal (see the module docstring)."""
    del causal  # the same tensors serve both; the causal mask changes only which keys count
    q, k, v = random_qkv(batch, length, heads, head_dim, seed=seed)
    # q.k / sqrt(D) has std a**2 when q, k ~ N(0, a**2): a = sqrt(logit std).
    a = np.float32(np.sqrt(PEAKY_LOGIT_STD))
    return q * a, k * a, v


def needle_positions(length: int, *, causal: bool, seed: int = 2) -> list[np.ndarray]:
    """For each query group, the key positions of its needles (possibly none when causal and early)."""
    rng = np.random.default_rng(seed)
    block = NEEDLE_GROUP
    n_blocks = length // block
    min_gap = max(4, n_blocks // 4)  # in blocks: beyond any window a preset has
    out: list[np.ndarray] = []
    for g in range(n_blocks):
        allowed = [j for j in range(2, n_blocks) if abs(j - g) >= min_gap and (not causal or j < g)]
        if not allowed:
            out.append(np.zeros((0,), np.int64))
            continue
        chosen = rng.choice(allowed, size=min(NEEDLES_PER_QUERY, len(allowed)), replace=False)
        out.append(np.sort(chosen * block + rng.integers(0, block, size=chosen.shape)))
    return out


def needle_qkv(batch: int, length: int, heads: int, head_dim: int, *, causal: bool = False, seed: int = 2) -> Arrays:
    """Queries grouped by direction, with their needles planted far away (see the module docstring)."""
    if length % NEEDLE_GROUP:
        raise ValueError(f"needle inputs need a length that is a multiple of {NEEDLE_GROUP}, got {length}")
    rng = np.random.default_rng(seed)
    n_groups = length // NEEDLE_GROUP
    shape = (batch, length, heads, head_dim)
    dirs_BGHD = rng.standard_normal((batch, n_groups, heads, head_dim)).astype(np.float32)
    dirs_BGHD /= np.linalg.norm(dirs_BGHD, axis=-1, keepdims=True)
    q = np.repeat(dirs_BGHD, NEEDLE_GROUP, axis=1) * NEEDLE_QUERY_NORM
    q += NEEDLE_QUERY_NOISE * rng.standard_normal(shape, dtype=np.float32)
    k = NEEDLE_KEY_STD * rng.standard_normal(shape, dtype=np.float32)
    v = rng.standard_normal(shape, dtype=np.float32)
    # Needle logit q.k/sqrt(D) = NEEDLE_QUERY_NORM * beta / sqrt(D) = log(S) + 1.
    beta = (np.log(length) + 1.0) * np.sqrt(head_dim) / NEEDLE_QUERY_NORM
    for g, positions in enumerate(needle_positions(length, causal=causal, seed=seed)):
        for p in positions:
            k[:, p] = beta * dirs_BGHD[:, g]  # a collision overwrites: the later group owns that key
    return q.astype(np.float32), k.astype(np.float32), v


INPUT_KINDS: dict[str, Callable[..., Arrays]] = {"peaky": peaky_qkv, "needle": needle_qkv}
"""Fidelity input kinds by name; each is `f(batch, length, heads, head_dim, *, causal) -> (q, k, v)`."""
