"""Benchmark inputs: random tensors for timing, and the input kinds fidelity is measured on.

- `peaky`: q and k Gaussian, scaled so that the attention logits `q.k / sqrt(D)` have a standard
  deviation of `PEAKY_LOGIT_STD` (3.0), the spread of a trained model's attention logits: each row
  is dominated by its few largest logits, far below the uniform row's entropy. There is no locality,
  so this is the hard, unstructured case for every approximation.
- `needle`: queries come in groups of `NEEDLE_GROUP` (64) consecutive tokens that share a search
  direction; for every group, `NEEDLES_PER_QUERY` (4) keys in distinct, distant key blocks (outside a
  quarter of the sequence around the group, never in the first two blocks, in the past when causal)
  point along that direction. Their logit `log(S) + 1` makes the 4 needles carry about 85% of each
  query row's attention mass whatever the length, so a method that misses them has an error near 1.
  The groups start exactly at multiples of 64: the input most favourable to blocks of 64 (and, when
  causal, the least favourable to a choice that lags a block).
- `needle_groups`: the same needles, but the groups have random lengths (`GROUP_LENGTHS`, 24-160
  tokens), so group boundaries fall anywhere inside a block and a block of 64 queries often holds two
  or three groups that want different far keys. The 4 needles of a group sit at random offsets (not
  block-aligned) at least `far_gap` tokens away from the group (in its past when causal).
- `topics`: the sequence is cut into segments of random length (`SEGMENT_LENGTHS`, 16-256 tokens),
  each about one of `NUM_TOPICS` (8) topics drawn at random; the queries and keys of a segment share
  its topic direction plus Gaussian noise (per component, std 1), so a query's logit against a key of
  its own topic is about `TOPIC_LOGIT` (3) higher: about three quarters of a row's mass falls on the
  keys of its topic, spread over every segment of that topic along the whole sequence (many blocks,
  most of them partly). Values carry their topic too (a direction per topic, as strong against the
  noise as in the keys), as they do in a model where q, k and v are projections of the same token.
  Real text has this structure: segments of any length, recurring subjects.
- `local`: a quarter of the dimensions of q and k carry a code of the position (cos and sin at
  wavelengths log-uniform in `LOCAL_WAVELENGTHS`, per head), the rest noise, so a key's logit is
  `LOCAL_LOGIT` (8) higher at distance 0 and falls off within a few tokens (about 80% of a row's mass
  within 8 tokens, 86% within 64): a language model's local
  heads. Values are noise. A method must keep the neighbourhood of every query exactly.

Every generator is `f(batch, length, heads, head_dim, *, causal, seed) -> (q, k, v)` in
`[B, T, H, D]` float32, built with numpy from `seed`, so identical across presets, processes and
machines. `INPUT_KINDS` holds the kinds the benchmark reports; `HELD_OUT_SEEDS` are seeds kept aside
to check, at the end, that a method was not tuned to the default seeds.
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
GROUP_LENGTHS = (24, 160)  # needle_groups: group lengths, uniform, inclusive
SEGMENT_LENGTHS = (16, 256)  # topics: segment lengths, uniform, inclusive
NUM_TOPICS = 8
TOPIC_LOGIT = 3.0  # extra logit of a key of the query's own topic
LOCAL_LOGIT = 8.0  # local: extra logit of a key at distance 0, falling off over a few tokens
LOCAL_WAVELENGTHS = (32.0, 1024.0)
HELD_OUT_SEEDS = (1001, 1002, 1003)

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


def random_segments(rng: np.random.Generator, length: int, lo: int, hi: int) -> np.ndarray:
    """Boundaries `[0, e1, e2, ..., length]` of consecutive segments of uniform random length in
    `[lo, hi]` (the last one cut at `length`)."""
    ends = [0]
    while ends[-1] < length:
        ends.append(min(length, ends[-1] + int(rng.integers(lo, hi + 1))))
    return np.asarray(ends)


def needle_positions(length: int, *, causal: bool, seed: int = 2) -> list[np.ndarray]:
    """For each query group of `needle`, the key positions of its needles (possibly none when causal and early)."""
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


def far_gap(length: int) -> int:
    """needle_groups: the least distance, in tokens, from a group to its needles (beyond any window
    a preset has, and a quarter of the sequence at most lengths)."""
    return max(4 * NEEDLE_GROUP, length // 4)


def group_needles(length: int, *, causal: bool, seed: int = 3) -> tuple[np.ndarray, list[np.ndarray]]:
    """`needle_groups`: the group boundaries and, per group, its needle positions (distinct across
    groups; none for an early group with no room in its past when causal)."""
    rng = np.random.default_rng(seed)
    bounds = random_segments(rng, length, *GROUP_LENGTHS)
    gap, lowest = far_gap(length), 2 * NEEDLE_GROUP  # the first two blocks hold no needle
    taken = np.zeros(length, bool)
    out: list[np.ndarray] = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        pos = np.arange(lowest, length)
        far = pos < start - gap if causal else (pos < start - gap) | (pos >= end + gap)
        free = pos[far & ~taken[pos]]
        chosen = np.sort(rng.choice(free, size=min(NEEDLES_PER_QUERY, free.size), replace=False)) if free.size else free
        taken[chosen] = True
        out.append(chosen.astype(np.int64))
    return bounds, out


def _plant_needles(batch, length, heads, head_dim, bounds, positions, rng) -> Arrays:
    """Queries of each group along its own direction, background keys, needles along the direction."""
    n_groups = len(bounds) - 1
    shape = (batch, length, heads, head_dim)
    dirs_BGHD = rng.standard_normal((batch, n_groups, heads, head_dim)).astype(np.float32)
    dirs_BGHD /= np.linalg.norm(dirs_BGHD, axis=-1, keepdims=True)
    group_of = np.repeat(np.arange(n_groups), np.diff(bounds))
    q = dirs_BGHD[:, group_of] * NEEDLE_QUERY_NORM
    q += NEEDLE_QUERY_NOISE * rng.standard_normal(shape, dtype=np.float32)
    k = NEEDLE_KEY_STD * rng.standard_normal(shape, dtype=np.float32)
    v = rng.standard_normal(shape, dtype=np.float32)
    # Needle logit q.k/sqrt(D) = NEEDLE_QUERY_NORM * beta / sqrt(D) = log(S) + 1.
    beta = (np.log(length) + 1.0) * np.sqrt(head_dim) / NEEDLE_QUERY_NORM
    for g, pos in enumerate(positions):
        for p in pos:
            k[:, p] = beta * dirs_BGHD[:, g]  # a collision overwrites: the later group owns that key
    return q.astype(np.float32), k.astype(np.float32), v


def needle_qkv(batch: int, length: int, heads: int, head_dim: int, *, causal: bool = False, seed: int = 2) -> Arrays:
    """Queries grouped by direction in aligned groups of 64, needles planted far away (module docstring)."""
    if length % NEEDLE_GROUP:
        raise ValueError(f"needle inputs need a length that is a multiple of {NEEDLE_GROUP}, got {length}")
    rng = np.random.default_rng(seed)
    bounds = np.arange(0, length + 1, NEEDLE_GROUP)
    return _plant_needles(batch, length, heads, head_dim, bounds, needle_positions(length, causal=causal, seed=seed), rng)


def needle_groups_qkv(batch: int, length: int, heads: int, head_dim: int, *, causal: bool = False, seed: int = 3) -> Arrays:
    """Needles for query groups of random length, not aligned with any block (module docstring)."""
    bounds, positions = group_needles(length, causal=causal, seed=seed)
    rng = np.random.default_rng([seed, 1])
    return _plant_needles(batch, length, heads, head_dim, bounds, positions, rng)


def topic_segments(length: int, *, seed: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """`topics`: segment boundaries and each segment's topic in `[0, NUM_TOPICS)`."""
    rng = np.random.default_rng(seed)
    bounds = random_segments(rng, length, *SEGMENT_LENGTHS)
    return bounds, rng.integers(0, NUM_TOPICS, size=len(bounds) - 1)


