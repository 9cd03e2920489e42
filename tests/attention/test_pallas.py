"""The fused Pallas kernel: equal to the `scan` kernel (interpret mode on this CPU), and it lowers
for the GPU (shape and tiling errors show here, before a GPU is lent). The TPU variant
(`pallas_tpu`) the same, in TPU interpret mode and lowered for `tpu`."""

import contextlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparseformer.attention import attend, block_multiple, init_params, pallas_kernel, pallas_tpu, presets
from sparseformer.attention.config import selection_kernel
from sparseformer.attention.kernel_check import (compare, kernel_pair, loss_grads, random_inputs, random_selection,
                                                 scan_block_attention)
from sparseformer.attention.selection import Selection, choose_blocks, to_blocks
from tests.attention.helpers import random_qkv, rel_error


def _selection(key, *, B, H, G, n, b, causal, row_starts):
    """A random selection with repeats, invalid slots and (optionally) row starts; one per group."""
    return random_selection(np.random.default_rng(key), B=B, Hk=H // G, G=G, n=n, K=6, b=b, causal=causal,
                            row_starts=row_starts, p_valid=0.8)


CASES = {
    # name: (causal, dtype, block, group, padding, row_starts)
    "bidirectional-padding-gqa-rowstart-b32": (False, jnp.float32, 32, 2, True, True),
    "causal-gqa-b64": (True, jnp.float32, 64, 4, False, False),
    "causal-bfloat16-b32": (True, jnp.bfloat16, 32, 1, True, False),
}


# the Triton kernel interpreted (the default on a CPU), the Mosaic TPU kernel in TPU interpret mode
TARGETS = {"triton": contextlib.nullcontext, "tpu": pallas_kernel.tpu_interpret}


# how the fused kernel receives q, k, v: head-major (`[B, H, T, D]`, q scaled), or `attend`'s own
# `[B, T, H, D]` read in place (one head a tile; scaled as it is loaded), or that layout with tiles
# of two heads (GQA), which the kernel transposes itself
LAYOUTS = {"BHTD": ("BHTD", 2), "BTHD": ("BTHD", 1), "BTHD-two-heads-a-tile": ("BTHD", 2)}
RUNS = [(t, c, "BHTD") for t in TARGETS for c in CASES] + [("triton", c, lay) for c in CASES for lay in LAYOUTS if lay != "BHTD"]


