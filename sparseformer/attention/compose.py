"""`attend`: selection, compression and correction composed into one attention call."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from sparseformer.attention import rand
from sparseformer.attention.compression import Public, _row_key_mask
from sparseformer.attention.config import block_multiple, budget_exceeds_keys, selection_kernel, validate
from sparseformer.attention.correction import Branch, gate_values, kl_rows, kl_terms
from sparseformer.attention.dense import LOG0, dense_attention, dense_attention_chunked
from sparseformer.attention.pallas_kernel import fused_block_attention
from sparseformer.attention.registry import COMPRESSIONS, CORRECTIONS
from sparseformer.attention.selection import (
    Selection,
    block_sparse_attention,
    causal_queries,
    choose_blocks,
    masked_block_attention,
    to_blocks,
)

Params = dict[str, jax.Array]


def init_params(
    config: ml_collections.ConfigDict, key: jax.Array, *, num_heads: int, head_dim: int, max_len: int
) -> Params:
    """The learned parameters a config needs (Linformer projections, gate logits); `{}` if none."""
    params: Params = {}
    if config.compression.enabled:
        init = COMPRESSIONS.get(config.compression.kind).extras.get("init")
        if init is not None:
            params.update(init(config, key, num_heads=num_heads, head_dim=head_dim, max_len=max_len))
    if config.correction.enabled and config.correction.gate:
        params["gate"] = jnp.zeros((num_heads, 2), jnp.float32)  # sigmoid(0): both branches equal
    return params


def init_params_names(config: ml_collections.ConfigDict) -> set[str]:
    """Names of the parameters `init_params` creates for this config (shapes not needed)."""
    names = jax.eval_shape(lambda: init_params(config, jax.random.key(0), num_heads=1, head_dim=1, max_len=1))
    return set(names)


def _pad_to(x: jax.Array, axis: int, length: int) -> jax.Array:
    if x.shape[axis] == length:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, length - x.shape[axis])
    return jnp.pad(x, pad)


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    config: ml_collections.ConfigDict,
    *,
    params: Params | None = None,
    causal: bool = False,
    kv_mask: jax.Array | None = None,
    rng: jax.Array | None = None,
    query_block: jax.Array | int | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Attention with the components `config` switches on.

    Args:
      q: `[B, T, H, D]` queries (the layout of `jax.nn.dot_product_attention`).
      k, v: `[B, S, Hk, D]` keys and values; `H % Hk == 0` (grouped-query attention).
      config: the `model.attention` ConfigDict (`presets.get(name)` gives one).
      params: from `init_params` (Linformer projections, gates), when the config needs them.
      causal: autoregressive masking.
      kv_mask: `[B, S]` bool, False at padding. With a mask, lengths that are not a multiple
        of the block size are padded internally.
      rng: drives random blocks, random features and the regulariser's rows; None gives
        fixed draws (evaluation, decoding).
      query_block: decoding. `q` is then the whole query cache and only this block of
        `block_multiple(config)` queries is computed (output `[B, that, H, D]`), exactly as
        the full causal pass computes it.

    Returns:
      `out [B, T, H, D]` in q's dtype, and `aux`: float32 scalars `aux_loss` (the
      regulariser times its weight; 0 when correction is off) and `fidelity` (KL from dense to approximate attention on
      the sampled rows; 0 when `correction.aux_rows == 0`), `captured` (the share of the
      approximate attention's mass that was computed exactly, see `_captured`), the same two
      per head, `fidelity_heads` and `captured_heads` `[H]` (their means are the scalars), and
      with selection on, `slots` (key blocks computed exactly per query block and head, on average).
    """
    B, T, H, D = q.shape
    S, Hk = k.shape[1], k.shape[2]
    padded = kv_mask is not None
    validate(config, causal=causal, seq_len=T, kv_len=S, padded=padded)
    if config.selection.enabled and config.selection.kernel == "pallas" and (D < 16 or D & (D - 1)):
        raise ValueError(f"model.attention.selection.kernel: 'pallas' needs a head dim that is a power of two >= 16, got {D}")
    if H % Hk:
        raise ValueError(f"model.attention: query heads {H} must be a multiple of key/value heads {Hk}")
    group = H // Hk  # query heads per key/value head: they share one choice of blocks
    sel_cfg, comp_cfg, corr = config.selection, config.compression, config.correction
    params = params or {}
    required = init_params_names(config)
    missing = sorted(required - set(params))
    if missing:
        raise ValueError(
            f"model.attention: this config needs parameters {missing} (create them with "
            f"sparseformer.attention.init_params and pass params=...)"
        )
    fixed = rng is None
    # one key for all: each consumer hashes it with its own stream number (attention.rand)
    rng = jax.random.key(0) if rng is None else rng

    # head-major layout, scale folded into q, lengths padded to the block multiple
    mult = block_multiple(config, causal=causal)
    T_pad, S_pad = -(-T // mult) * mult, -(-S // mult) * mult
    qh = _pad_to(jnp.swapaxes(q * jnp.asarray(D**-0.5, q.dtype), 1, 2), 2, T_pad)
    kh_kv = _pad_to(jnp.swapaxes(k, 1, 2), 2, S_pad)  # [B, Hk, S, D]: for the estimate and the CPU kernels
    vh_kv = _pad_to(jnp.swapaxes(v, 1, 2), 2, S_pad)
    kh, vh = (jnp.repeat(x, group, axis=1) for x in (kh_kv, vh_kv)) if group > 1 else (kh_kv, vh_kv)
    if padded:
        kv_mask = _pad_to(kv_mask.astype(bool), 1, S_pad)

    # the same arrays in the caller's layout, padded: what the fused kernel, the pooled branch and
    # BigBird's global rows read in place, so their backward passes keep the caller's q, k, v and
    # not the head-major copies above (those are then only transients)
    public = Public(_pad_to(q, 1, T_pad), _pad_to(k, 1, S_pad), _pad_to(v, 1, S_pad), D**-0.5)
    if query_block is None:
        q_used, q_pos = qh, jnp.arange(T_pad)
    else:
        start = jnp.asarray(query_block, jnp.int32) * mult
        q_used = jax.lax.dynamic_slice_in_dim(qh, start, mult, axis=2)
        q_pos = start + jnp.arange(mult)
        public = public._replace(q=jax.lax.dynamic_slice_in_dim(public.q, start, mult, axis=1))
    Tq = q_used.shape[2]

    branches: list[Branch] = []
    selection: Selection | None = None
    # A budget with room for more key blocks than there are computes them all: exact attention
    # (the dense path below), e.g. a model trained with 8 blocks on an input of 4.
    exact = budget_exceeds_keys(config, causal=causal, kv_len=S_pad)
    if sel_cfg.enabled and not exact:
        b = sel_cfg.block_size
        kb, vb = to_blocks(kh, b), to_blocks(vh, b)
        kmask_b = kv_mask.reshape(B, S_pad // b, b) if padded else None
        qb = to_blocks(q_used, b)
        qids = q_pos[::b] // b
        if causal:  # only queries every row of the block may see choose its blocks
            q_est = causal_queries(qh, qids, b, sel_cfg.causal_choice, sel_cfg.anchors)
        else:
            q_est = qb
        kernel = selection_kernel(config, S_pad, head_dim=D, dtype=q.dtype)
        selection = choose_blocks(
            q_est, kb, kmask_b, qids, num_query_blocks=T_pad // b, cfg=sel_cfg, causal=causal, rng=rng, group=group,
            fused_estimate=kernel == "pallas",  # the estimate fused too, where its estimator allows
        )
        if kernel == "masked":
            kv_m = kv_mask if padded else None
            out_b, lse_b = masked_block_attention(causal, q_used, kh, vh, selection, kv_m, q_pos)
        elif kernel == "pallas":  # reads q, k, v in attend's own [B, T, H, D] layout, scaling q itself
            out_b, lse_b = fused_block_attention(
                causal, public.q, public.k, public.v, selection, kv_mask if padded else None,
                layout="BTHD", scale=public.scale,
            )
        else:
            idx, valid, start = selection.idx, selection.valid, selection.row_start
            out_b, lse_b = block_sparse_attention(causal, qb, kb, vb, idx, valid, start, kmask_b, qids)
        branches.append(Branch.from_softmax(out_b.reshape(B, H, Tq, D), lse_b.reshape(B, H, Tq)))

    comp_state: Any = None
    exclude = selection if (corr.enabled and corr.exclusion and selection is not None) else None
    if comp_cfg.enabled and not exact:
        comp = COMPRESSIONS.get(comp_cfg.kind)
        layout = {"public": public} if comp.extras.get("public_layout") else {}
        branch, comp_state = comp.fn(
            q_used, kh, vh, kv_mask, q_pos=q_pos, causal=causal, config=config, params=params, rng=rng, sel=exclude,
            **layout,
        )
        branches.append(branch)

    gates = gate_values(params.get("gate") if corr.enabled and corr.gate else None, len(branches))
    rule = CORRECTIONS.get(corr.merge if corr.enabled else "sum")
    if not branches:
        out, _ = dense_attention(q_used, kh, vh, causal=causal, kv_mask=kv_mask, q_offset=q_pos[0])
    elif len(branches) == 1:
        out = branches[0].normalised()
    else:
        out = rule.fn(branches, gates)

    # causal global rows (the first blocks) already see their whole past through the window
    global_rows = sel_cfg.enabled and sel_cfg.global_queries and not causal and not exact
    n_global_rows = sel_cfg.global_blocks * sel_cfg.block_size if global_rows else 0
    n_global_rows = min(n_global_rows, Tq)
    if n_global_rows and query_block is None:  # BigBird's global queries see every key
        out_g, _ = dense_attention_chunked(qh[:, :, :n_global_rows], public.k, public.v, kv_mask=kv_mask)
        out = out.at[:, :, :n_global_rows].set(out_g)

    aux = {"aux_loss": jnp.zeros((), jnp.float32), "fidelity": jnp.zeros((), jnp.float32),
           "fidelity_heads": jnp.zeros((H,), jnp.float32)}
    if corr.aux_rows > 0 and query_block is None and branches:
        kl_heads = _fidelity(
            qh, public.k, kv_mask, T, branches, selection, exclude, comp_state, gates, rule, config,
            causal=causal, rng=None if fixed else rng, n_global_rows=n_global_rows,
        )
        kl = jnp.mean(kl_heads)  # every head has the same valid rows: the mean over all rows
        # The regulariser belongs to correction: with correction off (the ablation's naive sum,
        # selection or compression alone) fidelity is still measured but trains nothing.
        weight = corr.aux_weight if corr.enabled else 0.0
        aux = {"aux_loss": weight * kl if weight else jnp.zeros((), jnp.float32),
               "fidelity": jax.lax.stop_gradient(kl), "fidelity_heads": jax.lax.stop_gradient(kl_heads)}
    captured_heads = _captured(branches, selection, gates, rule, kv_mask, q_pos, H=H, T=T, S=S,
                               n_global_rows=n_global_rows if query_block is None else 0)
    aux.update(captured=jnp.mean(captured_heads), captured_heads=captured_heads)
    if selection is not None:  # key blocks computed exactly per query block, on average (invalid slots cost nothing in a fused kernel)
        aux["slots"] = jnp.mean(jnp.sum(selection.valid, axis=-1, dtype=jnp.float32))
    elif exact:  # every key block (causal: every block up to the query's own), on average
        nq, nk = T_pad // sel_cfg.block_size, S_pad // sel_cfg.block_size
        aux["slots"] = jnp.asarray((nq + 1) / 2 if causal else nk, jnp.float32)

    out = jnp.swapaxes(out[:, :, : (T if query_block is None else Tq)], 1, 2)
    return out.astype(q.dtype), aux


# Log-weights of the regulariser's rows held at once, per (batch, head): `aux_rows x chunk` keys.
# The rows are evaluated over chunks of keys, each chunk recomputed in the backward pass, so that
# neither the pass nor its gradient keeps an `aux_rows x S` array (about 290 MB at 64K keys, 8 heads,
# 16 rows, before chunking).
FIDELITY_CHUNK_ELEMENTS = 1 << 16


def fidelity_chunk(num_rows: int, num_keys: int) -> int:
    """Keys evaluated together for the regulariser's rows."""
    return max(1, min(num_keys, FIDELITY_CHUNK_ELEMENTS // max(1, num_rows)))


def _over_key_chunks(fn, n: int):
    """`fn(i)` for chunk `i` of `n`, each rematerialised in the backward pass; outputs stacked
    `[n, ...]`. One call (no loop) when `n == 1`."""
    fn = jax.checkpoint(fn)
    if n == 1:
        return jax.tree.map(lambda x: x[None], fn(jnp.zeros((), jnp.int32)))
    return jax.lax.map(fn, jnp.arange(n, dtype=jnp.int32))


def _row_scores(q_BHRD, k_BSHD, **kw):
    """`q . k` for a few query rows against keys in the public layout, `[B, H, R, S]`; the query
    heads of a group share their key/value head."""
    B, H, R, D = q_BHRD.shape
    Hk = k_BSHD.shape[2]
    s = jnp.einsum("bkgrd,bskd->bkgrs", q_BHRD.reshape(B, Hk, H // Hk, R, D), k_BSHD, **kw)
    return s.reshape(B, H, R, k_BSHD.shape[1])


def _fidelity(qh, k_BSHD, kv_mask, T, branches, selection, exclude, comp_state, gates, rule, config, *, causal, rng, n_global_rows):
    """KL(dense || approximate) on a few query rows, `O(rows * S * D)`.

    Each branch reports the absolute log-weight it gives every key for those rows; the merge
    rule combines them exactly as it combines the outputs. The keys are taken in chunks of
    `fidelity_chunk` (three passes: the rows' normalisers, the merged rows' normaliser, the KL),
    so memory is `rows x chunk`, in the backward pass too.
    """
    S = k_BSHD.shape[1]  # keys read in place, chunk by chunk (not a head-major copy)
    R = min(config.correction.aux_rows, T)
    if rng is None:
        rows = (jnp.arange(R) * T) // R + (T // R) // 2
    else:
        rows = rand.stratified(rng, T, R, stream=7)
    q_rows = qh[:, :, rows]
    chosen_blocks = selection.rows_block_mask(rows) if selection is not None else None  # [B, H, R, S / b]
    row_logw = COMPRESSIONS.get(config.compression.kind).extras["row_logw"] if comp_state is not None else None
    C = fidelity_chunk(R, S)
    n = -(-S // C)

    def chunk(i):
        """Dense scores, each branch's log-weights and the row key mask `[B, H, R, C]` on keys
        `start ..` of chunk `i`, and which of them are this chunk's own `[C]` (the last chunk
        ends at S, overlapping the one before when C does not divide S; None: all)."""
        start = jnp.minimum(i * C, S - C)
        k_pos = start + jnp.arange(C)
        own = None if S % C == 0 else k_pos >= i * C
        mask_c = None if kv_mask is None else jax.lax.dynamic_slice_in_dim(kv_mask, start, C, axis=1)
        k_c = jax.lax.dynamic_slice_in_dim(k_BSHD, start, C, axis=1)
        s_rows = _row_scores(q_rows, k_c, preferred_element_type=jnp.float32)
        keys = _row_key_mask(rows, k_pos, causal=causal, kv_mask=mask_c)
        logws, chosen_keys = [], None
        if selection is not None:
            chosen_keys = jnp.take(chosen_blocks, k_pos // selection.block_size, axis=-1)
            logws.append(jnp.where(keys & chosen_keys, s_rows, LOG0))
        if row_logw is not None:
            excluded = chosen_keys if exclude is not None else None
            logws.append(row_logw(comp_state, q_rows, rows, excluded, causal=causal, kv_mask=mask_c, start=start, size=C))
        return jnp.where(keys, s_rows, LOG0), logws, keys, own

    def lse(x, own):  # log-sum-exp of a chunk's own keys
        return jax.nn.logsumexp(x if own is None else jnp.where(own, x, LOG0), axis=-1)

    def normalisers(i):
        s_dense, logws, keys, own = chunk(i)
        return lse(s_dense, own), [lse(lw, own) for lw in logws], jnp.any(keys, -1)

    lse_dense, lses, row_ok = _over_key_chunks(normalisers, n)
    lse_dense = jax.lax.stop_gradient(jax.nn.logsumexp(lse_dense, axis=0))
    lses, row_ok = [jax.nn.logsumexp(ls, axis=0) for ls in lses], jnp.any(row_ok, axis=0)
    if len(lses) == 1:
        merged, lse_merged = (lambda logws: logws[0]), lses[0]
    else:
        merged = lambda logws: rule.extras["rows"](logws, gates, lses)  # noqa: E731

        def merged_normaliser(i):
            _, logws, _, own = chunk(i)
            return lse(merged(logws), own)

        lse_merged = jax.nn.logsumexp(_over_key_chunks(merged_normaliser, n), axis=0)

    def kl_chunk(i):
        s_dense, logws, _, own = chunk(i)
        logp_dense = jax.lax.stop_gradient(s_dense - lse_dense[..., None])
        logp = merged(logws) - lse_merged[..., None]
        if n_global_rows:
            logp = jnp.where((rows < n_global_rows)[None, None, :, None], logp_dense, logp)
        return kl_terms(logp_dense, logp, own)

    kl = jnp.sum(_over_key_chunks(kl_chunk, n), axis=0)
    return kl_rows(kl, row_ok, per_head=True)


def _captured(branches, selection, gates, rule, kv_mask, q_pos, *, H, T, S, n_global_rows):
    """Per head `[H]`: the share of the approximate attention's mass computed exactly, averaged
    over the real query rows (positions < T; in self-attention with a padding mask, the unpadded
    ones). With selection and compression both on it is the exact branch's share of the merged
    normaliser (`exp(lse_exact - lse_merged)` for the `lse` merge, the gate's share for gated
    sums); 1 for dense attention and for selection alone (all it attends to is exact, whatever it
    leaves out); 0 for compression alone. BigBird's global query rows are exact: 1. From the
    branches' `[B, H, T]` statistics only: no `T x S` tensor."""
    if not branches or (selection is not None and len(branches) == 1):
        return jnp.ones((H,), jnp.float32)
    if selection is None:
        return jnp.zeros((H,), jnp.float32)
    B, _, Tq = branches[0].ls.shape
    share = rule.extras["shares"](branches, gates)[0]  # the selection branch comes first
    if n_global_rows:
        share = jnp.where((q_pos < n_global_rows)[None, None, :], 1.0, share)
    w = jnp.broadcast_to((q_pos < T)[None, :], (B, Tq)).astype(jnp.float32)
    if kv_mask is not None and T == S:  # self-attention: padded queries are not real rows
        w = w * jnp.take(kv_mask, jnp.minimum(q_pos, kv_mask.shape[1] - 1), axis=1).astype(jnp.float32)
    return jnp.sum(share * w[:, None, :], axis=(0, 2)) / jnp.maximum(jnp.sum(w), 1.0)
