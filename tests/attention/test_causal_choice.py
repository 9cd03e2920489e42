"""Causal choice without a block's lag and without a leak, anchors and the mass threshold.

Gradients cannot see a discrete choice, so causality is tested by perturbing the future: every
query, key and value after position t is replaced, and the outputs at positions <= t must stay
equal bit for bit, for every causal preset and both exact kernels (scan and masked).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparseformer.attention import attend, block_multiple, default_config, init_params, presets
from sparseformer.attention import selection as selection_lib
from tests.attention.helpers import causal_presets, random_qkv, reference, rel_error, run

T, B = 128, 8  # 16 blocks: every preset's default budget fits


def _causal_config(name, kernel):
    c = presets.get(name)
    c.selection.update(block_size=B, global_queries=False, kernel=kernel)
    c.compression.rank = 16
    return c


def _causal_presets():
    return causal_presets(lambda name: _causal_config(name, "scan"), T)


def _future_changes_past(c, t, seed=0):
    """Largest change of outputs [0, t] when every q, k, v after t is replaced (0.0: no leak)."""
    q, k, v = random_qkv(jax.random.key(seed), B=1, T=T)
    q2, k2, v2 = (x.at[:, t + 1 :].set(3.0 * y[:, t + 1 :]) for x, y in zip((q, k, v), random_qkv(jax.random.key(seed + 1), B=1, T=T)))
    params = init_params(c, jax.random.key(0), num_heads=2, head_dim=16, max_len=T)
    f = jax.jit(lambda q, k, v: attend(q, k, v, c, params=params, causal=True)[0])
    a, b = np.asarray(f(q, k, v)), np.asarray(f(q2, k2, v2))
    assert not np.array_equal(a[:, t + 1 :], b[:, t + 1 :])  # the perturbation reached the future
    return float(np.max(np.abs(a[:, : t + 1] - b[:, : t + 1])))


def test_every_causal_preset_is_covered():
    assert {"rsa", "nsa", "bigbird", "local", "scatterbrain", "performer"} <= set(_causal_presets())


# rows: between two anchors, on an anchor, the first and the last row of a block
ROWS = (5 * B + 3, 6 * B + 4, 7 * B, 8 * B - 1)


@pytest.mark.parametrize("kernel", ["scan", "masked"])
@pytest.mark.parametrize("name", _causal_presets())
def test_perturbing_the_future_changes_nothing_in_the_past(name, kernel):
    c = _causal_config(name, kernel)
    for t in ROWS:
        assert _future_changes_past(c, t) == 0.0, f"{name} ({kernel}): output <= {t} depends on the future"


@pytest.mark.parametrize("choice", ["first_query", "previous_block"])
def test_both_causal_choices_leak_nothing(choice):
    c = _causal_config("rsa", "scan")
    c.selection.causal_choice = choice
    for t in ROWS:
        assert _future_changes_past(c, t) == 0.0


def test_the_leak_test_catches_a_choice_made_from_the_whole_block(monkeypatch):
    """A choice made from all of a block's queries (the lag-free but leaky shortcut) must fail."""
    c = _causal_config("rsa", "scan")
    c.selection.update(anchors=1, mass_threshold=1.0)

    def whole_block(qh, qids, b, how, anchors=1):
        return selection_lib.to_blocks(qh, b)[:, :, qids]

    monkeypatch.setattr("sparseformer.attention.compose.causal_queries", whole_block)
    assert max(_future_changes_past(c, t, seed=s) for t in ROWS for s in (0, 2)) > 0.0


def test_anchors_give_later_rows_their_own_blocks():
    """With anchors, a slot chosen by a later anchor starts at that anchor's row; slots are valid first."""
    c = _causal_config("rsa", "scan").selection
    c.update(anchors=4, mass_threshold=0.5)
    q, k, _ = random_qkv(jax.random.key(3), B=1, T=T)
    qh, kh = jnp.swapaxes(q, 1, 2) * 0.25, jnp.swapaxes(k, 1, 2)
    qids = jnp.arange(T // B)
    q_est = selection_lib.causal_queries(qh, qids, B, "first_query", 4)
    sel = selection_lib.choose_blocks(q_est, selection_lib.to_blocks(kh, B), None, qids, num_query_blocks=T // B,
                                      cfg=c, causal=True, rng=jax.random.key(0))
    start, valid = np.asarray(sel.row_start), np.asarray(sel.valid)
    assert set(np.unique(start[valid])) <= {0, 2, 4, 6} and np.any(start[valid] > 0)
    dyn = valid[..., 1:]  # after the diagonal block: valid slots come first
    assert np.all(np.diff(dyn.astype(int), axis=-1) <= 0)


@pytest.mark.parametrize("kernel", ["scan", "masked"])
@pytest.mark.parametrize("anchors,threshold", [(1, 1.0), (4, 0.9), (8, 0.7)])
def test_decoding_equals_the_full_pass(kernel, anchors, threshold):
    c = _causal_config("rsa", kernel)
    c.selection.update(anchors=anchors, mass_threshold=threshold)
    q, k, v = random_qkv(jax.random.key(4), T=T)
    full, _ = run(c, q, k, v, causal=True)
    params = init_params(c, jax.random.key(7), num_heads=2, head_dim=16, max_len=T)
    step = jax.jit(lambda q, k, v, i: attend(q, k, v, c, params=params, causal=True, query_block=i)[0])
    m = block_multiple(c, causal=True)
    blocks = [step(q, k, v, i) for i in range(T // m)]
    assert rel_error(jnp.concatenate(blocks, axis=1), full) < 1e-5


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("anchors", [2, 8])
@pytest.mark.parametrize("estimator", ["maxkey", "lsekey", "oracle"])
def test_full_budget_is_dense_with_anchors(estimator, anchors, causal):
    """top_k covering every block with the threshold off: anchors change nothing, dense results."""
    q, k, v = random_qkv(jax.random.key(5), T=64)
    c = default_config()
    c.selection.update(enabled=True, block_size=8, window=0, top_k=7, estimator=estimator, anchors=anchors)
    out, _ = run(c, q, k, v, causal=causal)
    assert rel_error(out, reference(q, k, v, causal=causal)) < 1e-5


def test_threshold_one_takes_every_slot_and_lower_thresholds_fewer():
    q, k, _ = random_qkv(jax.random.key(6), B=1, T=T, scale=3.0)
    qh, kh = jnp.swapaxes(q, 1, 2) * 0.25, jnp.swapaxes(k, 1, 2)
    qids = jnp.arange(T // B)
    used = []
    for tau in (1.0, 0.9, 0.5):
        c = default_config().selection
        c.update(enabled=True, block_size=B, window=0, top_k=6, estimator="lsekey", mass_threshold=tau)
        sel = selection_lib.choose_blocks(selection_lib.to_blocks(qh, B), selection_lib.to_blocks(kh, B), None, qids,
                                          num_query_blocks=T // B, cfg=c, causal=False, rng=jax.random.key(0))
        used.append(float(jnp.mean(jnp.sum(sel.valid, -1))))
    assert used[0] == 7.0 and used[0] >= used[1] >= used[2] and used[2] < used[0]
