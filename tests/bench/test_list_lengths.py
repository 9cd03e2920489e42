"""`benchmarks/list_lengths.py`: what rsa's choice asks of the fused kernel's dk/dv partial sums."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import list_lengths  # noqa: E402

from sparseformer.attention import pallas_kernel  # noqa: E402


def test_topic_inputs_need_more_partial_sums_than_one_long_list_holds(monkeypatch):
    """16 query blocks in pieces of 2 with room for one long list (8 partial sums): rsa's choice on
    topic segments has many lists past a piece, needs more partial sums than that on some head, and
    the kernel's pieces grow there (never past the longest list)."""
    monkeypatch.setattr(pallas_kernel, "LIST_PIECE", 2)
    monkeypatch.setattr(pallas_kernel, "LONG_LISTS", 1)
    r = list_lengths.list_needs("rsa", "topics", 1024)
    assert (r["query_blocks"], r["piece"], r["long_lists"], r["partial_sums"]) == (16, 2, 1, 8)
    needed, walked = np.array(r["partial_sums_needed"]), np.array(r["piece_walked"])
    assert len(needed) == 8 and max(r["lists_past_a_piece"]) > 1
    assert not r["fits"] and (walked[needed > 8] > 2).all() and (walked[needed <= 8] <= 2).all()
    assert (walked <= np.array(r["longest_list"])).all()


def test_the_report_and_its_refusals(tmp_path, capsys):
    out = tmp_path / "lists.json"
    assert list_lengths.main(["--lengths=1024", "--inputs=needle,local", "--causal", f"--out={out}"]) == 0
    report = json.loads(out.read_text())
    assert report["causal"] and [r["input"] for r in report["rows"]] == ["needle", "local"]
    assert all(r["fits"] and r["partial_sums"] == 4 for r in report["rows"])  # 16 query blocks: 4 lists of one piece
    assert "T=1024 needle" in capsys.readouterr().out
    for bad, flag in (("--inputs=zipf", "--inputs"), ("--lengths=4k", "--lengths"), ("--preset=performer", "--preset")):
        with pytest.raises(SystemExit):
            list_lengths.main([bad])
        assert flag in capsys.readouterr().err


def test_the_dkv_order_model_starts_programs_in_grid_order_on_the_first_free_slot():
    """The model's scheduler: with 2 slots, times (1, 1, 1, 3) end at 4 (the long one starts last) and
    (3, 1, 1, 1) at 3. Its program times: a walked piece is its entries + 1, a long block's (empty)
    first piece and an unused further piece almost nothing; on a selection with blocks every query
    block chose, the order leaves the finish kernel as it was, and the finish kernel only adds
    partial sums where walking first pieces would leave it a piece's walk. (Which order ends the
    dk/dv kernel sooner is the model's output on rsa's real choices, BENCHMARKS.md, not a property.)"""
    assert list_lengths.modelled_time(np.array([1.0, 1, 1, 3]), slots=2) == 4.0
    assert list_lengths.modelled_time(np.array([3.0, 1, 1, 1]), slots=2) == 3.0

    import gpu_check

    sel, _ = gpu_check.rsa_like_selection(1024, b=32, H=2, sinks=4)  # 32 query blocks, 4 sinks
    lengths = np.bincount(np.asarray(sel.idx[0, 0])[np.asarray(sel.valid[0, 0])], minlength=32)
    with pallas_kernel.launch_options(list_piece=8):
        plan = pallas_kernel.make_plan(False, sel, num_heads=2, head_dim=16, has_mask=False)
        times = list_lengths.program_times(plan, pallas_kernel.inverted_lists(plan, sel.idx, sel.valid, None)[0])
        model = list_lengths.dkv_model(False, sel, H=2, D=16, slots=8)
    m, X = plan.num_key_blocks, plan.extra_pieces
    head = times[: m + X]  # the first head's programs: further pieces, then first pieces
    firsts, extras = head[X:], head[:X]
    long = lengths > 8
    assert np.all(firsts[long] == list_lengths.IDLE_PROGRAM)
    np.testing.assert_array_equal(firsts[~long], lengths[~long] + 1.0)
    walked = -(-lengths[long] // 8)  # pieces per long list, all partial sums; their entries, the lists'
    assert np.sum(extras > list_lengths.IDLE_PROGRAM) == walked.sum()
    assert np.sum(extras[extras > list_lengths.IDLE_PROGRAM] - 1) == lengths[long].sum()
    default, last, walks = (model[way] for way in ("default", "further_pieces_last", "finish_walks_first_pieces"))
    assert model["bound"] <= min(default["dkv"], last["dkv"]) and default["finish"] == last["finish"], model
    # the finish walking first pieces: fewer pieces in the dk/dv kernel, a piece's walk after it
    assert walks["piece"] == default["piece"] == 8 and walks["dkv"] < default["dkv"]
    assert 4 * list_lengths.ADD_PARTIAL_SUM <= default["finish"] < 8 + 1 <= walks["finish"]


def test_the_finish_kernel_model_adds_partial_sums_and_walks_first_pieces_only_when_asked():
    """Three blocks chosen by all 8 query blocks, in pieces of 2 (4 each): the finish kernel's program
    of each adds its 4 partial sums, or, when it walks first pieces, walks 2 entries (+ 1) and adds
    3; every other block's program does nothing."""
    from sparseformer.attention.selection import Selection

    n = 8
    idx = np.array([[0, 1, 2, i] for i in range(n)], np.int32)[None, None]
    valid = np.ones_like(idx, bool)
    valid[0, 0, :3, 3] = False
    sel = Selection(idx=jnp.asarray(idx), valid=jnp.asarray(valid), qids=jnp.arange(n), block_size=16, num_key_blocks=n)
    add = list_lengths.ADD_PARTIAL_SUM
    for finish_walks, expected in ((False, 4 * add), (True, 2 + 1 + 3 * add)):
        with pallas_kernel.launch_options(list_piece=2, long_lists=3, finish_walks_first=finish_walks):
            plan = pallas_kernel.make_plan(False, sel, num_heads=1, head_dim=16, has_mask=False)
        times = list_lengths.finish_times(plan, pallas_kernel.inverted_lists(plan, sel.idx, sel.valid, None)[0])
        np.testing.assert_allclose(times[:3], expected)
        np.testing.assert_allclose(times[3:], list_lengths.IDLE_PROGRAM)
