"""`benchmarks/list_lengths.py`: what rsa's choice asks of the fused kernel's dk/dv partial sums."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import list_lengths  # noqa: E402

from sparseformer.attention import pallas_kernel  # noqa: E402


def test_topic_inputs_need_more_further_pieces_than_one_long_list_holds(monkeypatch):
    """16 query blocks in pieces of 2 with room for one long list (7 partial sums): rsa's choice on
    topic segments has many lists past a piece, needs more further pieces than that on some head,
    and the kernel's pieces grow there (never past the longest list)."""
    monkeypatch.setattr(pallas_kernel, "LIST_PIECE", 2)
    monkeypatch.setattr(pallas_kernel, "LONG_LISTS", 1)
    r = list_lengths.list_needs("rsa", "topics", 1024)
    assert (r["query_blocks"], r["piece"], r["long_lists"], r["partial_sums"]) == (16, 2, 1, 7)
    needed, walked = np.array(r["further_pieces_needed"]), np.array(r["piece_walked"])
    assert len(needed) == 8 and max(r["lists_past_a_piece"]) > 1
    assert not r["fits"] and (walked[needed > 7] > 2).all() and (walked[needed <= 7] <= 2).all()
    assert (walked <= np.array(r["longest_list"])).all()


def test_the_report_and_its_refusals(tmp_path, capsys):
    out = tmp_path / "lists.json"
    assert list_lengths.main(["--lengths=1024", "--inputs=needle,local", "--causal", f"--out={out}"]) == 0
    report = json.loads(out.read_text())
    assert report["causal"] and [r["input"] for r in report["rows"]] == ["needle", "local"]
    assert all(r["fits"] and r["partial_sums"] == 1 for r in report["rows"])  # 16 query blocks: no further piece
    assert "T=1024 needle" in capsys.readouterr().out
    for bad, flag in (("--inputs=zipf", "--inputs"), ("--lengths=4k", "--lengths"), ("--preset=performer", "--preset")):
        with pytest.raises(SystemExit):
            list_lengths.main([bad])
        assert flag in capsys.readouterr().err
