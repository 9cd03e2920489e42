"""`sparseformer kernel-check`: the fused kernel against the reference on this device (here the
CPU, interpreted), with its verdict in the exit status."""

from __future__ import annotations

import json

import jax.numpy as jnp
import pytest

from sparseformer.attention import kernel_check


def test_passes_on_gqa_causal_padding_row_starts_and_writes_its_report(tmp_path, capsys):
    out = tmp_path / "check.json"
    code = kernel_check.kernel_check_main([
        "--length=128", "--block-size=16", "--head-dim=16", "--heads=4", "--kv-heads=2", "--causal", "--padding",
        "--row-starts", f"--out={out}"])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "interpreted" in text and "ok     float32 causal padding rowstart T128 b16 d16 4/2 heads" in text
    report = json.loads(out.read_text())
    case, branches = report["checks"]
    assert report["ok"] and case["deterministic"] and case["group"] == 2 and case["precision"] == "highest"
    assert set(case["errors"]) == {"out", "lse", "dq", "dk", "dv"} and max(case["errors"].values()) < 1e-4
    # the same shapes check the fused pooled branch and estimate against XLA's
    assert "ok     pool and estimate: float32 causal padding rowstart T128" in text
    assert branches["ok"] and branches["deterministic"] and branches["causal"] and branches["row_starts"]
    assert set(branches["errors"]) == {f"pool_{x}" for x in ("out", "lse", "dq", "dk", "dv")} | {"maxkey_scores"}
    assert max(branches["errors"].values()) < 1e-4


SMALL = ["--length=64", "--block-size=16", "--head-dim=16", "--heads=2"]


def _one_percent_off(real):
    """`real` (returning `(out, lse)`) with its output 1% off."""

    def off(*args, **kwargs):
        out, lse = real(*args, **kwargs)
        return out * 1.01, lse

    return off


def test_a_fused_pooled_branch_that_disagrees_fails(monkeypatch, capsys):
    from sparseformer.attention import pallas_pool

    monkeypatch.setattr(pallas_pool, "pool_attention", _one_percent_off(pallas_pool.pool_attention))
    assert kernel_check.kernel_check_main(SMALL) == 1
    captured = capsys.readouterr()
    assert "ok     float32 bidir T64" in captured.out  # the exact kernel still agrees
    assert "FAILED pool and estimate: float32 bidir T64" in captured.out and "(pool_out" in captured.out


def test_a_kernel_that_disagrees_or_breaks_fails_with_what_to_do(monkeypatch, capsys):
    monkeypatch.setattr(kernel_check, "fused_block_attention", _one_percent_off(kernel_check.fused_block_attention))
    assert kernel_check.kernel_check_main(SMALL) == 1
    captured = capsys.readouterr()
    assert "FAILED float32 bidir T64" in captured.out and "largest relative error 1.0e-02 (out" in captured.out
    assert "model.attention.selection.kernel=scan" in captured.err

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel for you")

    monkeypatch.setattr(kernel_check, "fused_block_attention", broken)
    assert kernel_check.kernel_check_main(SMALL) == 1
    assert "FAILED float32 bidir T64 b16 d16 2/2 heads: RuntimeError: no kernel for you" in capsys.readouterr().out


@pytest.mark.parametrize("flags,message", [
    (["--dtype=int8"], "--dtype: 'int8' is not allowed; allowed: bfloat16, float16, float32"),
    (["--heads=4", "--kv-heads=3"], "--kv-heads: 3 is not allowed; allowed: a divisor of --heads (4)"),
    (["--block-size=48"], "--block-size: selection.block_size 48: the pallas kernel needs a power of two >= 16"),
    (["--head-dim=24"], "--head-dim: head dim 24: the pallas kernel needs a power of two >= 16"),
    (["--length=100", "--block-size=32"], "--length: 100 is not allowed; allowed: a multiple of --block-size (32)"),
])
def test_bad_flags_are_refused_before_compiling(monkeypatch, capsys, flags, message):
    monkeypatch.setattr(kernel_check, "check", lambda *a, **k: pytest.fail("compiled despite a bad flag"))
    assert kernel_check.kernel_check_main(flags) == 2
    assert message in capsys.readouterr().err


def test_the_standard_cases_are_the_gpu_stages_and_the_command_is_listed(capsys):
    from sparseformer import cli

    assert len(kernel_check.CHECK_CASES) == 6
    assert {jnp.dtype(c["dtype"]).name for c in kernel_check.CHECK_CASES} == {"bfloat16", "float16", "float32"}
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "kernel-check" in capsys.readouterr().out