@pytest.mark.parametrize("target,case,layout", RUNS)
def test_fused_kernel_equals_scan_kernel_with_gradients(monkeypatch, case, target, layout):
    causal, dtype, b, G, padding, row_starts = CASES[case]
    kind, heads_a_tile = LAYOUTS[layout]
    monkeypatch.setattr(pallas_kernel, "LIST_PIECE", 2)  # long inverted lists in pieces, summed in order
    monkeypatch.setattr(pallas_kernel, "MAX_TILE_ELEMENTS", heads_a_tile * b * 16)  # 2: groups span tiles
    monkeypatch.setattr(pallas_tpu, "SMEM_BUDGET", 448)  # TPU: lists of 1-2 (batch, kv head) pairs per call
    B, H, n, D = 2, 4, 4, 16
    T = n * b
    q, k, v = (x.astype(dtype) for x in random_qkv(jax.random.key(0), B=B, T=T, H=H, D=D, scale=1.0))
    k, v = k[:, :, ::G], v[:, :, ::G]  # [B, S, Hk, D]
    kv_mask = jnp.ones((B, T), bool).at[1, T - b // 2 :].set(False).at[0, 3:5].set(False) if padding else None
    sel = _selection(1, B=B, H=H, G=G, n=n, b=b, causal=causal, row_starts=row_starts)
    w_out = jax.random.normal(jax.random.key(2), (B, H, T, D))
    w_lse = jax.random.normal(jax.random.key(3), (B, H, T))
    head_major = lambda q, k, v: (jnp.swapaxes(q * jnp.asarray(D**-0.5, q.dtype), 1, 2),  # noqa: E731
                                  jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2))

    def fused(q, k, v):
        if kind == "BTHD":
            return pallas_kernel.fused_block_attention(causal, q, k, v, sel, kv_mask, layout="BTHD", scale=D**-0.5)
        return pallas_kernel.fused_block_attention(causal, *head_major(q, k, v), sel, kv_mask)

    def scan(q, k, v):
        return scan_block_attention(causal, *head_major(q, k, v), sel, kv_mask)

    results = {}
    for name, fn in (("fused", fused), ("scan", scan)):
        def loss(q, k, v, fn=fn):
            out, lse = fn(q, k, v)
            keep = lse > -1e29  # rows with nothing allowed carry no log-sum-exp gradient
            return jnp.sum(out * w_out) + jnp.sum(jnp.where(keep, lse, 0.0) * w_lse), (out, lse)

        with TARGETS[target]():
            results[name] = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    (_, (out_f, lse_f)), g_f = results["fused"]
    (_, (out_s, lse_s)), g_s = results["scan"]
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    assert rel_error(out_f, out_s) < tol
    np.testing.assert_allclose(np.asarray(lse_f), np.asarray(lse_s), rtol=tol, atol=tol)
    for a, c in zip(g_f, g_s):
        assert a.dtype == c.dtype == dtype
        assert rel_error(a, c) < (1e-4 if dtype == jnp.float32 else 3e-2)
    if padding:  # padded keys get no gradient
        assert float(jnp.max(jnp.abs(g_f[1][1, T - b // 2 :].astype(jnp.float32)))) == 0.0


def test_unused_slots_are_not_visited():
    """The forward lists put valid slots first and count them: an unused slot costs nothing."""
    sel = _selection(4, B=1, H=2, G=1, n=4, b=16, causal=False, row_starts=True)
    plan = pallas_kernel.make_plan(False, sel, num_heads=2, head_dim=16, has_mask=False)
    meta = np.asarray(pallas_kernel.forward_lists(plan, sel.idx, sel.valid, sel.row_start, sel.qids))
    idx, valid, start = (np.asarray(x) for x in (sel.idx, sel.valid, sel.row_start))
    K = idx.shape[-1]
    for h in range(2):
        for i in range(4):
            count = meta[0, h, i, 0]
            assert count == valid[0, h, i].sum() and meta[0, h, i, 1] == i
            np.testing.assert_array_equal(meta[0, h, i, 2 : 2 + count], idx[0, h, i][valid[0, h, i]])
            np.testing.assert_array_equal(meta[0, h, i, 2 + K : 2 + K + count], start[0, h, i][valid[0, h, i]])


def _three_blocks_chosen_by_all():
    """8 query blocks of 16, 4 slots: key blocks 0-2 chosen by every query block (long lists), each
    query block's own block in the last slot. Returns `(n, D, selection, the (key block, query block)
    pairs, the inputs and loss weights, the `scan` kernel's value and gradients)`."""
    n, b, D = 8, 16, 16
    idx = np.array([[0, 1, 2, i] for i in range(n)], np.int32)[None, None]  # [1, 1, n, K]
    valid = np.ones_like(idx, bool)
    valid[0, 0, :3, 3] = False  # query blocks 0-2 chose their own block already
    sel = Selection(idx=jnp.asarray(idx), valid=jnp.asarray(valid), qids=jnp.arange(n), block_size=b,
                    num_key_blocks=n)
    expected = sorted((int(j), i) for i in range(n) for j, ok in zip(idx[0, 0, i], valid[0, 0, i]) if ok)
    inputs = random_inputs(0, B=1, H=1, Hk=1, T=n * b, D=D, dtype=jnp.float32)
    _, scan = kernel_pair(False, sel)
    return n, D, sel, expected, inputs, jax.jit(loss_grads(scan, *inputs[3:]))(*inputs[:3])


def test_more_long_lists_than_the_partial_sums_hold_lengthen_the_pieces():
    """The dk/dv partial sums are sized for `long_lists` lists of every query block, not the worst
    case: three key blocks chosen by all 8 query blocks, in pieces of 2, need 3 x 4 partial sums;
    sized for two long lists (8), the pieces grow to the shortest that fit, 4 entries (3 x 2). Every
    (key block, query block) pair is still walked exactly once, and the gradients equal the `scan`
    kernel's. Sized for three long lists (12), the pieces keep their 2 entries."""
    n, D, sel, expected, (q, k, v, w_out, w_lse), reference = _three_blocks_chosen_by_all()
    for long_lists, extra, piece in ((2, 8, 4), (3, 12, 2)):
        with pallas_kernel.launch_options(list_piece=2, long_lists=long_lists):
            plan = pallas_kernel.make_plan(False, sel, num_heads=1, head_dim=D, has_mask=False)
            pieces, entries = (np.asarray(x)[0, 0] for x in pallas_kernel.inverted_lists(plan, sel.idx, sel.valid, None))
            fused, _ = kernel_pair(False, sel)
            got = jax.jit(loss_grads(fused, w_out, w_lse))(q, k, v)
        assert plan.extra_pieces == extra and pieces.shape[0] == n + extra
        walked = sorted((int(j), int(entries[t])) for j, first, end, _ in pieces for t in range(first, end))
        assert walked == expected
        assert max(end - first for _, first, end, _ in pieces) == piece
        errors, _, ok = compare(got, reference, jnp.float32)
        assert ok, errors


def test_dkv_programs_run_the_further_pieces_first_with_the_same_gradients_either_way():
    """The dk/dv grid's programs: by default each (batch, key/value head)'s further pieces (full
    length) come first, then every key block's first piece; `extras_first=False` the other way round.
    Either order walks every pair once and gives bit-identical gradients (each gradient is summed in
    one fixed order whatever the programs' order), equal to the `scan` kernel's."""
    rng = np.random.default_rng(4)
    n, b, D = 6, 16, 16
    sel = random_selection(rng, B=2, Hk=2, G=1, n=n, K=4, b=b, causal=True, row_starts=True, p_valid=0.9)
    q, k, v, w_out, w_lse = random_inputs(1, B=2, H=2, Hk=2, T=n * b, D=D, dtype=jnp.float32)
    _, scan = kernel_pair(True, sel)
    reference = jax.jit(loss_grads(scan, w_out, w_lse))(q, k, v)
    grads = {}
    for extras_first in (True, False):
        with pallas_kernel.launch_options(list_piece=2, extras_first=extras_first):
            plan = pallas_kernel.make_plan(True, sel, num_heads=2, head_dim=D, has_mask=False)
            pieces, _ = (np.asarray(x) for x in pallas_kernel.inverted_lists(plan, sel.idx, sel.valid, sel.row_start))
            fused, _ = kernel_pair(True, sel)
            grads[extras_first] = jax.jit(loss_grads(fused, w_out, w_lse))(q, k, v)
        m, X = plan.num_key_blocks, plan.extra_pieces
        firsts = slice(X, X + m) if extras_first else slice(0, m)
        extras = slice(0, X) if extras_first else slice(m, m + X)
        assert (plan.first_program, plan.extra_program) == ((X, 0) if extras_first else (0, m))
        np.testing.assert_array_equal(pieces[..., firsts, 0], np.broadcast_to(np.arange(m), (2, 2, m)))
        assert np.all(pieces[..., extras, 3] == 0)
        used = pieces[..., extras, 2] > pieces[..., extras, 1]
        assert used.any()  # the case has further pieces to order
        lengths = pieces[..., 2] - pieces[..., 1]
        assert np.all(lengths[..., extras][used] <= plan.piece)
        errors, _, ok = compare(grads[extras_first], reference, jnp.float32)
        assert ok, errors
    for a, b_ in zip(jax.tree.leaves(grads[True]), jax.tree.leaves(grads[False])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b_))
    with pytest.raises(ValueError, match="extras_first 'yes'; allowed: True, False"):
        with pallas_kernel.launch_options(extras_first="yes"):
            pass


def test_the_finish_kernel_may_only_add_partial_sums_with_the_same_gradients():
    """`finish_walks_first=False`: every piece of a long list is walked by the dk/dv kernel into a
    partial sum (its first piece left empty) and the finish kernel only adds them, so no walk runs
    after the dk/dv kernel (the default). The partial sums hold one piece more per long list than when
    the finish kernel walks first pieces, every pair is still walked once, and the gradients are
    bit-identical either way (the same sums, added in the same order). Sized for one long list (4
    partial sums), pieces of 3-6 would still need 6-9: they grow to the ladder's 8, the whole list,
    and the finish kernel has nothing to do."""
    n, D, sel, expected, (q, k, v, w_out, w_lse), reference = _three_blocks_chosen_by_all()
    got = {}
    ways = ((True, 3, 9, 2, 3), (False, 3, 12, 2, 3), (False, 1, 4, 8, 0))
    for finish_walks, long_lists, extra, piece, n_long in ways:
        with pallas_kernel.launch_options(list_piece=2, long_lists=long_lists, finish_walks_first=finish_walks):
            plan = pallas_kernel.make_plan(False, sel, num_heads=1, head_dim=D, has_mask=False)
            lists = pallas_kernel.inverted_lists(plan, sel.idx, sel.valid, None)
            pieces, entries = (np.asarray(x)[0, 0] for x in lists)
            fused, _ = kernel_pair(False, sel)
            got[finish_walks, long_lists] = jax.jit(loss_grads(fused, w_out, w_lse))(q, k, v)
        assert plan.extra_pieces == extra
        walked = sorted((int(j), int(entries[t])) for j, first, end, _ in pieces for t in range(first, end))
        assert walked == expected
        assert max(end - first for _, first, end, _ in pieces) == piece
        firsts = pieces[plan.first_program:plan.first_program + n]
        long = firsts[:, 3] == 1
        assert long.sum() == n_long and np.all((firsts[long, 2] == firsts[long, 1]) != finish_walks)
        errors, _, ok = compare(got[finish_walks, long_lists], reference, jnp.float32)
        assert ok, errors
    for a, b_ in zip(jax.tree.leaves(got[True, 3]), jax.tree.leaves(got[False, 3])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b_))


def test_piece_length_is_the_shortest_ladder_length_that_fits_without_a_loop():
    """Random list lengths, several room sizes, either finish: the piece is the shortest of
    `piece_ladder` whose partial sums fit (counted here in Python: every piece of a list longer than
    one, or all but its first when the finish kernel walks first pieces), and it is computed without
    a loop (a loop's dependent steps would each wait on the last on a GPU, in every backward pass)."""
    rng = np.random.default_rng(0)
    sel = random_selection(rng, B=2, Hk=3, G=1, n=40, K=8, b=16, causal=False, row_starts=False, p_valid=0.9)
    lengths = jnp.asarray(rng.integers(0, 41, size=(2, 3, 40)), jnp.int32)
    def sums(L, p, finish_walks):  # partial sums lists of lengths L take in pieces of p
        pieces = -(-L // p)
        return (np.maximum(0, pieces - 1) if finish_walks else np.where(L > p, pieces, 0)).sum()

    for long_lists in (1, 2, 4, 8):
        for finish_walks in (False, True):
            with pallas_kernel.launch_options(list_piece=4, long_lists=long_lists, finish_walks_first=finish_walks):
                plan = pallas_kernel.make_plan(False, sel, num_heads=3, head_dim=16, has_mask=False)
            got = np.asarray(pallas_kernel.piece_length(plan, lengths))
            for bb in range(2):
                for h in range(3):
                    L = np.asarray(lengths[bb, h])
                    want = next(p for p in pallas_kernel.piece_ladder(plan)
                                if sums(L, p, finish_walks) <= plan.extra_pieces)
                    assert got[bb, h] == want, (long_lists, finish_walks, bb, h)
    jaxpr = str(jax.make_jaxpr(lambda L: pallas_kernel.piece_length(plan, L))(lengths))
    assert "while" not in jaxpr and "scan" not in jaxpr


def test_tpu_lists_too_large_for_scalar_memory_are_refused(monkeypatch):
    monkeypatch.setattr(pallas_tpu, "SMEM_BUDGET", 64)
    q, k, v = random_qkv(jax.random.key(0), T=128, D=16)
    c = presets.get("local")
    c.selection.update(block_size=16, kernel="pallas")
    with pallas_kernel.tpu_interpret(), pytest.raises(ValueError, match="selection.kernel: 'pallas' on a TPU .* scalar"):
        attend(q, k, v, c)


def test_the_tpu_walk_visits_each_key_block_once_then_its_query_blocks_in_order():
    """dk/dv on a TPU: a key block's gradient is zeroed by its sentinel step, then every query
    block that chose it adds to it in ascending order (deterministic); unused slots come last and
    compute nothing; a step that computes nothing keeps the previous query tile (no fetch)."""
    sel = _selection(3, B=2, H=2, G=1, n=5, b=16, causal=False, row_starts=True)
    plan = pallas_kernel.make_plan(False, sel, num_heads=2, head_dim=16, has_mask=False)
    walk = np.asarray(pallas_tpu.dkv_walk(plan, sel.idx, sel.valid, sel.row_start))
    idx, valid, start = (np.asarray(x) for x in (sel.idx, sel.valid, sel.row_start))
    n, K, m = 5, idx.shape[-1], sel.num_key_blocks
    assert walk.shape == (2, 2, m + n * K, pallas_tpu.WALK_FIELDS)
    for bb in range(2):
        for h in range(2):
            blk, qi, kind, st = walk[bb, h].T
            expected = []  # (kind, block, query block, row start) in walk order
            for j in range(m):
                expected.append((pallas_tpu.SENTINEL, j))
                for i in range(n):
                    for s in range(K):
                        if valid[bb, h, i, s] and idx[bb, h, i, s] == j:
                            expected.append((pallas_tpu.ENTRY, j, i, start[bb, h, i, s]))
            used = len(expected)
            assert [(kind[t], blk[t]) + ((qi[t], st[t]) if kind[t] == pallas_tpu.ENTRY else ())
                    for t in range(used)] == expected
            assert np.all(kind[used:] == pallas_tpu.UNUSED) and np.all(blk[used:] == m - 1)
            for t in range(1, len(kind)):
                if kind[t] != pallas_tpu.ENTRY:
                    assert qi[t] == qi[t - 1]


@pytest.mark.parametrize("target", list(TARGETS))
def test_attend_with_the_fused_kernel_decodes_as_the_full_pass(target):
    q, k, v = random_qkv(jax.random.key(5), T=128, H=4, D=16)
    k, v = k[:, :, :2], v[:, :, :2]
    c = presets.get("rsa")
    c.selection.update(block_size=16, kernel="pallas", top_k=2)
    params = init_params(c, jax.random.key(7), num_heads=4, head_dim=16, max_len=128)
    step = jax.jit(lambda q, k, v, i: attend(q, k, v, c, params=params, causal=True, query_block=i)[0])
    m = block_multiple(c, causal=True)
    with TARGETS[target]():
        full = jax.jit(lambda q, k, v: attend(q, k, v, c, params=params, causal=True)[0])(q, k, v)
        blocks = [step(q, k, v, i) for i in range(128 // m)]
    assert rel_error(jnp.concatenate(blocks, axis=1), full) < 1e-5
    c_scan = presets.get("rsa")
    c_scan.selection.update(block_size=16, kernel="scan", top_k=2)
    ref = jax.jit(lambda q, k, v: attend(q, k, v, c_scan, params=params, causal=True)[0])(q, k, v)
    assert rel_error(full, ref) < 1e-5


@pytest.mark.parametrize("block,head_dim,kv_heads,options", [
    (64, 64, 4, {}), (64, 64, 8, {}), (64, 128, 4, {}), (128, 64, 4, {}), (128, 128, 4, {}),
    (64, 64, 8, {"extras_first": False}), (64, 64, 8, {"finish_walks_first": True}),
])
def test_forward_backward_lowers_for_the_gpu(block, head_dim, kv_heads, options):
    """Tracing, tiling and shape errors of the Triton lowering show on this CPU; the PTX compile
    itself happens only on a GPU. One head a tile reads q, k, v in place ([B, T, H, D]: 8 kv heads,
    the benchmark's shape; and 128 x 128 tiles with a group of two heads); two heads a tile take the
    head-major layout. The dk/dv kernels' other ways (the GPU stage's sweep times them) lower too."""
    T, H, Hk = 4096, 8, kv_heads
    q = jax.ShapeDtypeStruct((1, T, H, head_dim), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, T, Hk, head_dim), jnp.bfloat16)
    c = presets.get("rsa")
    c.selection.update(block_size=block, kernel="pallas")

    def loss(q, k, v):
        out, aux = attend(q, k, v, c, causal=block == 64, rng=jax.random.key(0))
        return jnp.sum(out.astype(jnp.float32)) + aux["aux_loss"]

    with pallas_kernel.compile_for_gpu(), pallas_kernel.launch_options(**options):
        lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, kv, kv).lower(lowering_platforms=("cuda",))
    text = lowered.as_text()
    # the estimate (rsa's maxkey, fused), forward, dq, dk/dv, and the long key blocks' partial sums
    # added in order; the pooled branch's forward, dq and summaries' gradients
    assert text.count("__gpu$xla.gpu.triton") == 8
    for name in ("maxkey_scores", "pool_fwd", "pool_dq", "pool_dsum"):
        assert text.count(f'name = "sparseformer_{name}"') == 1, name
    # and no loop: on a GPU each trip of one launches its kernels again (the estimate's and the pooled
    # branch's chunks, the inverted lists' binary searches were loops: benchmarks/gpu_aot.py)
    assert "stablehlo.while" not in text
    # the gradients are written once, in bfloat16 (dk and dv finished in place): never whole in float32
    calls = {re.search(r'name = "(sparseformer_[a-z_]+)"', line).group(1): line
             for line in text.splitlines() if "__gpu$xla.gpu.triton" in line}
    results = re.findall(r"tensor<([0-9x]+)x([a-z]+[0-9]+)>", calls["sparseformer_block_sparse_dkv"].split("->")[-1])
    grads = [dtype for dims, dtype in results if dims.count("x") == 3]  # the rank-4 results: dk, dv
    assert grads == ["bf16", "bf16"], results
    # the float32 partial sums, `[1, Hk, pieces, b, D]` each: room for 4 lists of all n query blocks in
    # pieces of 16 (not the worst case's ceil(8 n / 16) blocks), one piece fewer each when the finish
    # kernel walks their first pieces
    n = T // block
    partial = f"1x{Hk}x{4 * (n // 16 - options.get('finish_walks_first', False))}x{block}x{head_dim}"
    assert [r for r in results if r[0].count("x") == 4] == [(partial, "f32")] * 2, results
    assert "output_operand_aliases" in calls["sparseformer_block_sparse_dkv_finish"]
    assert "f32" not in calls["sparseformer_block_sparse_dq"].split("->")[-1]  # dq too, either layout


def test_a_decoding_step_lowers_for_the_gpu():
    """A KV-cache decoding step (`query_block`, a traced block index: what the LM's cached decoding
    and `sparseformer bench --model` run on a GPU) lowers to the fused estimate of its one query block,
    the fused forward program and the pooled branch's fused forward, nothing else."""
    T, H, D = 4096, 8, 64
    c = presets.get("rsa")
    c.selection.kernel = "pallas"
    params = init_params(c, jax.random.key(7), num_heads=H, head_dim=D, max_len=T)
    x = jax.ShapeDtypeStruct((1, T, H, D), jnp.bfloat16)

    def step(q, k, v, i):
        return attend(q, k, v, c, params=params, causal=True, query_block=i)[0]

    with pallas_kernel.compile_for_gpu():
        text = jax.jit(step).trace(x, x, x, jax.ShapeDtypeStruct((), jnp.int32)).lower(
            lowering_platforms=("cuda",)).as_text()
    assert re.findall(r'name = "(sparseformer_[a-z_]+)"', text) == [
        "sparseformer_maxkey_scores", "sparseformer_block_sparse_fwd", "sparseformer_pool_fwd"]


@pytest.mark.parametrize("block,head_dim,causal,padding,heads", [
    (64, 64, True, False, (8, 4)), (64, 128, False, True, (8, 4)), (128, 64, False, False, (16, 1)),
    (128, 128, True, True, (8, 8)),
])
def test_forward_backward_lowers_for_the_tpu(block, head_dim, causal, padding, heads):
    """The Mosaic TPU kernels (forward, dq, dk/dv) lower for `tpu` on this CPU, with scalar
    prefetch, key padding and groups of query heads that span tiles ((16, 1) at block 128)."""
    T, (H, Hk) = 4096, heads
    q = jax.ShapeDtypeStruct((1, T, H, head_dim), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, T, Hk, head_dim), jnp.bfloat16)
    mask = jax.ShapeDtypeStruct((1, T), jnp.bool_) if padding else None
    c = presets.get("rsa")
    c.selection.update(block_size=block, kernel="pallas")

    def loss(q, k, v, mask):
        out, aux = attend(q, k, v, c, causal=causal, kv_mask=mask, rng=jax.random.key(0))
        return jnp.sum(out.astype(jnp.float32)) + aux["aux_loss"]

    with pallas_kernel.compile_for_tpu():
        lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, kv, kv, mask).lower(lowering_platforms=("tpu",))
    text = lowered.as_text()
    for name in ("fwd", "dq", "dkv"):
        assert f"sparseformer_block_sparse_{name}_tpu" in text
    assert text.count("tpu_custom_call") == 3


def test_auto_takes_the_fused_kernel_on_a_gpu_only():
    c = presets.get("rsa")
    assert selection_kernel(c, 8192, head_dim=64, backend="gpu") == "pallas"
    assert selection_kernel(c, 8192, head_dim=64, backend="cpu") == "scan"
    assert selection_kernel(c, 256, head_dim=64, backend="cpu") == "masked"
    assert selection_kernel(c, 8192, head_dim=24, backend="gpu") == "scan"  # Triton tiles are powers of two
    assert selection_kernel(c, 8192, head_dim=64, backend="tpu") == "scan"  # the TPU kernel is not timed yet
    with pallas_kernel.compile_for_gpu():  # compiling for a GPU without one (benchmarks/gpu_aot.py)
        assert selection_kernel(c, 8192, head_dim=64) == "pallas"
    assert selection_kernel(c, 8192, head_dim=64) == "scan"  # this CPU


def test_unsupported_shapes_are_refused_before_compiling():
    q, k, v = random_qkv(jax.random.key(0), T=96, D=16)
    c = presets.get("local")
    c.selection.update(block_size=24, kernel="pallas")
    with pytest.raises(ValueError, match="model.attention.selection.block_size: 24"):
        attend(q, k, v, c)
    q, k, v = random_qkv(jax.random.key(0), T=64, D=24)
    c.selection.block_size = 16
    with pytest.raises(ValueError, match="model.attention.selection.kernel: 'pallas' needs a head dim"):
        attend(q, k, v, c)


def test_choice_for_groups_reaches_the_kernel_once_per_group():
    """`choose_blocks` with a group returns one choice per key/value head, repeated to its heads:
    the kernel reads the first head of each group."""
    q, k, _ = random_qkv(jax.random.key(1), T=64, H=4, D=16)
    qb = to_blocks(jnp.swapaxes(q, 1, 2), 16)
    kb = to_blocks(jnp.swapaxes(jnp.repeat(k[:, :, :2], 2, axis=2), 1, 2), 16)
    cfg = presets.get("rsa").selection
    cfg.update(block_size=16, top_k=1)
    sel = choose_blocks(qb, kb, None, jnp.arange(4), num_query_blocks=4, cfg=cfg, causal=False,
                        rng=jax.random.key(0), group=2)
    assert sel.group == 2
    np.testing.assert_array_equal(np.asarray(sel.idx[:, ::2]), np.asarray(sel.idx[:, 1::2]))


@pytest.mark.parametrize("name", ["local", "bigbird", "longformer", "scatterbrain", "nsa", "rsa"])
def test_every_selecting_preset_runs_on_the_fused_kernel(name):
    """The presets reach the fused kernel through the same `Selection` (forward, padded keys)."""
    q, k, v = random_qkv(jax.random.key(6), T=128, D=16)
    mask = jnp.ones((2, 128), bool).at[1, 100:].set(False)
    outs = {}
    for kernel in ("pallas", "masked"):
        c = presets.get(name)
        c.selection.update(block_size=16, kernel=kernel)
        c.selection.update(window=min(c.selection.window, 1), top_k=min(c.selection.top_k, 1),
                           global_blocks=min(c.selection.global_blocks, 1),
                           random_blocks=min(c.selection.random_blocks, 1))
        c.compression.rank = 16
        params = init_params(c, jax.random.key(7), num_heads=2, head_dim=16, max_len=128)
        outs[kernel] = jax.jit(lambda q, k, v, c=c, params=params: attend(
            q, k, v, c, params=params, kv_mask=mask, rng=jax.random.key(1))[0])(q, k, v)
    assert rel_error(outs["pallas"], outs["masked"]) < 1e-5


def test_a_jax_without_the_triton_backend_falls_back_to_scan(monkeypatch):
    """The Pallas Triton backend is deprecated from jax 0.11; where a JAX no longer has it, `auto`
    takes `scan` on a GPU and an explicit `pallas` is refused, naming the key, before compiling."""
    import sys

    from sparseformer.attention.config import selection_kernel

    c = presets.get("rsa")
    assert selection_kernel(c, 4096, head_dim=64, backend="gpu", dtype=jnp.bfloat16) == "pallas"
    monkeypatch.setitem(sys.modules, "jax.experimental.pallas.triton", None)  # import fails
    assert selection_kernel(c, 4096, head_dim=64, backend="gpu", dtype=jnp.bfloat16) == "scan"
    assert pallas_kernel.unsupported_reason(64, 64, jnp.bfloat16) is None  # interpreted: not asked
    q = jnp.zeros((1, 128, 2, 64), jnp.bfloat16)
    sel = _selection(0, B=1, H=2, G=1, n=2, b=64, causal=False, row_starts=False)
    with pallas_kernel.compile_for_gpu(), pytest.raises(
            ValueError, match=r"selection.kernel: 'pallas' cannot run: this JAX .* no Pallas Triton backend"):
        pallas_kernel.fused_block_attention(False, q, q, q, sel, layout="BTHD")


def test_float32_tiles_are_sized_for_gpu_shared_memory():
    """Compiled for a GPU, a float32 block's tiles must fit an SM's shared memory (measured by
    `benchmarks/triton_sm90.py`: blocks of 128 with head dim 128 need 257-385 KiB of 227): the
    kernel refuses them before compiling, `auto` takes `scan` instead, and GQA tiles stack fewer
    float32 heads. Interpreted (the tests), any tile runs."""
    from sparseformer.attention.config import selection_kernel

    reason = pallas_kernel.unsupported_reason(128, 128, jnp.float32, compiled_gpu=True)
    assert "selection.block_size 128 x head dim 128 in float32" in reason and "8192" in reason, reason
    for ok in ((128, 128, jnp.bfloat16, True), (128, 64, jnp.float32, True), (64, 128, jnp.float32, True),
               (128, 128, jnp.float32, False)):
        assert pallas_kernel.unsupported_reason(*ok[:3], compiled_gpu=ok[3]) is None, ok
    c = presets.get("rsa")
    c.selection.block_size = 128
    assert selection_kernel(c, 4096, head_dim=128, backend="gpu", dtype=jnp.bfloat16) == "pallas"
    assert selection_kernel(c, 4096, head_dim=128, backend="gpu", dtype=jnp.float32) == "scan"
    sel = _selection(0, B=1, H=8, G=2, n=4, b=64, causal=False, row_starts=False)
    with pallas_kernel.compile_for_gpu():
        assert pallas_kernel.make_plan(False, sel, num_heads=8, head_dim=128, has_mask=False,
                                       dtype=jnp.bfloat16).heads_per_tile == 2
        assert pallas_kernel.make_plan(False, sel, num_heads=8, head_dim=128, has_mask=False,
                                       dtype=jnp.float32).heads_per_tile == 1
        q = jnp.zeros((1, 256, 4, 128), jnp.float32)
        sel128 = _selection(0, B=1, H=4, G=1, n=2, b=128, causal=False, row_starts=False)
        with pytest.raises(ValueError, match="'pallas' cannot run: selection.block_size 128 x head dim 128 in float32"):
            pallas_kernel.fused_block_attention(False, q, q, q, sel128, layout="BTHD")
    # interpreted: stacked float32 heads as before
    assert pallas_kernel.make_plan(False, sel, num_heads=8, head_dim=128, has_mask=False,
                                   dtype=jnp.float32).heads_per_tile == 2
