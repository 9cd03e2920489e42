"""`sparseformer adopt` on a tiny dense run of a file task: every report field, resuming after an
interruption (a changed argument redoes only the stages it affects), and a verdict that follows
the thresholds (a planted drop gives no-go). One test: the stages build on each other."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from sparseformer.adopt import AdoptOptions, adopt, verdict

sys.path.insert(0, str(Path(__file__).parent))
from files_runs import tiny_run  # noqa: E402


@pytest.mark.slow
def test_adopt_report_resume_and_verdict(tmp_path, monkeypatch):
    _, teacher = tiny_run(tmp_path, "dense")
    options = AdoptOptions(teacher=str(teacher), out=str(tmp_path / "adopt"), steps=2, lengths=(256,), repeats=2,
                           sample=16, batch_sizes=(1, 2), rss=False, price_per_hour=2.0, max_metric_drop=100.0,
                           min_speedup=0.0)
    adopt(options, log=lambda m: None)
    out = Path(options.out)

    # every field of the report
    report = json.loads((out / "report.json").read_text())
    assert {p.name for p in out.glob("*.png")} == {"metric_vs_speedup.png", "fidelity.png", "lengths.png"}
    md = (out / "report.md").read_text()
    assert "**Verdict: GO.**" in md and "Cost of a million predictions" in md and "## Dense and adopted side by side" in md
    s0, s1, s2, s3 = (report["stages"][f"stage{i}"] for i in range(4))
    speed_keys = {"latency_ms_p50", "latency_ms_p95", "throughput_per_s", "best_batch_size", "compiled_bytes", "length"}
    assert speed_keys <= set(s0["speed"]) and speed_keys <= set(s1["speed"])
    assert s0["metric"] == "accuracy" and 0 <= s0["value"] <= 1 and s0["speed"]["length"] == 128
    for s in (s1, s2):
        assert {"value", "metric_drop", "agreement", "fidelity", "captured", "layer_fidelity", "layer_captured"} <= set(s)
        assert np.asarray(s["layer_fidelity"]).shape == (2, 2)  # 2 layers x 2 heads
        assert np.asarray(s["layer_captured"]).shape == (2, 2)
    assert {"latency_speedup", "throughput_speedup", "compiled_memory_fraction"} <= set(s1)
    assert s2["steps"] == 2 and (Path(s2["run_dir"]) / "monitor_reference.json").exists()
    assert json.loads((Path(s2["run_dir"]) / "config.json").read_text())["distill"]["teacher_workdir"]
    assert [r["length"] for r in s3["lengths"]] == [128, 256] and "latency_speedup" in s3["lengths"][0]
    assert s3["lengths"][0]["trained_params"] and not s3["lengths"][1]["trained_params"]
    assert report["verdict"]["speedup"] == s3["lengths"][0]["latency_speedup"]  # side by side, data's length
    assert [c["length"] for c in report["costs"]] == [128, 256]
    assert all(c["dense"] > 0 and c["sparse"] > 0 for c in report["costs"])
    v = report["verdict"]
    assert v["decision"] == "go" and v["length"] == 128 and v["reason"].startswith("go: ")
    assert v["reason"].count(". ") == 0 and "\n" not in v["reason"]  # one sentence

    # an interrupted re-run with more steps
    # (stages 0, 1 and 3 are kept; stage 2 starts again, is interrupted, then resumes)
    before = {s: (out / f"{s}.json").read_text() for s in ("stage0", "stage1", "stage2", "stage3")}
    import sparseformer.train.loop as loop

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    opts = AdoptOptions(**{**vars(options), "steps": 3})
    monkeypatch.setattr(loop, "train_and_evaluate", interrupted)
    logs: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        adopt(opts, log=logs.append)
    assert any("stage0: done before" in m for m in logs) and any("stage1: done before" in m for m in logs)
    assert any("stage2: its inputs changed (steps)" in m for m in logs)
    monkeypatch.undo()
    logs.clear()
    report = adopt(opts, log=logs.append)
    assert [m.split(":")[0] for m in logs if "done before" in m] == ["stage0", "stage1", "stage3"]
    assert report["stages"]["stage2"]["steps"] == 3
    for s in ("stage0", "stage1", "stage3"):
        assert (out / f"{s}.json").read_text() == before[s]

    # the verdict follows the thresholds
    stages = {s: json.loads((out / f"{s}.json").read_text()) for s in ("stage0", "stage1", "stage2")}
    s0, s1, s2 = stages["stage0"], dict(stages["stage1"], latency_speedup=3.0), stages["stage2"]
    assert verdict(s0, s1, s2, max_metric_drop=1.0, min_speedup=2.0)["decision"] == ("go" if s2["metric_drop"] <= 1 else "no-go")
    planted = dict(s2, value=s0["value"] - 0.30, metric_drop=30.0)  # 30 points worse than dense
    v = verdict(s0, s1, planted, max_metric_drop=1.0, min_speedup=2.0)
    assert v["decision"] == "no-go" and "drops by 30.00 points" in v["reason"] and "faster" not in v["reason"]
    slow = verdict(s0, dict(s1, latency_speedup=1.5), dict(s2, metric_drop=0.0), max_metric_drop=1.0, min_speedup=2.0)
    assert slow["decision"] == "no-go" and "only 1.50x faster" in slow["reason"] and "128 tokens" in slow["reason"]
    ok = verdict(s0, s1, dict(s2, metric_drop=0.5), max_metric_drop=1.0, min_speedup=2.0)
    assert ok["decision"] == "go" and "3.00x faster" in ok["reason"]
    # the command reads the stage files (thresholds are no stage's input: nothing is redone), and a
    # drop planted in stage2.json turns its report to no-go
    strict = AdoptOptions(**{**vars(opts), "max_metric_drop": 1.0})
    (out / "stage2.json").write_text(json.dumps(dict(stages["stage2"], value=s0["value"] - 0.3, metric_drop=30.0)))
    report = adopt(strict, log=logs.append)
    assert report["verdict"]["decision"] == "no-go" and "drops by 30.00 points" in report["verdict"]["reason"]
    assert "**Verdict: NO-GO.**" in (out / "report.md").read_text()
