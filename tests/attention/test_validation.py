"""Bad input gets a clear error naming the key, the bad value and the allowed values."""

import ml_collections
import pytest

from sparseformer.attention import COMPRESSIONS, ESTIMATORS, default_config, presets, validate


def _cfg(**sections):
    c = default_config()
    for name, values in sections.items():
        c[name].update(values)
    return c


CASES = [
    (_cfg(selection=dict(enabled=True, top_k=2, estimator="magic")), {}, "selection.estimator: 'magic' is not one of pooled, bound, maxkey, lsekey, sampled, oracle"),
    (_cfg(selection=dict(enabled=True, kernel="cuda")), {}, "selection.kernel: 'cuda' is not allowed; must be one of auto, pallas, scan, masked"),
    (_cfg(compression=dict(enabled=True, kind="nonsense")), {}, "model.attention.compression.kind: 'nonsense' is not one of pool, performer, nystrom, linformer"),
    (_cfg(correction=dict(enabled=True, merge="average")), {}, "correction.merge: 'average' is not one of"),
    (_cfg(selection=dict(enabled=True, block_size=64)), dict(seq_len=100), "selection.block_size: query length 100 is not a multiple of 64"),
    (_cfg(selection=dict(enabled=True, block_size=64, top_k=20)), dict(seq_len=500), "selection.block_size: query length 500 is not a multiple of 64"),
    (_cfg(compression=dict(enabled=True, kind="nystrom", rank=1024)), dict(padded=True), "compression.rank: 1024 is not allowed; nystrom landmarks must be at most the length 512"),
    (_cfg(compression=dict(enabled=True, kind="linformer")), dict(causal=True), "compression.kind: 'linformer' is not allowed; causal attention needs one of pool, performer"),
    (_cfg(compression=dict(enabled=True, kind="nystrom")), dict(causal=True), "compression.kind: 'nystrom'"),
    (_cfg(selection=dict(enabled=True), compression=dict(enabled=True, kind="linformer"), correction=dict(enabled=True, exclusion=True)), {}, "correction.exclusion: True is not allowed; compression 'linformer' cannot exclude"),
    (_cfg(correction=dict(aux_weight=0.5, aux_rows=0)), {}, "correction.aux_rows: 0 is not allowed"),
    (_cfg(correction=dict(gate=True)), {}, "correction.gate: True is not allowed; gates need correction.enabled=True"),
    (_cfg(selection=dict(enabled=True, window=-1)), {}, "selection.window: -1"),
    (_cfg(selection=dict(enabled=True, anchors=3)), {}, "selection.anchors: 3 is not allowed; must divide selection.block_size=64"),
    (_cfg(selection=dict(enabled=True, anchors=0)), {}, "selection.anchors: 0 is not allowed; must be >= 1"),
    (_cfg(selection=dict(enabled=True, mass_threshold=0.0)), {}, "selection.mass_threshold: 0.0 is not allowed; must be in (0, 1]"),
    (_cfg(selection=dict(enabled=True, mass_threshold=1.5)), {}, "selection.mass_threshold: 1.5 is not allowed; must be in (0, 1]"),
    (_cfg(selection=dict(enabled=True, causal_choice="own_block")), {}, "selection.causal_choice: 'own_block' is not allowed; must be one of first_query, previous_block"),
]


@pytest.mark.parametrize("config,kwargs,message", CASES)
def test_invalid_config_raises_a_clear_error(config, kwargs, message):
    args = dict(causal=False, seq_len=512) | kwargs
    with pytest.raises(ValueError) as info:
        validate(config, **args)
    assert message in str(info.value)


def test_wrong_type_is_named():
    raw = default_config().to_dict()
    raw["selection"]["block_size"] = "64"  # e.g. a config read back from JSON by hand
    with pytest.raises(ValueError, match="selection.block_size: '64' is not allowed; expected int"):
        validate(ml_collections.ConfigDict(raw), causal=False, seq_len=512)


def test_unknown_key_is_named():
    c = default_config()
    c.selection.unlock() if hasattr(c.selection, "unlock") else None
    c.selection.topk = 3
    with pytest.raises(ValueError, match=r"model.attention.selection.topk: unknown key; known: anchors, block_size, causal_choice"):
        validate(c, causal=False, seq_len=512)


@pytest.mark.parametrize("name", presets.names())
def test_every_preset_validates_at_its_default_budget(name):
    causal_ok = all(
        COMPRESSIONS.get(presets.get(name).compression.kind).supports_causal or not presets.get(name).compression.enabled
        for _ in [0]
    )
    validate(presets.get(name), causal=False, seq_len=4096)
    if causal_ok:
        validate(presets.get(name), causal=True, seq_len=4096)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match="'fancy' is not one of dense, local, bigbird"):
        presets.get("fancy")


def test_registry_error_lists_names():
    with pytest.raises(ValueError, match="is not one of pooled, bound"):
        ESTIMATORS.get("nope")
