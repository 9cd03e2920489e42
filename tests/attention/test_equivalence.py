"""Every component equals dense attention when its budget covers everything."""

import jax
import jax.numpy as jnp
import pytest

from sparseformer.attention import (
    COMPRESSIONS, CORRECTIONS, ESTIMATORS, attend, block_multiple, choose_blocks, default_config, init_params, presets,
)
from sparseformer.attention.selection import to_blocks
from tests.attention.helpers import full_budget, random_qkv, reference, rel_error, run

T, B = 64, 16
TOL = 1e-5


@pytest.fixture(scope="module")
def qkv():
    return random_qkv(jax.random.key(0), T=T)


@pytest.fixture(scope="module")
def mask():
    """Batch row 0 unpadded, row 1 padded after 40 tokens: both paths in one call."""
    return jnp.ones((2, T), bool).at[1, 40:].set(False)


def _exact_presets():
    """Presets whose selection can be given a full budget and whose merge is exact."""
    out = []
    for name in presets.names():
        c = presets.get(name)
        merge_exact = CORRECTIONS.get(c.correction.merge).exact_when_full or not c.compression.enabled
        if c.selection.enabled and merge_exact:
            out.append(name)
    return out


@pytest.mark.parametrize("causal", [False, True])
def test_everything_off_is_dense(qkv, causal):
    q, k, v = qkv
    out, aux = run(default_config(), q, k, v, causal=causal)
    assert rel_error(out, reference(q, k, v, causal=causal)) < TOL
    assert float(aux["aux_loss"]) == 0.0 and float(aux["fidelity"]) == 0.0


