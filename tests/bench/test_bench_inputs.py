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
