"""What the backward pass keeps (saved residuals, traced only: `sparseformer.bench.residuals`).

A fused dense kernel keeps its output and a float32 log-sum-exp; the fused sparse kernel's presets
must stay close to that, so a change that keeps a float32 copy, a tiled duplicate or a
`T x S/b` tensor for the backward fails here before it costs memory on a GPU."""

import json

import pytest

from sparseformer.bench import methods, residuals

T = 1024


def _arrays(name, *, causal=False, train=False, length=T):
    shape = methods.Shape(1, length, 4, 64, causal=causal, dtype="bfloat16")
    return residuals.residuals(name, shape, train=train)["residual_arrays"]


def test_a_fused_dense_kernel_keeps_its_output_and_log_sum_exp():
    assert 1.0 < _arrays("dense_pallas") < 1.1


@pytest.mark.parametrize("causal", [False, True])
def test_the_fused_kernel_keeps_what_a_fused_dense_kernel_keeps(causal):
    """`local`: the kernel reads q, k, v in place (the caller's arrays, not head-major copies) and
    keeps its output (in the inputs' dtype, not float32) and log-sum-exp, as flash attention does;
    the merge keeps nothing more of size [B, T, H, D]. (4.1 arrays with head-major copies, 6.1
    with a float32 output and tiled duplicates.)"""
    assert _arrays("local", causal=causal) < 1.2


def test_the_command_writes_json_and_markdown(tmp_path):
    assert residuals.main(["--presets=dense_pallas,local", "--lengths=512", "--heads=2", f"--out={tmp_path}"]) == 0
    rows = json.loads((tmp_path / "residuals.json").read_text())["results"]
    assert [r["name"] for r in rows] == ["dense_pallas", "local"]
    assert all(r["by_source"] and r["residual_bytes"] == sum(r["by_source"].values()) for r in rows)
    assert "| local |" in (tmp_path / "residuals.md").read_text()


@pytest.mark.parametrize("name", ["bigbird", "longformer"])
def test_global_query_rows_keep_no_rows_by_keys_probabilities(name):
    """The global rows see every key in chunks (`dense_attention_chunked`) read in place: 16 chunk
    outputs, not the float32 `R x S` probabilities (10.3 and 8.2 arrays here before)."""
    assert _arrays(name, length=2048) < 3.5


@pytest.mark.parametrize("name,bound", [("rsa", 3.0), ("nsa", 2.5)])
@pytest.mark.parametrize("train", [False, True])
def test_selection_plus_pooled_branch_keep_a_few_input_sized_arrays(name, bound, train):
    """rsa/nsa: the exact kernel's output and lse, the pooled branch's (bfloat16) output and lse, the
    merge's row weights; the kernel, the pooled branch and the regulariser (`train`, over chunks of
    keys: no `aux_rows x S` array) read q, k, v in place. Before this was built: rsa 37.7 input-sized
    arrays at 4K and 24 at 64K (float32 merges, `T x S/b` logits, a float32 copy of k)."""
    assert _arrays(name, train=train, length=2048) < bound


@pytest.mark.parametrize("causal,train", [(False, False), (False, True), (True, False)])
def test_scatterbrain_keeps_summaries_not_random_features(causal, train):
    """scatterbrain: the exact kernel's output and lse, the Performer branch's float32 numerator (the
    merge reads it) and `[B, H, T]` statistics; the branch's own VJP keeps q, k, v (read in place) and
    `[rank, D]` summaries, recomputing its features chunk by chunk. Before: 58.5 input-sized arrays at
    4K (the float32 `T x rank` features of queries and keys, and the exclusion scan's per-block copies)."""
    assert _arrays("scatterbrain", causal=causal, train=train, length=2048) < 4.0