def test_exact_presets_cover_the_selecting_presets():
    assert {"local", "bigbird", "longformer", "scatterbrain", "rsa"} <= set(_exact_presets())


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", _exact_presets())
def test_preset_full_budget_is_dense(qkv, mask, name, causal):
    q, k, v = qkv
    c = presets.get(name)
    c.selection.block_size = B
    if causal:
        c.selection.global_queries = False
    c = full_budget(c, T)
    km = None if causal else mask  # the padded path is covered by every other test
    out, aux = run(c, q, k, v, causal=causal, kv_mask=km, rng=jax.random.key(1))
    assert rel_error(out, reference(q, k, v, causal=causal, kv_mask=km)) < TOL
    if c.correction.aux_rows:
        assert float(aux["fidelity"]) < 1e-5  # nothing left to approximate


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("estimator", ESTIMATORS.names())
def test_top_k_full_budget_is_dense(qkv, mask, estimator, causal):
    """Window 0 and no global blocks: top-k alone must find every remaining block."""
    q, k, v = qkv
    c = default_config()
    c.selection.update(enabled=True, block_size=B, window=0, top_k=T // B - 1, estimator=estimator)
    out, _ = run(c, q, k, v, causal=causal, kv_mask=mask)
    assert rel_error(out, reference(q, k, v, causal=causal, kv_mask=mask)) < TOL


@pytest.mark.parametrize("causal", [False, True])
def test_random_blocks_full_budget_is_dense(qkv, causal):
    q, k, v = qkv
    c = default_config()
    c.selection.update(enabled=True, block_size=B, window=0, random_blocks=T // B - 1)
    out, _ = run(c, q, k, v, causal=causal, rng=jax.random.key(3))
    assert rel_error(out, reference(q, k, v, causal=causal)) < TOL


@pytest.mark.parametrize("causal", [False, True])
def test_exact_pool_with_exclusion_and_merge_is_dense(qkv, mask, causal):
    """Pool with one token per block is exact; exclusion + merge must then give dense."""
    q, k, v = qkv
    c = presets.get("rsa")
    c.selection.update(block_size=1, window=3, global_blocks=2, top_k=5)
    out, aux = run(c, q, k, v, causal=causal, kv_mask=mask)
    assert rel_error(out, reference(q, k, v, causal=causal, kv_mask=mask)) < TOL
    assert float(aux["fidelity"]) < 1e-5


def test_pool_without_selection_block_one_is_dense(qkv):
    q, k, v = qkv
    c = default_config()
    c.compression.update(enabled=True, kind="pool", block_size=1)
    out, _ = run(c, q, k, v)
    assert rel_error(out, reference(q, k, v)) < TOL


@pytest.mark.parametrize("kind", [n for n in COMPRESSIONS.names() if COMPRESSIONS.get(n).supports_exclusion])
def test_exclusion_of_everything_leaves_only_the_exact_branch(qkv, kind):
    """A full window with exclusion: the compressed branch must cancel to nothing."""
    q, k, v = qkv
    c = default_config()
    c.selection.update(enabled=True, block_size=B, window=T // B - 1)
    c.compression.update(enabled=True, kind=kind, rank=16)
    c.correction.update(enabled=True, merge="lse", exclusion=True)
    out, _ = run(c, q, k, v, rng=jax.random.key(1))
    assert rel_error(out, reference(q, k, v)) < 1e-4


def test_naive_sum_counts_selected_pairs_twice(qkv):
    """Correction off: outputs of both branches are added (the ablation's baseline)."""
    q, k, v = qkv
    c = presets.get("rsa")
    c.selection.update(block_size=1, window=T - 1, global_blocks=0, top_k=0)
    c.compression.block_size = 1
    c.correction.enabled = False
    out, _ = run(c, q, k, v)
    # both branches are exact here, so the naive sum is twice dense attention
    assert rel_error(out, 2 * reference(q, k, v)) < TOL


@pytest.mark.parametrize("name", ["rsa", "bigbird"])
def test_gqa_heads_of_a_group_share_one_choice(name):
    """A key/value head's query heads share their blocks (a fused kernel loads each block once
    for the group): the choice equals the per-head one when the group's queries are equal, and
    it is the same for every head of a group when they differ."""
    q, k, v = random_qkv(jax.random.key(5), H=4)
    k2, v2 = k[:, :, :2], v[:, :, :2]
    c = presets.get(name)
    c.selection.update(block_size=B, window=0, global_queries=False)
    c.selection.update(top_k=min(c.selection.top_k, 1), random_blocks=min(c.selection.random_blocks, 1),
                       global_blocks=min(c.selection.global_blocks, 1))
    q_same = jnp.repeat(q[:, :, ::2], 2, axis=2)  # heads 0, 1 equal; heads 2, 3 equal
    out, _ = run(c, q_same, k2, v2, rng=jax.random.key(3))
    ref, _ = run(c, q_same, jnp.repeat(k2, 2, axis=2), jnp.repeat(v2, 2, axis=2), rng=jax.random.key(3))
    if name == "rsa":  # per-head random draws differ from per-group ones; top-k agrees exactly
        assert rel_error(out, ref) < 1e-6

    qb = to_blocks(jnp.swapaxes(q, 1, 2) * 0.25, B)
    kb = to_blocks(jnp.swapaxes(jnp.repeat(k2, 2, axis=2), 1, 2), B)
    sel = choose_blocks(qb, kb, None, jnp.arange(qb.shape[2]), num_query_blocks=qb.shape[2], cfg=c.selection,
                        causal=False, rng=jax.random.key(3), group=2)
    idx = jnp.where(sel.valid, sel.idx, -1)
    assert bool(jnp.all(idx[:, 0] == idx[:, 1])) and bool(jnp.all(idx[:, 2] == idx[:, 3]))
    assert not bool(jnp.all(idx[:, 0] == idx[:, 2])), "different groups should be free to differ"


@pytest.mark.parametrize("name", ["rsa", "scatterbrain", "nsa", "performer", "bigbird"])
def test_decode_block_equals_full_pass(name):
    """`query_block` (used by KV-cache decoding) reproduces the full causal pass block by block."""
    q, k, v = random_qkv(jax.random.key(2), T=T)
    c = presets.get(name)
    c.selection.update(block_size=B, global_queries=False)
    c.selection.update(top_k=min(c.selection.top_k, 1), random_blocks=min(c.selection.random_blocks, 1),
                       global_blocks=min(c.selection.global_blocks, 1), window=min(c.selection.window, 1))
    c.compression.rank = 16
    full, _ = run(c, q, k, v, causal=True)
    m = block_multiple(c, causal=True)
    params = init_params(c, jax.random.key(7), num_heads=q.shape[2], head_dim=q.shape[3], max_len=T)
    step = jax.jit(lambda q, k, v, i: attend(q, k, v, c, params=params, causal=True, query_block=i)[0])
    blocks = [step(q, k, v, i) for i in range(T // m)]
    assert rel_error(jnp.concatenate(blocks, axis=1), full) < 1e-5


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", ["rsa", "bigbird", "nsa"])
def test_scan_and_masked_kernels_agree(mask, name, causal):
    """The two exact kernels compute the same chosen pairs: outputs, gradients and decoding.

    Short inputs use `masked` under `kernel="auto"`, so every other test here exercises it;
    this one pins `scan` (the kernel of long inputs) to it on a partial budget with padding."""
    q, k, v = random_qkv(jax.random.key(3), T=T)
    km = mask if not causal else None
    configs = {}
    for kernel in ("scan", "masked"):
        c = presets.get(name)
        c.selection.update(block_size=8, kernel=kernel, global_queries=False)
        configs[kernel] = c

    def loss(c, q, k, v):
        out, aux = attend(q, k, v, c, causal=causal, kv_mask=km, rng=jax.random.key(4),
                          params=init_params(c, jax.random.key(7), num_heads=2, head_dim=16, max_len=T))
        return jnp.sum(out * jnp.arange(16)) + aux["aux_loss"], out

    results = {n: jax.jit(jax.value_and_grad(lambda q, k, v, c=c: loss(c, q, k, v), argnums=(0, 1, 2), has_aux=True))(q, k, v)
               for n, c in configs.items()}
    (_, out_s), g_s = results["scan"]
    (_, out_m), g_m = results["masked"]
    assert rel_error(out_m, out_s) < 1e-5
    for a, b in zip(g_m, g_s):
        assert rel_error(a, b) < 1e-4
    if causal:
        params = init_params(configs["masked"], jax.random.key(7), num_heads=2, head_dim=16, max_len=T)
        step = jax.jit(lambda q, k, v, i: attend(q, k, v, configs["masked"], causal=True, query_block=i,
                                                 rng=jax.random.key(4), params=params)[0])
        m = block_multiple(configs["masked"], causal=True)
        blocks = [step(q, k, v, i) for i in range(T // m)]
        full, _ = run(configs["scan"], q, k, v, causal=True, rng=jax.random.key(4))
        assert rel_error(jnp.concatenate(blocks, axis=1), full) < 1e-5


def test_auto_kernel_switches_on_key_length():
    from sparseformer.attention.config import AUTO_MASKED_MAX_KEYS, selection_kernel

    c = presets.get("rsa")
    assert selection_kernel(c, AUTO_MASKED_MAX_KEYS) == "masked"
    assert selection_kernel(c, AUTO_MASKED_MAX_KEYS + 64) == "scan"
    c.selection.kernel = "scan"
    assert selection_kernel(c, 64) == "scan"


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", ["rsa", "bigbird", "nsa"])
def test_budget_larger_than_the_keys_is_dense(qkv, mask, name, causal):
    """A preset's own budget (rsa: 8 blocks) on an input of fewer blocks (64 tokens in blocks of 16: 4)
    runs, and is exact attention: how a trained model runs inputs shorter than its budget."""
    from sparseformer.attention import budget_exceeds_keys, validate

    q, k, v = qkv
    c = presets.get(name)
    c.selection.block_size = B
    c.compression.rank = 16
    assert budget_exceeds_keys(c, causal=causal, kv_len=T)
    validate(c, causal=causal, seq_len=T, padded=True)  # no refusal
    km = None if causal else mask
    out, aux = run(c, q, k, v, causal=causal, kv_mask=km, rng=jax.random.key(1))
    assert rel_error(out, reference(q, k, v, causal=causal, kv_mask=km)) < TOL
    assert float(aux["fidelity"]) == 0.0 and float(aux["captured"]) == 1.0
    assert float(aux["slots"]) == ((T // B + 1) / 2 if causal else T // B)
    if causal:  # cached decoding, block by block, is the same exact attention
        params = init_params(c, jax.random.key(7), num_heads=q.shape[2], head_dim=q.shape[3], max_len=T)
        step = jax.jit(lambda q, k, v, i: attend(q, k, v, c, params=params, causal=True, query_block=i)[0])
        m = block_multiple(c, causal=True)
        assert rel_error(jnp.concatenate([step(q, k, v, i) for i in range(T // m)], axis=1), out) < 1e-5


def test_a_budget_that_fits_exactly_still_selects():
    """Not exceeding: with room for exactly every block rsa runs its own selection (its mass threshold
    may leave blocks to the pooled summary), so the short-input rule changes nothing at lengths that ran before."""
    from sparseformer.attention import budget_exceeds_keys

    c = presets.get("rsa")
    c.selection.block_size = B
    assert not budget_exceeds_keys(c, causal=False, kv_len=8 * B)  # own block + top-7 = 8 blocks
    assert budget_exceeds_keys(c, causal=False, kv_len=7 * B)