def topics_qkv(batch: int, length: int, heads: int, head_dim: int, *, causal: bool = False, seed: int = 4) -> Arrays:
    """Segments of random length about a few topics; queries and keys share their segment's topic."""
    del causal  # the same tensors serve both
    bounds, topic = topic_segments(length, seed=seed)
    rng = np.random.default_rng([seed, 1])
    dirs_BNHD = rng.standard_normal((batch, NUM_TOPICS, heads, head_dim)).astype(np.float32)
    dirs_BNHD /= np.linalg.norm(dirs_BNHD, axis=-1, keepdims=True)
    # (a u + n_q) . (a u + n_k) / sqrt(D) = a^2 / sqrt(D) + noise of std ~1: a^2 = TOPIC_LOGIT sqrt(D)
    a = np.sqrt(TOPIC_LOGIT * np.sqrt(head_dim))
    mean = a * dirs_BNHD[:, np.repeat(topic, np.diff(bounds))]  # [B, T, H, D]
    shape = (batch, length, heads, head_dim)
    q = mean + rng.standard_normal(shape, dtype=np.float32)
    k = mean + rng.standard_normal(shape, dtype=np.float32)
    # q, k and v are projections of the same token: the value carries its topic as strongly
    # (a direction of its own per topic, the same norm `a` against the same unit noise)
    v_dirs = rng.standard_normal((batch, NUM_TOPICS, heads, head_dim)).astype(np.float32)
    v_dirs *= a / np.linalg.norm(v_dirs, axis=-1, keepdims=True)
    v = v_dirs[:, np.repeat(topic, np.diff(bounds))] + rng.standard_normal(shape, dtype=np.float32)
    return q.astype(np.float32), k.astype(np.float32), v.astype(np.float32)


