"""`sparseformer train` / `eval` on the real task configs (tiny scale), in this process."""

import json
from pathlib import Path

import pytest

from sparseformer.train import cli

ROOT = Path(__file__).parents[2]
BUILTIN = ["listops", "retrieval", "mqar", "copy", "synth_translate"]
FAST = ["--config.num_train_steps=1", "--config.num_eval_batches=1", "--config.model.num_layers=1"]


@pytest.fixture(autouse=True)
def data_dir(tmp_path_factory, monkeypatch):
    # one generated copy of each built-in task per test session (shared by the xdist workers' runs)
    root = tmp_path_factory.getbasetemp().parent / "train_cli_data"
    monkeypatch.setenv("SPARSEFORMER_DATA_DIR", str(root))
    monkeypatch.chdir(ROOT)


def test_help_is_useful(capsys):
    assert cli.train_main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: sparseformer train" in out and "--workdir" in out and "--coordinator" in out
    assert cli.eval_main(["--help"]) == 0
    assert "--split" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config.modl.x=1"], "unknown config key 'modl.x'"),
        (["--config.optimizer.name=lamb"], "optimizer.name: 'lamb' is not one of adamw, adafactor, sgd"),
        (["--config.num_train_steps=abc"], "--config.num_train_steps=abc"),
        (["--config.mesh.data=3"], "mesh: data=3"),
        (["--nonsense=1"], "nonsense"),
    ],
)
def test_bad_keys_and_values_exit_with_one_line(tmp_path, capsys, args, message):
    code = cli.train_main(["--config=configs/listops.py:scale=tiny", f"--workdir={tmp_path}", *args])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def test_missing_config_file(tmp_path, capsys):
    assert cli.train_main(["--config=configs/nope.py", f"--workdir={tmp_path}"]) == 2
    assert "no such config file 'configs/nope.py'" in capsys.readouterr().err


def test_tiny_run_with_overrides_then_eval(tmp_path, capsys):
    work = tmp_path / "run"
    code = cli.train_main(["--config=configs/listops.py:attention=rsa,scale=tiny", f"--workdir={work}", *FAST,
                           "--config.model.attention.selection.top_k=2", "--config.model.emb_dim=16"])
    assert code == 0, capsys.readouterr().err[-2000:]
    config = json.loads((work / "config.json").read_text())
    assert config["model"]["attention"]["selection"]["top_k"] == 2 and config["model"]["emb_dim"] == 16
    metrics = json.loads((work / "metrics.json").read_text())
    for key in ("task", "attention", "seed", "scale", "max_len", "accuracy", "fidelity", "steps_per_second",
                "peak_memory_bytes", "num_params", "final_loss", "num_train_steps"):
        assert key in metrics, key
    assert metrics["attention"] == "rsa" and metrics["num_train_steps"] == 1
    out = capsys.readouterr().out
    assert "compiled train step: peak memory" in out
    # what attention runs, at the task's length (tiny listops: 128 tokens; the CPU takes `masked`)
    assert "attention at 128 tokens: encoder self-attention: selection (masked) + pool\n" in out, out
    lines = [json.loads(line) for line in (work / "log.jsonl").read_text().splitlines()]
    assert lines and all("step" in r and "loss" in r for r in lines)
    assert cli.eval_main([f"--workdir={work}", "--split=validation"]) == 0
    assert json.loads((work / "eval_validation.json").read_text())["step"] == 1
    assert cli.eval_main([f"--workdir={tmp_path / 'none'}"]) == 1


def test_the_start_line_points_to_kernel_check_where_the_fused_kernel_runs():
    from sparseformer.sweep import expand
    from sparseformer.train.loop import _attention_line

    config = expand.load_config_module(Path(__file__).parents[2] / "configs" / "listops.py").get_config("attention=rsa,scale=tiny")
    assert "(pallas)" not in _attention_line(config) and "kernel-check" not in _attention_line(config)
    config.model.attention.selection.kernel = "pallas"  # what `auto` takes on a GPU
    line = _attention_line(config)
    assert "selection (pallas) + pool" in line and "`sparseformer kernel-check` checks it on this device" in line


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in BUILTIN if n != "listops"])
def test_tiny_run_of_each_builtin_task(tmp_path, name):
    work = tmp_path / name
    assert cli.train_main([f"--config=configs/{name}.py:attention=dense,scale=tiny", f"--workdir={work}", *FAST]) == 0
    metrics = json.loads((work / "metrics.json").read_text())
    assert metrics["task"] == name and metrics["num_train_steps"] == 1
