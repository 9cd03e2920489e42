"""`presets.from_spec`: a preset with typed `section.field=value` overrides, bad ones refused by name."""

import pytest

from sparseformer.attention import presets


def test_overrides_are_typed_like_the_defaults():
    c = presets.from_spec("rsa;selection.block_size=32;selection.mass_threshold=0.9;correction.gate=True")
    assert c.selection.block_size == 32 and isinstance(c.selection.block_size, int)
    assert c.selection.mass_threshold == 0.9 and c.correction.gate is True
    assert presets.from_spec("rsa").to_dict() == presets.get("rsa").to_dict()


@pytest.mark.parametrize("spec,match", [
    ("rsa;selection.topk=3", "model.attention.selection.topk: no such field"),
    ("rsa;select.top_k=3", "model.attention.select: not a section"),
    ("rsa;selection.top_k=three", "model.attention.selection.top_k: 'three' is not a int"),
    ("rsa;correction.gate=yes", "model.attention.correction.gate: 'yes' is not allowed; True or False"),
    ("rsa;top_k=3", "expected section.field=value"),
    ("fast;selection.top_k=3", "preset: 'fast' is not one of"),
])
def test_bad_overrides_name_the_key(spec, match):
    with pytest.raises(ValueError, match=match):
        presets.from_spec(spec)
