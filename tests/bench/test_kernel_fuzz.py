"""`benchmarks/kernel_fuzz.py`: drawn cases agree, a planted bug fails its seed, bad seeds are refused."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax.numpy as jnp
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import kernel_fuzz  # noqa: E402

from sparseformer.attention import kernel_check  # noqa: E402

# seed 1: the Triton kernel interpreted, causal, a padded tail, every slot valid, pieces of lists;
# seed 129: the TPU kernel, a whole key block padded, no diagonal slot, query blocks 2-3 of 4 against
# all the keys (a prefill chunk), GQA, `[B, T, H, D]` read in place
SEEDS = (1, 129)


def test_the_same_seed_draws_the_same_case_and_seeds_differ():
    assert kernel_fuzz.draw_case(1) == kernel_fuzz.draw_case(1)
    cases = [kernel_fuzz.draw_case(s) for s in range(40)]
    for key, values in (("target", {"triton", "tpu"}), ("dtype", {"float32", "bfloat16"}),
                        ("padding", set(kernel_fuzz.PADDINGS)), ("causal", {True, False}), ("diagonal", {True, False}),
                        ("layout", {"BHTD", "BTHD"}), ("long_lists", {1, 2, 8}),
                        ("extras_first", {True, False}), ("finish_walks_first", {True, False}),
                        ("pool_p", {0, 1}), ("pool_moments", {True, False})):
        assert {c[key] for c in cases} == values, key
    assert any(c["queries"] is None for c in cases) and any(c["queries"] for c in cases)
    c1, c2 = (kernel_fuzz.draw_case(s) for s in SEEDS)
    assert (c1["target"], c1["causal"], c1["padding"], c1["queries"]) == ("triton", True, "tail", None)
    assert (c2["target"], c2["padding"], c2["diagonal"], c2["queries"], c2["layout"]) == ("tpu", "block", False, [2, 3], "BTHD")


def test_drawn_cases_agree_and_the_report_lists_them(tmp_path, capsys):
    out = tmp_path / "fuzz.json"
    assert kernel_fuzz.main([f"--seeds={SEEDS[0]}:{SEEDS[0] + 1}", f"--out={out}"]) == 0
    assert kernel_fuzz.main([f"--seeds={SEEDS[1]}:{SEEDS[1] + 1}"]) == 0
    report = json.loads(out.read_text())
    (case,) = report["cases"]
    assert report["failed"] == [] and case["ok"] and case["seed"] == SEEDS[0]
    # a Triton case holds the fused pooled branch to the XLA one too
    kinds = {"out", "lse", "dq", "dk", "dv"}
    assert set(case["errors"]) == kinds | {f"pool_{k}" for k in kinds} and max(case["errors"].values()) < 1e-4
    assert "1 agree, 0 refused, 0 failed" in capsys.readouterr().out


def test_a_planted_bug_fails_its_seed(monkeypatch, capsys):
    real = kernel_check.fused_block_attention

    def off(*args, **kwargs):
        out, lse = real(*args, **kwargs)
        return out * jnp.asarray(1.01, out.dtype), lse

    monkeypatch.setattr(kernel_check, "fused_block_attention", off)
    assert kernel_fuzz.main([f"--seeds={SEEDS[0]}:{SEEDS[0] + 1}"]) == 1
    printed = capsys.readouterr().out
    assert f"FAILED seed {SEEDS[0]}" in printed and '"causal": true' in printed and f"(seeds [{SEEDS[0]}])" in printed


def test_a_kernel_that_raises_fails_and_a_refusal_does_not():
    case = kernel_fuzz.draw_case(SEEDS[0])

    def raising(*args, **kwargs):
        raise RuntimeError("lowering broke")

    def refusing(*args, **kwargs):
        raise ValueError("model.attention.selection.kernel: 'pallas' cannot run this")

    for fn, ok in ((raising, False), (refusing, True)):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(kernel_check, "fused_block_attention", fn)
            r = kernel_fuzz.run_case(case)
        assert r["ok"] == ok and ("refused" in r) == ok and ("error" in r) != ok


@pytest.mark.parametrize("text", ["5:2", "0", "a:b", "-3"])
def test_bad_seeds_are_refused_with_what_is_allowed(text, capsys):
    with pytest.raises(SystemExit) as e:
        kernel_fuzz.main([f"--seeds={text}"])
    assert e.value.code == 2
    assert f"{text!r} is not allowed; allowed: N or A:B with A < B" in capsys.readouterr().err


def test_a_planted_bug_in_the_fused_pooled_branch_fails_its_seed(monkeypatch, capsys):
    from sparseformer.attention import pallas_pool

    real = pallas_pool.pool_attention
    monkeypatch.setattr(pallas_pool, "pool_attention", lambda *a, **k: tuple(x * 1.01 for x in real(*a, **k)))
    assert kernel_fuzz.main([f"--seeds={SEEDS[0]}:{SEEDS[0] + 1}"]) == 1
    assert f"FAILED seed {SEEDS[0]}" in capsys.readouterr().out
