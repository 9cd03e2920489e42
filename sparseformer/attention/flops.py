"""FLOPs an attention config performs, counted from shapes and budget (forward pass).

Conventions: a multiply-add is 2 FLOPs; one computed query-key pair costs `4 * D` (its
logit and its share of `P @ V`); pairs computed and then masked count (they are computed);
softmax exponentials and reductions are not counted. The backward pass of attention costs
about twice its forward (`fwd_bwd = 3 * fwd`), which benchmarks use.
Each component registers its own count as `extras["flops"]`.
"""

from __future__ import annotations

import ml_collections

from sparseformer.attention.config import budget_exceeds_keys, pool_block_size
from sparseformer.attention.registry import COMPRESSIONS, ESTIMATORS


def slots_per_query_block(config: ml_collections.ConfigDict, *, num_key_blocks: int, causal: bool) -> int:
    """Static number of key blocks each query block computes (invalid slots included); every key
    block where the budget exceeds them (`attend` computes exact attention there)."""
    sel = config.selection
    if budget_exceeds_keys(config, causal=causal, kv_len=num_key_blocks * sel.block_size):
        return num_key_blocks
    if sel.window >= num_key_blocks - 1:
        static = num_key_blocks
    else:
        static = (sel.window + 1 if causal else 2 * sel.window + 1) + sel.global_blocks
    return static + sel.random_blocks + sel.top_k


def _reg(registry, name, fn):
    registry.add_extra(name, "flops", fn)


# estimator counts: f(config, B, H, T, S, D) for the top-k scores
_reg(ESTIMATORS, "pooled", lambda c, B, H, T, S, D: 2 * B * H * (T // c.selection.block_size) * (S // c.selection.block_size) * D)
_reg(ESTIMATORS, "maxkey", lambda c, B, H, T, S, D: 2 * B * H * (T // c.selection.block_size) * S * D)
_reg(ESTIMATORS, "bound", lambda c, B, H, T, S, D: 4 * B * H * T * (S // c.selection.block_size) * D)
_reg(ESTIMATORS, "sampled", lambda c, B, H, T, S, D: 2 * B * H * (T // c.selection.block_size) * min(c.selection.sample_rows, c.selection.block_size) * S * D)
_reg(ESTIMATORS, "oracle", lambda c, B, H, T, S, D: 2 * B * H * T * S * D)


def _performer_flops(c, B, H, T, S, D, causal):
    r = c.compression.rank
    features = 2 * B * H * (T + S) * r * D
    if not causal:
        return features + 2 * B * H * S * r * D + 2 * B * H * T * r * (D + 1)
    chunk = c.selection.block_size
    return features + 2 * B * H * S * r * D + 2 * B * H * T * r * (D + 1) + 2 * B * H * T * chunk * (r + D)


def _nystrom_flops(c, B, H, T, S, D, causal):
    L, iters = c.compression.rank, c.compression.pinv_iters
    kernels = 2 * B * H * (T * L * D + L * L * D + L * S * D)
    pinv = B * H * iters * 4 * 2 * L**3
    apply = 2 * B * H * (T * L * L + S * L * D + T * L * (D + 1))
    return kernels + pinv + apply


# compression counts: f(config, B, H, T, S, D, causal)
_reg(COMPRESSIONS, "pool", lambda c, B, H, T, S, D, causal: 4 * B * H * T * (S // pool_block_size(c)) * D)
_reg(COMPRESSIONS, "performer", _performer_flops)
_reg(COMPRESSIONS, "nystrom", _nystrom_flops)
_reg(COMPRESSIONS, "linformer", lambda c, B, H, T, S, D, causal: 4 * B * H * S * c.compression.rank * D + 4 * B * H * T * c.compression.rank * D)


def flops(
    config: ml_collections.ConfigDict, *, batch: int, q_len: int, kv_len: int, heads: int, head_dim: int, causal: bool
) -> dict[str, int]:
    """Forward FLOPs by part: `exact` (pairs computed exactly), `estimator`, `compression`
    (including exclusion), `correction` (the regulariser's rows), and `total`.

    A component registered without a count contributes 0 and is named in `uncounted`.
    """
    B, T, S, H, D = batch, q_len, kv_len, heads, head_dim
    sel, comp, corr = config.selection, config.compression, config.correction
    out = {"exact": 0, "estimator": 0, "compression": 0, "correction": 0}
    uncounted: list[str] = []
    # dense attention, or a budget with more key blocks than there are (attend computes them all)
    if (not sel.enabled and not comp.enabled) or budget_exceeds_keys(config, causal=causal, kv_len=S):
        out["exact"] = 4 * B * H * T * S * D
        out["total"] = out["exact"]
        return out
    K = 0
    if sel.enabled:
        b = sel.block_size
        K = slots_per_query_block(config, num_key_blocks=S // b, causal=causal)
        out["exact"] = 4 * B * H * T * K * b * D
        if sel.global_queries and not causal:
            out["exact"] += 4 * B * H * sel.global_blocks * b * S * D
        if sel.top_k:
            f = ESTIMATORS.get(sel.estimator).extras.get("flops")
            out["estimator"] = f(config, B, H, T, S, D) if f else 0
            if f is None:
                uncounted.append(f"estimator {sel.estimator}")
    if comp.enabled:
        f = COMPRESSIONS.get(comp.kind).extras.get("flops")
        out["compression"] = f(config, B, H, T, S, D, causal) if f else 0
        if f is None:
            uncounted.append(f"compression {comp.kind}")
        exclusion = sel.enabled and corr.enabled and corr.exclusion and comp.kind in ("performer", "nystrom")
        if exclusion:
            feats = comp.rank
            out["compression"] += 2 * B * H * T * K * sel.block_size * (feats + D)
    if corr.enabled and corr.aux_rows and (sel.enabled or comp.enabled):
        out["correction"] = 2 * B * H * min(corr.aux_rows, T) * S * D
    out["total"] = sum(out.values())
    if uncounted:
        out["uncounted"] = uncounted  # type: ignore[assignment]
    return out
