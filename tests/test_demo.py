"""`make demo`'s settings: each task gets its own short run at small scale (the demo itself is
measured by running it, see experiments/README.md; it takes minutes, too long for this suite)."""

from sparseformer.demo import DEMO_STEPS, _step_settings
from sparseformer.sweep.experiment import parse_settings


def test_each_task_trains_evaluates_and_saves_at_its_own_step_count():
    flags = [f.removeprefix("--set=") for f in _step_settings(None, "small")]
    for task, steps in DEMO_STEPS.items():
        assert parse_settings(flags, task) == {
            "num_train_steps": steps, "eval_every_steps": steps, "checkpoint_every_steps": steps}


def test_steps_flag_overrides_both_tasks_and_tiny_keeps_its_own():
    flags = [f.removeprefix("--set=") for f in _step_settings(50, "small")]
    assert {parse_settings(flags, t)["num_train_steps"] for t in DEMO_STEPS} == {50}
    assert _step_settings(None, "tiny") == []


def test_step_three_trains_dense_and_rsa_as_table_four_does(tmp_path):
    import sys
    from pathlib import Path

    from sparseformer.demo import INFERENCE_OVERRIDES, train_commands

    sys.path.insert(0, str(Path(__file__).parent.parent / "experiments"))
    import table4_inference

    cmds = train_commands("small", tmp_path)
    assert set(cmds) == {"dense", "rsa"}
    assert cmds["rsa"][4] == "--config=configs/retrieval.py:attention=rsa,scale=small"
    assert table4_inference.TASKS["retrieval_1k"][2] == INFERENCE_OVERRIDES
    assert f"--config.data.max_len={INFERENCE_OVERRIDES['data.max_len']}" in cmds["dense"]