def _position_code(length: int, wavelengths: np.ndarray) -> np.ndarray:
    """`[T, 2J]` cos/sin of each position at each wavelength: `code_t . code_s = sum_j cos(w_j (t - s))`."""
    angle = 2 * np.pi * np.arange(length)[:, None] / wavelengths[None, :]
    return np.concatenate([np.cos(angle), np.sin(angle)], axis=1)


def local_qkv(batch: int, length: int, heads: int, head_dim: int, *, causal: bool = False, seed: int = 5) -> Arrays:
    """Attention that falls off with distance (a language model's local heads), nothing else."""
    del causal
    rng = np.random.default_rng(seed)
    J = head_dim // 4  # a quarter of the dimensions carry position (cos and sin), the rest noise
    shape = (batch, length, heads, head_dim)
    q = rng.standard_normal(shape, dtype=np.float32)
    k = rng.standard_normal(shape, dtype=np.float32)
    a = np.sqrt(LOCAL_LOGIT * np.sqrt(head_dim) / J)  # a^2 * J / sqrt(D): the logit bonus at distance 0
    for h in range(heads):  # each head its own wavelengths, log-uniform in LOCAL_WAVELENGTHS
        lam = np.exp(rng.uniform(*np.log(LOCAL_WAVELENGTHS), size=J))
        code = a * _position_code(length, lam)
        q[:, :, h, : 2 * J] = code
        k[:, :, h, : 2 * J] = code
    v = rng.standard_normal(shape, dtype=np.float32)
    return q, k, v


INPUT_KINDS: dict[str, Callable[..., Arrays]] = {
    "peaky": peaky_qkv,
    "needle": needle_qkv,
    "needle_groups": needle_groups_qkv,
    "topics": topics_qkv,
    "local": local_qkv,
}
"""Fidelity input kinds by name; each is `f(batch, length, heads, head_dim, *, causal, seed) -> (q, k, v)`
(every generator has its own default seed)."""
