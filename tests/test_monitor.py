"""`sparseformer monitor` on a tiny rsa run of a file task trained on short documents (rsa's 8 chosen
blocks of 8 tokens cover them): it passes on the training file and fails, with one line, on planted
long inputs where rsa must leave half of the blocks to its pooled summaries."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from sparseformer import monitor as monitor_lib

sys.path.insert(0, str(Path(__file__).parent))
from files_runs import records, tiny_run, write  # noqa: E402


@pytest.mark.slow
def test_monitor_passes_on_training_data_and_fails_on_planted_long_inputs(tmp_path, capsys):
    train, run = tiny_run(tmp_path, "rsa")
    assert monitor_lib.monitor_main([f"--workdir={run}", f"--input={train}", "--sample=64"]) == 0
    out = capsys.readouterr().out
    assert "layer 1 fidelity (KL)" in out and "agreement with dense" in out
    reference = json.loads((run / "monitor_reference.json").read_text())
    assert max(max(layer) for layer in reference["layer_fidelity"]) < 1e-4  # rsa covers the short documents
    flags = [f"--workdir={run}", "--sample=64", "--max-fidelity=0.001"]
    assert monitor_lib.monitor_main([*flags, f"--input={train}"]) == 0
    capsys.readouterr()
    planted = write(tmp_path / "long.jsonl", [{"text": r["text"]} for r in records(64, 1, long=True)])  # no labels
    report_path = tmp_path / "report.json"
    assert monitor_lib.monitor_main([*flags, f"--input={planted}", f"--out={report_path}"]) == 1
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sparseformer monitor: layer ") and "> 0.0010 (--max-fidelity" in err[0]
    report = json.loads(report_path.read_text())
    assert not report["ok"] and report["new"]["captured"] < reference["captured"] - 0.1
    assert monitor_lib.monitor_main([f"--workdir={run}", f"--input={planted}", "--min-captured=0.95"]) == 1
    capsys.readouterr()
    assert monitor_lib.monitor_main([f"--workdir={run}", "--input=/nonexistent.jsonl"]) == 2
    assert "/nonexistent.jsonl: no such file" in capsys.readouterr().err


def test_monitor_needs_a_sparse_run(tmp_path, capsys):
    train = write(tmp_path / "train.jsonl", records(20, 0))
    assert monitor_lib.monitor_main([f"--workdir={tmp_path}", f"--input={train}"]) == 2
    assert "not a run directory" in capsys.readouterr().err
    (tmp_path / "config.json").write_text("{}")  # a run without monitor_reference.json: dense attention
    assert monitor_lib.monitor_main([f"--workdir={tmp_path}", f"--input={train}"]) == 2
    assert "dense attention (nothing to monitor)" in capsys.readouterr().err
