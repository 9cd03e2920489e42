"""experiments/table*.py against fake task configs and the fake trainer (the real configs and
trainer are tested by their own suites)."""

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sparseformer.sweep import launch
from sparseformer.sweep.experiment import main

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
FAKE = launch.TrainerCommand(program=(sys.executable, str(HERE / "fake_trainer.py")))


def _experiment(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.EXPERIMENT


@pytest.fixture
def configs(tmp_path: Path) -> Path:
    d = tmp_path / "configs"
    d.mkdir()
    for task in ("listops", "retrieval"):
        shutil.copy(HERE / "fake_config.py", d / f"{task}.py")
    return d


def test_table3_script_dry_run(configs, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "table3_ablation.py"), "--scale=tiny",
                           f"--config_dir={configs}", "--dry_run", "--seeds=2", f"--workdir={tmp_path / 'w'}"],
                          capture_output=True, text=True, check=True, cwd=tmp_path)
    assert proc.stdout.count("18 runs in") == 2
    assert f"{tmp_path / 'w' / 'retrieval' / 'rsa-sampled__seed1'}" in proc.stdout
    assert "scale=tiny,attention=rsa,seed=1" in proc.stdout
    assert not (tmp_path / "w").exists()


def test_table3_end_to_end_with_a_fake_trainer(configs, tmp_path):
    args = ["--scale=tiny", "--tasks=listops", f"--config_dir={configs}", f"--workdir={tmp_path / 'w'}",
            f"--out={tmp_path / 'out'}", "--parallel=2"]
    assert main(_experiment("table3_ablation"), args, command_fn=FAKE) == 0
    text = (tmp_path / "out" / "table3.md").read_text()
    rows = [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows == ["configuration", "dense", "selection only", "compression only",
                    "selection + compression (naive)", "selection + compression + correction, no regulariser",
                    "rsa", "rsa (pooled)", "rsa (bound)", "rsa (sampled)"]
    assert "listops accuracy (%)" in text and "listops fidelity (KL)" in text
    assert (tmp_path / "out" / "table3.png").stat().st_size > 0
    # a second pass runs nothing
    assert main(_experiment("table3_ablation"), args, command_fn=FAKE) == 0
    summary = json.loads((tmp_path / "w" / "listops" / launch.SUMMARY_FILE).read_text())
    assert summary["counts"] == {"done": 0, "skipped": 9, "resumed": 0, "failed": 0}


def test_table1_discovers_task_configs(configs, tmp_path):
    args = ["--scale=tiny", f"--config_dir={configs}", f"--workdir={tmp_path / 'w'}", f"--out={tmp_path / 'out'}"]
    assert main(_experiment("table1_tasks"), args, command_fn=FAKE) == 0
    header = (tmp_path / "out" / "table1.md").read_text().splitlines()[2]
    assert header == "| attention | listops | retrieval | Avg |"


def test_table2_from_a_benchmark(tmp_path):
    results = [{"preset": p, "length": 1024, "pass": "fwd_bwd", "median_ms": ms, "compiled_bytes": 100}
               for p, ms in (("dense", 2.0), ("rsa", 1.0))]
    (tmp_path / "bench.json").write_text(json.dumps({"results": results}))
    args = [f"--bench={tmp_path / 'bench.json'}", f"--out={tmp_path / 'out'}", "--format=csv"]
    assert main(_experiment("table2_speed"), args) == 0
    assert "rsa,2.00*,1.00" in (tmp_path / "out" / "table2.csv").read_text()


def test_missing_configs_are_reported(tmp_path, capsys):
    assert main(_experiment("table3_ablation"), [f"--config_dir={tmp_path}", "--dry_run"]) == 2
    assert "listops: config file" in capsys.readouterr().err
    assert main(_experiment("table1_tasks"), [f"--config_dir={tmp_path}"]) == 2


def test_estimators_small_blocks_bench(capsys):
    """experiments/estimators_small_blocks.py: an error per input kind, block size and estimator."""
    spec = importlib.util.spec_from_file_location("esb", ROOT / "experiments" / "estimators_small_blocks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["bench", "--length=512", "--block_sizes=8", "--estimators=maxkey,bound"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    from sparseformer.bench.inputs import INPUT_KINDS

    assert set(out) == {f"{kind} b8 {est}" for kind in INPUT_KINDS for est in ("maxkey", "bound")}
    assert all(0.0 <= e < 2.0 for e in out.values())
