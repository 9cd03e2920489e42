"""The `model.attention` config: its defaults, and validation before anything compiles.

Every field has a one-line comment; `validate` checks types, names, budgets and
combinations, and raises `ValueError` naming the full key, the bad value and what is allowed.
"""

from __future__ import annotations

import math
from typing import Any

import ml_collections

from sparseformer.attention.registry import COMPRESSIONS, CORRECTIONS, ESTIMATORS

PREFIX = "model.attention"


def default_config() -> ml_collections.ConfigDict:
    """Everything off: dense attention. Presets switch components on."""
    c = ml_collections.ConfigDict()
    c.selection = ml_collections.ConfigDict()
    c.selection.enabled = False  # compute chosen query-key blocks exactly
    c.selection.block_size = 64  # tokens per query block and per key block
    c.selection.window = 1  # key blocks on each side of the query block (causal: past side only; at the edges it slides inwards)
    c.selection.global_blocks = 0  # the first key blocks, seen by every query block
    c.selection.global_queries = False  # the first `global_blocks` query blocks see every key (BigBird; bidirectional only: causal rows see their past anyway)
    c.selection.random_blocks = 0  # key blocks drawn at random per query block and head
    c.selection.top_k = 0  # key blocks ranked by the importance estimate
    c.selection.estimator = "bound"  # importance estimate for top_k: pooled, bound, maxkey, lsekey, sampled, oracle
    c.selection.sample_rows = 4  # query rows per block scored exactly by the `sampled` estimator
    c.selection.anchors = 1  # query sub-blocks the estimator scores apart (a block's score: the best over them), so a query block holding several groups finds what each wants; >= block_size: every row. Causal: the first query of each sub-block, whose slots serve its rows on
    c.selection.mass_threshold = 1.0  # top_k stops taking blocks once their estimated share of the mass (with the static blocks') reaches this; the rest stay invalid (1.0: always all top_k). Causal with anchors: the anchors share the top_k slots in turn
    c.selection.causal_choice = "first_query"  # causal: which queries choose a block's keys: first_query (the block's first query, seen by every row: no lag) or previous_block (the previous block's queries: a block late)
    c.selection.kernel = "auto"  # exact part: pallas (fused GPU kernel; interpreted on CPU: tests), scan (XLA block-sparse, memory ~ T*D), masked (dense logits masked to the chosen blocks: faster for short inputs, memory ~ T*S), auto (GPU: pallas; else masked up to 512 keys, scan beyond)

    c.compression = ml_collections.ConfigDict()
    c.compression.enabled = False  # summarise what selection left out in a low-rank form
    c.compression.kind = "pool"  # pool, performer, nystrom, linformer
    c.compression.rank = 64  # performer features, nystrom landmarks, linformer projected length
    c.compression.block_size = 0  # pool: tokens per summary token (0 = selection.block_size)
    c.compression.pool_moments = False  # pool: add |q|^2 var/2 so spread-out blocks are not undercounted
    c.compression.pinv_iters = 6  # nystrom: Newton-Schulz iterations of the pseudo-inverse

    c.correction = ml_collections.ConfigDict()
    c.correction.enabled = False  # off: branches are added naively (overlap counted twice)
    c.correction.merge = "lse"  # lse (one exact softmax normaliser) or gated_sum (NSA)
    c.correction.exclusion = True  # compressed branch leaves out blocks selection computed
    c.correction.gate = False  # learned per-head sigmoid gates on the branches
    c.correction.aux_weight = 0.0  # weight of the KL(dense || approximate) regulariser
    c.correction.aux_rows = 0  # query rows per layer sampled for the regulariser and fidelity
    return c


# Keys added after runs were saved without them, with the value that reproduces how those runs
# attended (not always today's default: causal choice used to come from the previous block).
# `upgrade` fills them in when a saved run's config is read; add a line here with every new key.
LEGACY_VALUES: dict[str, Any] = {
    "selection.anchors": 1,
    "selection.mass_threshold": 1.0,
    "selection.causal_choice": "previous_block",
    "selection.kernel": "auto",
}


