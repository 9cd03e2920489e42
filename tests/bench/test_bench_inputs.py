"""The fidelity inputs do what their docstrings claim (numpy only: fast)."""

from __future__ import annotations

import numpy as np
import pytest

from sparseformer.bench import inputs


def _probs(q: np.ndarray, k: np.ndarray, causal: bool) -> np.ndarray:
    logits = np.einsum("thd,shd->hts", q[0], k[0]) / np.sqrt(q.shape[-1])
    if causal:
        logits = np.where(np.tril(np.ones(logits.shape[1:], bool)), logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


def test_peaky_logit_spread() -> None:
    q, k, _ = inputs.peaky_qkv(1, 512, 2, 64)
    logits = np.einsum("thd,shd->hts", q[0], k[0]) / 8
    assert abs(logits.std() - inputs.PEAKY_LOGIT_STD) < 0.2
    p = _probs(q, k, False)
    entropy = -(p * np.log(p + 1e-30)).sum(-1).mean()
    assert entropy < 0.6 * np.log(512)


@pytest.mark.parametrize("causal", [False, True])
def test_needles_are_far_and_carry_most_of_the_mass(causal: bool) -> None:
    T, G = 1024, inputs.NEEDLE_GROUP
    q, k, _ = inputs.needle_qkv(1, T, 2, 64, causal=causal)
    p = _probs(q, k, causal)
    positions = inputs.needle_positions(T, causal=causal)
    masses = []
    for g, pos in enumerate(positions):
        if len(pos) == 0:
            continue
        assert len(set(pos // G)) == len(pos)  # distinct key blocks
        assert np.all(np.abs(pos // G - g) >= max(4, T // G // 4)) and np.all(pos >= 2 * G)
        if causal:
            assert np.all(pos < g * G)
        masses.append(p[:, g * G : (g + 1) * G][:, :, pos].sum(-1).mean())
    assert sum(len(x) > 0 for x in positions) >= len(positions) // 2
    assert np.mean(masses) > 0.75


def test_inputs_are_deterministic() -> None:
    a = inputs.needle_qkv(1, 256, 1, 16)
    b = inputs.needle_qkv(1, 256, 1, 16)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("kind", sorted(inputs.INPUT_KINDS))
def test_every_kind_is_reproducible_from_its_seed(kind: str) -> None:
    make = inputs.INPUT_KINDS[kind]
    a, b, c = (make(1, 512, 2, 16, causal=True, seed=s) for s in (11, 11, 12))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    assert all(x.dtype == np.float32 and x.shape == (1, 512, 2, 16) for x in a)


@pytest.mark.parametrize("causal", [False, True])
def test_needle_groups_are_not_aligned_and_their_needles_carry_the_mass(causal: bool) -> None:
    T = 2048
    bounds, positions = inputs.group_needles(T, causal=causal)
    lengths = np.diff(bounds)
    assert np.all(lengths[:-1] >= inputs.GROUP_LENGTHS[0]) and np.all(lengths <= inputs.GROUP_LENGTHS[1])
    assert np.mean(bounds[1:-1] % inputs.NEEDLE_GROUP != 0) > 0.8  # boundaries fall inside blocks
    q, k, _ = inputs.needle_groups_qkv(1, T, 2, 64, causal=causal)
    p = _probs(q, k, causal)
    masses = []
    for (start, end), pos in zip(zip(bounds[:-1], bounds[1:]), positions):
        if len(pos) == 0:
            continue
        gap = np.minimum(np.abs(pos - start), np.abs(pos - (end - 1)))
        assert np.all(gap >= inputs.far_gap(T)) and np.all(pos >= 2 * inputs.NEEDLE_GROUP)
        if causal:
            assert np.all(pos < start)
        masses.append(p[:, start:end][:, :, pos].sum(-1).mean())
    assert len(masses) >= len(positions) // 2 and np.mean(masses) > 0.75
    assert len(set(np.concatenate(positions).tolist())) == sum(len(x) for x in positions)  # no needle shared


def test_topic_segments_put_most_mass_on_their_topic() -> None:
    T = 2048
    bounds, topic = inputs.topic_segments(T)
    lengths = np.diff(bounds)
    assert np.all(lengths[:-1] >= inputs.SEGMENT_LENGTHS[0]) and np.all(lengths <= inputs.SEGMENT_LENGTHS[1])
    q, k, _ = inputs.topics_qkv(1, T, 2, 64)
    p = _probs(q, k, False)
    token_topic = np.repeat(topic, lengths)
    same = token_topic[:, None] == token_topic[None, :]
    share = (p * same[None]).sum(-1).mean()
    assert 0.5 < share < 0.95  # most of the mass on the topic, spread over its many segments
    assert same.sum(-1).mean() > inputs.SEGMENT_LENGTHS[1]  # more keys of its topic than one segment holds


def test_local_attention_falls_off_with_distance() -> None:
    T = 1024
    q, k, _ = inputs.local_qkv(1, T, 2, 64)
    p = _probs(q, k, False)
    dist = np.abs(np.arange(T)[:, None] - np.arange(T)[None, :])
    near = (p * (dist <= 64)[None]).sum(-1).mean()
    assert near > 0.75 and (p * (dist <= 8)[None]).sum(-1).mean() > 0.6
