"""Launching: skip finished runs, resume interrupted ones, isolate failures, the command line,
N at a time, and the submitit job array (local executor)."""

import json
import sys
import time
from pathlib import Path

import pytest

from sparseformer.sweep import cli, expand, launch
from sparseformer.sweep.launch import Status

HERE = Path(__file__).parent
FAKE_CONFIG = str(HERE / "fake_config.py")
FAKE = launch.TrainerCommand(program=(sys.executable, str(HERE / "fake_trainer.py")))


def _runs(sweep: str, seeds=1, arg="scale=tiny"):
    return expand.expand_runs(f"{FAKE_CONFIG}:{arg}", sweep, seeds)


def _calls(rundir: Path) -> list[list[str]]:
    path = rundir / "calls.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def test_runs_get_their_own_dirs_and_the_trainer_command(tmp_path):
    runs = _runs("ablation", seeds=2)
    summary = launch.run_local(runs, tmp_path, command_fn=FAKE, progress=False, parallel=2)
    assert summary.ok and len(summary.names(Status.DONE)) == 18
    d = tmp_path / "compression__seed1"
    argv = _calls(d)[0]
    assert f"--config={FAKE_CONFIG}:scale=tiny,attention=rsa,seed=1" in argv
    assert f"--workdir={d}" in argv
    assert "--config.model.attention.selection.enabled=False" in argv
    assert "--config.model.attention.compression.enabled=True" in argv
    run_json = json.loads((d / "run.json").read_text())
    assert run_json["name"] == "compression__seed1" and run_json["label"] == "compression only"
    assert run_json["seed"] == 1 and run_json["sweep"] == "ablation"
    assert run_json["config"] == f"{FAKE_CONFIG}:scale=tiny,attention=rsa,seed=1"
    assert (d / "stdout.log").read_text().count("fake trainer") == 1
    assert json.loads((tmp_path / launch.SUMMARY_FILE).read_text())["counts"]["done"] == 18


def test_finished_runs_are_skipped(tmp_path):
    runs = _runs("presets")
    first = launch.run_local(runs, tmp_path, command_fn=FAKE, progress=False)
    assert first.names(Status.DONE) == ["dense__seed0", "local__seed0", "rsa__seed0"]
    second = launch.run_local(runs, tmp_path, command_fn=FAKE, progress=False)
    assert second.names(Status.SKIPPED) == ["dense__seed0", "local__seed0", "rsa__seed0"]
    assert all(len(_calls(tmp_path / r.name)) == 1 for r in runs)  # not launched again
    assert "3 skipped" in second.format()


def test_interrupted_run_resumes_from_its_checkpoint(tmp_path):
    runs = _runs("presets")
    (tmp_path / "local__seed0" / "checkpoints" / "step_10").mkdir(parents=True)
    summary = launch.run_local(runs, tmp_path, command_fn=FAKE, progress=False)
    assert summary.names(Status.RESUMED) == ["local__seed0"]
    assert summary.names(Status.DONE) == ["dense__seed0", "rsa__seed0"]
    assert json.loads((tmp_path / "local__seed0" / "metrics.json").read_text())["resumed"] is True
    assert "resumed: local__seed0" in summary.format()


def test_an_interrupted_run_is_resumable_next_time(tmp_path):
    summary = launch.run_local(_runs("interrupt"), tmp_path, command_fn=FAKE, progress=False)
    assert summary.names(Status.FAILED) == ["cut__seed0"]
    assert launch.run_state(tmp_path / "cut__seed0") == "interrupted"


def test_a_failing_run_is_recorded_and_the_sweep_goes_on(tmp_path):
    runs = _runs("mixed")
    summary = launch.run_local(runs, tmp_path, command_fn=FAKE, progress=False, parallel=2)
    assert summary.names(Status.DONE) == ["good__seed0", "good2__seed0"]
    assert summary.names(Status.FAILED) == ["bad__seed0", "silent__seed0"]
    assert not summary.ok
    bad = (tmp_path / "bad__seed0" / "error.txt").read_text()
    assert bad.startswith("return code 3") and "RuntimeError: boom" in bad and "fake_trainer.py" in bad
    silent = (tmp_path / "silent__seed0" / "error.txt").read_text()
    assert silent.startswith("exited 0 without writing metrics.json")
    text = summary.format()
    assert "4 runs: 2 done, 0 skipped, 0 resumed, 2 failed" in text
    assert "FAILED  bad__seed0: return code 3" in text
    # a second pass retries the failures only
    again = launch.run_local(runs, tmp_path, command_fn=FAKE, progress=False)
    assert again.names(Status.SKIPPED) == ["good__seed0", "good2__seed0"]
    assert again.names(Status.FAILED) == ["bad__seed0", "silent__seed0"]
    assert len(_calls(tmp_path / "bad__seed0")) == 2


