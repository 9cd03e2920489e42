"""Presets: the classic efficient-attention methods as data (configs of the three components).

| preset       | selection                            | compression | correction                          |
| dense        | off                                  | off         | off                                 |
| local        | window                               | off         | off                                 |
| bigbird      | window + global + random             | off         | off                                 |
| longformer   | window + global                      | off         | off                                 |
| linformer    | off                                  | linformer   | off                                 |
| performer    | off                                  | performer   | off                                 |
| nystrom      | off                                  | nystrom     | off                                 |
| scatterbrain | window                               | performer   | exclusion + merge                   |
| nsa          | window + global + top-k (pooled)     | pool        | gated sum (NSA's merge) + gates     |
| rsa          | own block + top-7 (maxkey, 4 anchors, mass threshold) | pool (+moments) | exclusion + merge + regulariser |

Budgets are in blocks of `selection.block_size` (64): `bigbird`, `nsa` and `rsa` all compute at
most 8 key blocks per query block exactly (BigBird: 3 window + 2 global + 3 random, as in its
paper; rsa: its own block and 7 ranked ones, neighbours included when the estimate ranks them,
fewer once the estimated mass reaches 0.95).
"""

from __future__ import annotations

from typing import Any

import ml_collections

from sparseformer.attention.config import default_config

_SEL = "selection"
_COMP = "compression"
_CORR = "correction"

# name -> (one-line description, overrides of default_config())
_PRESETS: dict[str, tuple[str, dict[str, dict[str, Any]]]] = {
    "dense": ("exact softmax attention", {}),
    "local": ("sliding window of blocks", {_SEL: dict(enabled=True, window=2)}),
    "bigbird": (
        "window + global + random blocks, global queries (Zaheer et al. 2020)",
        {_SEL: dict(enabled=True, window=1, global_blocks=2, random_blocks=3, global_queries=True)},
    ),
    "longformer": (
        "window + global blocks, global queries (Beltagy et al. 2020)",
        {_SEL: dict(enabled=True, window=2, global_blocks=1, global_queries=True)},
    ),
    "linformer": ("learned length projections (Wang et al. 2020)", {_COMP: dict(enabled=True, kind="linformer", rank=256)}),
    "performer": ("FAVOR+ random features (Choromanski et al. 2021)", {_COMP: dict(enabled=True, kind="performer", rank=256)}),
    "nystrom": ("Nystrom landmarks (Xiong et al. 2021)", {_COMP: dict(enabled=True, kind="nystrom", rank=64)}),
    "scatterbrain": (
        "window + performer, overlap excluded, one normaliser (Chen et al. 2021)",
        {
            _SEL: dict(enabled=True, window=1),
            _COMP: dict(enabled=True, kind="performer", rank=256),
            _CORR: dict(enabled=True, merge="lse", exclusion=True),
        },
    ),
    "nsa": (
        "window + global + top-k (pooled) + pooled summaries, gated sum (Yuan et al. 2025)",
        {
            _SEL: dict(enabled=True, window=1, global_blocks=1, top_k=4, estimator="pooled"),
            _COMP: dict(enabled=True, kind="pool"),
            _CORR: dict(enabled=True, merge="gated_sum", exclusion=False, gate=True),
        },
    ),
    "rsa": (
        "robust sparse attention: own block + top-7 by the best key of 4 query anchors (no fixed window), "
        "moment-matched pooled rest, exclusion, one normaliser, KL regulariser (this project)",
        {
            _SEL: dict(enabled=True, window=0, global_blocks=0, top_k=7, estimator="maxkey", anchors=4, mass_threshold=0.95),
            _COMP: dict(enabled=True, kind="pool", pool_moments=True),
            _CORR: dict(enabled=True, merge="lse", exclusion=True, aux_weight=0.1, aux_rows=16),
        },
    ),
}


def names() -> list[str]:
    """The preset names, in table order."""
    return list(_PRESETS)


def describe(name: str) -> str:
    """One line on what a preset is."""
    _check(name)
    return _PRESETS[name][0]


def get(name: str) -> ml_collections.ConfigDict:
    """A fresh `model.attention` ConfigDict for a preset (safe to modify)."""
    _check(name)
    config = default_config()
    for section, values in _PRESETS[name][1].items():
        config[section].update(values)
    return config


def from_spec(spec: str) -> ml_collections.ConfigDict:
    """`"rsa;selection.block_size=32;selection.top_k=15"`: a preset with `section.field=value`
    overrides, each value typed like the field's default (`True`/`False` for flags). Unknown sections
    or fields and values of the wrong type are refused naming the key and what is allowed."""
    name, *overrides = spec.split(";")
    return apply_overrides(get(name.strip()), overrides)


def apply_overrides(config: ml_collections.ConfigDict, overrides) -> ml_collections.ConfigDict:
    """`config` (a `model.attention` config) with `section.field=value` items applied in place and
    returned, typed and checked as `from_spec` says."""
    for item in filter(None, (o.strip() for o in overrides)):
        key, eq, value = item.partition("=")
        section, dot, field = key.partition(".")
        if not eq or not dot:
            raise ValueError(f"model.attention override {item!r}: expected section.field=value")
        if section not in config or not isinstance(config[section], ml_collections.ConfigDict):
            raise ValueError(f"model.attention.{section}: not a section; sections: "
                             f"{', '.join(k for k in config if isinstance(config[k], ml_collections.ConfigDict))}")
        if field not in config[section]:
            raise ValueError(f"model.attention.{key}: no such field; fields: {', '.join(config[section])}")
        current = config[section][field]
        if isinstance(current, bool):
            if value not in ("True", "False"):
                raise ValueError(f"model.attention.{key}: {value!r} is not allowed; True or False")
            config[section][field] = value == "True"
            continue
        try:
            config[section][field] = type(current)(value)
        except ValueError as e:
            raise ValueError(f"model.attention.{key}: {value!r} is not a {type(current).__name__}") from e
    return config


def components(config: ml_collections.ConfigDict) -> dict[str, str]:
    """A readable summary of what a config switches on (for listings and tables)."""
    sel, comp, corr = config.selection, config.compression, config.correction
    parts = []
    if sel.enabled:
        parts.append(f"window {sel.window}")
        if sel.global_blocks:
            parts.append(f"global {sel.global_blocks}" + (" (+queries)" if sel.global_queries else ""))
        if sel.random_blocks:
            parts.append(f"random {sel.random_blocks}")
        if sel.top_k:
            parts.append(f"top-{sel.top_k} ({sel.estimator})")
    correction = "off" + (" (naive sum)" if sel.enabled and comp.enabled else "")
    if corr.enabled:
        bits = [corr.merge]
        if corr.exclusion and sel.enabled and comp.enabled:
            bits.insert(0, "exclusion")
        if corr.gate:
            bits.append("gates")
        if corr.aux_weight:
            bits.append(f"KL x{corr.aux_weight:g} on {corr.aux_rows} rows")
        correction = " + ".join(bits)
    return {
        "selection": ", ".join(parts) + (f"; blocks of {sel.block_size}" if parts else "") or "off",
        "compression": f"{comp.kind} (rank {comp.rank})" if comp.enabled and comp.kind != "pool" else
        (("pool + moments" if comp.pool_moments else "pool") if comp.enabled else "off"),
        "correction": correction,
    }


def _check(name: str) -> None:
    if name not in _PRESETS:
        raise ValueError(f"model.attention preset: {name!r} is not one of {', '.join(_PRESETS)}")