def upgrade(config: ml_collections.ConfigDict) -> list[str]:
    """Fill in place the keys of `LEGACY_VALUES` that a saved `model.attention` config lacks;
    the dotted keys filled (a run saved before they existed attends as it was trained)."""
    filled = []
    for dotted, value in LEGACY_VALUES.items():
        section, key = dotted.split(".")
        if section in config and key not in config[section]:
            with config.unlocked():
                config[section][key] = value
            filled.append(dotted)
    return filled


_TYPES: dict[str, type | tuple[type, ...]] = {
    "selection.enabled": bool,
    "selection.block_size": int,
    "selection.window": int,
    "selection.global_blocks": int,
    "selection.global_queries": bool,
    "selection.random_blocks": int,
    "selection.top_k": int,
    "selection.estimator": str,
    "selection.sample_rows": int,
    "selection.anchors": int,
    "selection.mass_threshold": (int, float),
    "selection.causal_choice": str,
    "selection.kernel": str,
    "compression.enabled": bool,
    "compression.kind": str,
    "compression.rank": int,
    "compression.block_size": int,
    "compression.pool_moments": bool,
    "compression.pinv_iters": int,
    "correction.enabled": bool,
    "correction.merge": str,
    "correction.exclusion": bool,
    "correction.gate": bool,
    "correction.aux_weight": (int, float),
    "correction.aux_rows": int,
}


KERNELS = ("auto", "pallas", "scan", "masked")
CAUSAL_CHOICES = ("first_query", "previous_block")
# `auto` uses the masked kernel up to this many keys: below it, the scan's many small block
# matmuls cost more than dense logits (CPU, 128 tokens in blocks of 8: 4x slower fwd+bwd).
AUTO_MASKED_MAX_KEYS = 512


def selection_kernel(
    config: ml_collections.ConfigDict, kv_len: int, *, head_dim: int | None = None, backend: str | None = None,
    dtype: Any = None,
) -> str:
    """The exact part's kernel for a key length: `pallas`, `scan` or `masked` (`auto` resolved).

    `auto` takes the fused `pallas` kernel on a GPU when the shapes allow it (block size and head
    dim powers of two >= 16; in float32, a block's tiles within shared memory: see
    `pallas_kernel.unsupported_reason`); elsewhere `masked` up to `AUTO_MASKED_MAX_KEYS` keys,
    `scan` beyond. The backend is the default one, or the GPU under `pallas_kernel.compile_for_gpu()`.
    """
    kernel = config.selection.kernel
    if kernel != "auto":
        return kernel
    import jax

    from sparseformer.attention.pallas_kernel import kernel_target, unsupported_reason

    if backend is None:  # compiling for a GPU without one (`compile_for_gpu`) resolves as on a GPU
        backend = "gpu" if kernel_target() == ("triton", False) else jax.default_backend()
    if (backend == "gpu" and head_dim is not None
            and unsupported_reason(config.selection.block_size, head_dim, dtype, compiled_gpu=True) is None):
        return "pallas"
    return "masked" if kv_len <= AUTO_MASKED_MAX_KEYS else "scan"


def _err(key: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"{PREFIX}.{key}: {value!r} is not allowed; {allowed}")


def _get(config: ml_collections.ConfigDict, dotted: str) -> Any:
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node


def pool_block_size(config: ml_collections.ConfigDict) -> int:
    """Tokens per pooled summary token."""
    return config.compression.block_size or config.selection.block_size


def block_multiple(config: ml_collections.ConfigDict, *, causal: bool = False) -> int:
    """Sequence lengths must be a multiple of this (or come with a padding mask)."""
    sizes = [1]
    if config.selection.enabled:
        sizes.append(config.selection.block_size)
    if config.compression.enabled:
        kind = config.compression.kind
        if kind == "pool":
            sizes.append(pool_block_size(config))
        elif kind == "performer" and causal:
            sizes.append(config.selection.block_size)
        elif kind == "nystrom":
            sizes.append(config.compression.rank)
    return math.lcm(*sizes)


