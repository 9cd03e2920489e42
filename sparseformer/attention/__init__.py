"""The attention core: selection, compression and correction as composable pure functions.

    from sparseformer.attention import attend, presets
    out, aux = attend(q, k, v, presets.get("rsa"), causal=True)

Registries (`ESTIMATORS`, `COMPRESSIONS`, `CORRECTIONS`) hold the components by name; a new
variant is one function and one `@REGISTRY.register(name, ...)`.
"""

from sparseformer.attention import presets
from sparseformer.attention.compose import attend, init_params
from sparseformer.attention.config import block_multiple, budget_exceeds_keys, default_config, pool_block_size, validate
from sparseformer.attention.correction import Branch
from sparseformer.attention.dense import dense_attention
from sparseformer.attention.flops import flops, slots_per_query_block
from sparseformer.attention.pallas_kernel import fused_block_attention
from sparseformer.attention.registry import COMPRESSIONS, CORRECTIONS, ESTIMATORS, Component, Registry
from sparseformer.attention.selection import Selection, block_sparse_attention, choose_blocks

__all__ = [
    "attend", "init_params", "validate", "block_multiple", "budget_exceeds_keys", "default_config", "pool_block_size", "presets",
    "flops", "slots_per_query_block", "dense_attention", "block_sparse_attention", "choose_blocks",
    "fused_block_attention", "Selection", "Branch", "ESTIMATORS", "COMPRESSIONS", "CORRECTIONS", "Component", "Registry",
]
