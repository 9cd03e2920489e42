"""Kernel launches counted from compiled HLO: loops multiplied out by their trip counts, free ops
not counted, and each launch traced back to the function of the code it came from."""

import jax
import jax.numpy as jnp
import pytest

from sparseformer.bench import hlo_stats


def _compiled_text(fn, *args) -> str:
    return jax.jit(fn).lower(*args).compile().as_text()


def test_a_loop_body_counts_once_per_trip():
    x = jnp.ones((64, 64))

    def looped(trips):
        return lambda x: jax.lax.fori_loop(0, trips, lambda i, c: jnp.tanh(c @ c), x)

    n5, n6, n9 = (hlo_stats.launches(_compiled_text(looped(t), x)) for t in (5, 6, 9))
    assert [loop["trip_count"] for loop in n9["loops"]] == [9]
    body = n6["launches"] - n5["launches"]  # one more trip: the body's launches once more
    assert body >= 1
    assert n9["launches"] - n6["launches"] == 3 * body


HLO = """HloModule m, entry_computation_layout={(f32[8]{0})->f32[8]{0}}

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]{0}) parameter(0)
  %x = f32[8]{0} get-tuple-element(%p), index=1
  %f = f32[8]{0} fusion(%x), kind=kLoop, calls=%fc, metadata={op_name="a" stack_frame_id=2}
  %g = f32[8]{0} custom-call(%f), custom_call_target="__gpu$xla.gpu.triton"
  ROOT %t = (s32[], f32[8]{0}) tuple(%i, %g)
}

%cond (p: (s32[], f32[8])) -> pred[] {
  %p = (s32[], f32[8]{0}) parameter(0)
  ROOT %c = pred[] fusion(%p), kind=kLoop, calls=%cc
}

ENTRY %main (a: f32[8]) -> f32[8] {
  %a = f32[8]{0} parameter(0)
  %c0 = f32[8]{0} copy(%a)
  %w = (s32[], f32[8]{0}) while(%t0), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"5"}}
  %u = (s32[], f32[8]{0}) while(%t0), condition=%cond, body=%body
  ROOT %r = f32[8]{0} get-tuple-element(%w), index=1
}

FileNames
1 "/src/sparseformer/attention/selection.py"
2 "/src/other.py"

FunctionNames
1 "maxkey_estimator"
2 "caller"

FileLocations
1 {file_name_id=1 function_name_id=1 line=10 end_line=10 column=1 end_column=2}
2 {file_name_id=2 function_name_id=2 line=3 end_line=3 column=1 end_column=2}

StackFrames
1 {file_location_id=2 parent_frame_id=1}
2 {file_location_id=1 parent_frame_id=1}
"""


def test_known_and_unknown_trip_counts_and_kinds():
    r = hlo_stats.launches(HLO)
    # copy 1; the known loop: 5 x (fusion + triton call); the unknown loop: its body once, its
    # condition twice (a first test and the one that ends it)
    assert r["by_kind"] == {"fusion:kLoop": 5 + 1 + 2, "custom-call:__gpu$xla.gpu.triton": 5 + 1, "copy": 1}
    assert r["launches"] == 15
    assert [loop["trip_count"] for loop in r["loops"]] == [5, None]


def test_launches_are_traced_to_the_innermost_function_of_the_package():
    by = hlo_stats.launches_by_source(HLO)
    # the body's fusion names selection.maxkey_estimator (its frame 2), 6 runs; the rest keep no frame
    assert by["sparseformer.attention.selection.maxkey_estimator"] == 6
    assert sum(by.values()) == 15


def test_no_entry_is_an_error():
    with pytest.raises(ValueError, match="ENTRY"):
        hlo_stats.parse("HloModule m\n")


def test_attend_launches_are_traced_to_the_estimator():
    from sparseformer.attention import attend, init_params, presets

    c = presets.get("rsa")
    c.selection.update(block_size=16, kernel="scan")
    q = jax.random.normal(jax.random.key(0), (1, 128, 2, 16))
    params = init_params(c, jax.random.key(1), num_heads=2, head_dim=16, max_len=128)
    text = _compiled_text(lambda q: attend(q, q, q, c, params=params)[0], q)
    by = hlo_stats.launches_by_source(text)
    assert by.get("sparseformer.attention.selection.maxkey_estimator", 0) >= 1
    assert sum(by.values()) == hlo_stats.launches(text)["launches"]