def budget_exceeds_keys(config: ml_collections.ConfigDict, *, causal: bool, kv_len: int) -> bool:
    """Whether selection's budget holds more key blocks than a key length of `kv_len` has.

    That is: more global blocks than key blocks, or more ranked and random blocks (`top_k +
    random_blocks`) than are left after the window and the global blocks. Every key block then fits
    the budget, so the call computes them all: exact attention (`attend` runs dense attention; a
    budget covering everything equals dense). This is how a model trained with a budget of, say,
    8 blocks runs inputs of fewer blocks. A budget that fits exactly is not "exceeding": there the
    method runs as configured (its estimator and `mass_threshold` choose among all the blocks).
    """
    sel = config.selection
    if not sel.enabled:
        return False
    nk, available = key_blocks_left(config, causal=causal, kv_len=kv_len)
    return sel.global_blocks > nk or sel.top_k + sel.random_blocks > available


def key_blocks_left(config: ml_collections.ConfigDict, *, causal: bool, kv_len: int) -> tuple[int, int]:
    """`(key blocks, those left after the window and the global blocks)` at a key length of
    `kv_len`: what `top_k + random_blocks` choose from."""
    sel = config.selection
    nk = -(-int(kv_len) // sel.block_size)
    width = sel.window + 1 if causal else 2 * sel.window + 1
    return nk, max(0, nk - min(nk, width + sel.global_blocks))


def _check_known_keys(config: ml_collections.ConfigDict) -> None:
    defaults = default_config()
    for section in config.keys():
        if section not in defaults:
            raise ValueError(f"{PREFIX}.{section}: unknown section; known: {', '.join(defaults.keys())}")
        for key in config[section].keys():
            if key not in defaults[section]:
                raise ValueError(
                    f"{PREFIX}.{section}.{key}: unknown key; known: {', '.join(defaults[section].keys())}"
                )
    for dotted, typ in _TYPES.items():
        try:
            value = _get(config, dotted)
        except (KeyError, AttributeError):
            raise ValueError(f"{PREFIX}.{dotted}: missing") from None
        ok = isinstance(value, typ) and not (typ is int and isinstance(value, bool))
        if not ok:
            names = typ.__name__ if isinstance(typ, type) else " or ".join(t.__name__ for t in typ)
            raise _err(dotted, value, f"expected {names}")


def validate(
    config: ml_collections.ConfigDict,
    *,
    causal: bool,
    seq_len: int,
    kv_len: int | None = None,
    padded: bool = False,
    max_len: int | None = None,
) -> None:
    """Raise `ValueError` for a config that cannot run this call, before anything compiles.

    Args:
      config: the `model.attention` config.
      causal: whether the call is causal.
      seq_len: query length T.
      kv_len: key length S (defaults to T).
      padded: a key padding mask will be passed (lengths are then padded internally).
      max_len: the length parameters were created for (fixed-length compressions).
    """
    _check_known_keys(config)
    kv_len = seq_len if kv_len is None else kv_len
    sel, comp, corr = config.selection, config.compression, config.correction

    ESTIMATORS.get(sel.estimator)
    COMPRESSIONS.get(comp.kind)
    CORRECTIONS.get(corr.merge)

    if sel.kernel not in KERNELS:
        raise _err("selection.kernel", sel.kernel, f"must be one of {', '.join(KERNELS)}")
    if sel.causal_choice not in CAUSAL_CHOICES:
        raise _err("selection.causal_choice", sel.causal_choice, f"must be one of {', '.join(CAUSAL_CHOICES)}")
    for key in ("block_size", "sample_rows", "anchors"):
        if sel[key] < 1:
            raise _err(f"selection.{key}", sel[key], "must be >= 1")
    if not 0.0 < sel.mass_threshold <= 1.0:
        raise _err("selection.mass_threshold", sel.mass_threshold, "must be in (0, 1]")
    if sel.anchors < sel.block_size and sel.block_size % sel.anchors:
        raise _err(
            "selection.anchors", sel.anchors,
            f"must divide selection.block_size={sel.block_size} (or be at least it: every row an anchor)",
        )
    if sel.enabled and sel.kernel == "pallas" and (sel.block_size < 16 or sel.block_size & (sel.block_size - 1)):
        raise _err("selection.block_size", sel.block_size, "selection.kernel='pallas' needs a power of two >= 16")
    for key in ("window", "global_blocks", "random_blocks", "top_k"):
        if sel[key] < 0:
            raise _err(f"selection.{key}", sel[key], "must be >= 0")
    if comp.rank < 1:
        raise _err("compression.rank", comp.rank, "must be >= 1")
    if comp.block_size < 0:
        raise _err("compression.block_size", comp.block_size, "must be >= 0 (0 = selection.block_size)")
    if corr.aux_rows < 0:
        raise _err("correction.aux_rows", corr.aux_rows, "must be >= 0")
    if corr.aux_weight < 0:
        raise _err("correction.aux_weight", corr.aux_weight, "must be >= 0")
    if corr.aux_weight > 0 and corr.aux_rows == 0:
        raise _err("correction.aux_rows", 0, "must be >= 1 when correction.aux_weight > 0")

    multiple = block_multiple(config, causal=causal)
    for name, length in (("query", seq_len), ("key", kv_len)):
        if length % multiple and not padded:
            raise ValueError(
                f"{PREFIX}.selection.block_size: {name} length {length} is not a multiple of {multiple} "
                f"(the block sizes in use); pass a kv_mask to pad, or choose a length that is a multiple"
            )
    if causal and seq_len != kv_len:
        raise ValueError(f"{PREFIX}: causal attention needs equal query and key lengths, got {seq_len} and {kv_len}")

    # Budgets are not refused: one larger than the key blocks computes them all (exact attention,
    # see budget_exceeds_keys), which is how a model runs inputs shorter than its budget.
    exact = budget_exceeds_keys(config, causal=causal, kv_len=kv_len)
    if sel.enabled:
        est = ESTIMATORS.get(sel.estimator)
        if sel.top_k and causal and not est.supports_causal:
            raise _err("selection.estimator", sel.estimator, f"causal calls need one of {_causal_names(ESTIMATORS)}")

    if comp.enabled:
        c = COMPRESSIONS.get(comp.kind)
        if causal and not c.supports_causal:
            raise _err(
                "compression.kind", comp.kind, f"causal attention needs one of {_causal_names(COMPRESSIONS)}"
            )
        if padded and not c.supports_padding:
            raise _err("compression.kind", comp.kind, "does not support a padding mask")
        if c.fixed_length and max_len is not None and kv_len > max_len:
            raise _err("compression.kind", comp.kind, f"needs key length <= max_len={max_len}, got {kv_len}")
        if comp.kind == "nystrom" and comp.rank > kv_len and not exact:
            raise _err("compression.rank", comp.rank, f"nystrom landmarks must be at most the length {kv_len}")
        if corr.enabled and corr.exclusion and sel.enabled:
            if not c.supports_exclusion:
                allowed = ", ".join(n for n in COMPRESSIONS.names() if COMPRESSIONS.get(n).supports_exclusion)
                raise _err(
                    "correction.exclusion", True, f"compression {comp.kind!r} cannot exclude blocks; use one of {allowed}"
                )
            if comp.kind == "pool" and sel.block_size % pool_block_size(config):
                raise _err(
                    "compression.block_size",
                    comp.block_size,
                    f"must divide selection.block_size={sel.block_size} for exclusion",
                )
    if corr.gate and not corr.enabled:
        raise _err("correction.gate", True, "gates need correction.enabled=True")


def _causal_names(registry) -> str:
    return ", ".join(n for n in registry.names() if registry.get(n).supports_causal)