def test_a_program_that_cannot_start_fails_cleanly(tmp_path):
    cmd = launch.TrainerCommand(program=(str(tmp_path / "no_such_program"),))
    summary = launch.run_local(_runs("presets")[:1], tmp_path, command_fn=cmd, progress=False)
    assert summary.names(Status.FAILED) == ["dense__seed0"]
    assert "FileNotFoundError" in (tmp_path / "dense__seed0" / "error.txt").read_text()


def test_a_name_clash_with_another_run_is_refused(tmp_path):
    launch.run_local(_runs("presets"), tmp_path, command_fn=FAKE, progress=False)
    other = launch.run_local(_runs("presets", arg="scale=small"), tmp_path, command_fn=FAKE, progress=False)
    assert other.names(Status.FAILED) == ["dense__seed0", "local__seed0", "rsa__seed0"]
    assert "already holds another run" in other.outcomes[0].error


def test_parallel_runs_overlap(tmp_path):
    # 4 runs of a trainer that sleeps 0.5 s: two at a time take about 1 s, one at a time 2 s.
    slow = tmp_path / "slow.py"
    slow.write_text(f"import time, runpy, sys\ntime.sleep(0.5)\nsys.argv[0] = {str(HERE / 'fake_trainer.py')!r}\n"
                    f"runpy.run_path(sys.argv[0], run_name='__main__')\n")
    runs = expand.expand_runs(f"{FAKE_CONFIG}:", "grid", 1)
    start = time.monotonic()
    summary = launch.run_local(runs, tmp_path / "w", command_fn=launch.TrainerCommand((sys.executable, str(slow))),
                               parallel=4, progress=False)
    assert summary.ok and len(summary.names(Status.DONE)) == 4
    assert time.monotonic() - start < 2.0  # one at a time, the sleeps alone take 2 s


def test_submitit_local_job_array(tmp_path):
    runs = _runs("mixed")
    (tmp_path / "w" / "good2__seed0").mkdir(parents=True)
    (tmp_path / "w" / "good2__seed0" / "metrics.json").write_text("{}")
    executor = launch.make_slurm_executor(tmp_path / "submitit", cluster="local", time_min=2)
    summary = launch.run_sweep(runs, tmp_path / "w", launcher="slurm", executor=executor, command_fn=FAKE,
                               progress=False)
    assert summary.names(Status.DONE) == ["good__seed0"]
    assert summary.names(Status.SKIPPED) == ["good2__seed0"]
    assert summary.names(Status.FAILED) == ["bad__seed0", "silent__seed0"]
    assert "RuntimeError: boom" in (tmp_path / "w" / "bad__seed0" / "error.txt").read_text()
    assert len(list((tmp_path / "submitit").glob("*_submitted.pkl"))) == 3  # one array of the 3 to run


def test_unknown_launcher_is_refused(tmp_path):
    with pytest.raises(ValueError, match="known launchers: local, slurm"):
        launch.run_sweep([], tmp_path, launcher="cloud")


def test_cli_dry_run_prints_the_runs(tmp_path, capsys):
    code = cli.sweep_main([f"--config={FAKE_CONFIG}:scale=tiny", "--sweep=ablation", "--seeds=2",
                           f"--workdir={tmp_path}", "--dry_run"])
    out = capsys.readouterr().out
    assert code == 0
    assert out.startswith(f"18 runs in {tmp_path}:")
    assert "rsa-bound__seed1  [new]  label='rsa (bound)'" in out
    assert "-m sparseformer train" in out and "--config.model.attention.selection.estimator=bound" in out
    assert not any(tmp_path.iterdir())  # nothing run, nothing written


def test_cli_unknown_sweep_lists_known_ones(tmp_path, capsys):
    code = cli.sweep_main([f"--config={FAKE_CONFIG}:", "--sweep=nope", f"--workdir={tmp_path}"])
    assert code == 2
    assert "known sweeps: ablation, grid, interrupt, mixed, presets" in capsys.readouterr().err


def test_cli_help_is_useful(capsys):
    with pytest.raises(SystemExit):
        cli.sweep_main(["--help"])
    out = capsys.readouterr().out
    for flag in ("--config", "--sweep", "--workdir", "--seeds", "--parallel", "--launcher", "--dry_run",
                 "--slurm_partition", "skips finished runs"):
        assert flag in out
