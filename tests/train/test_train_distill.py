"""Distillation: a student trained against a teacher's checkpoint moves towards the teacher."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import toy  # noqa: E402

from sparseformer.train import train_and_evaluate  # noqa: E402


def test_student_kl_to_teacher_goes_down(tmp_path):
    small = {"data.eval_batches": 1, "checkpoint_every_steps": 100}
    train_and_evaluate(toy.toy_config(num_train_steps=10, **small), tmp_path / "teacher", components=toy.COMPONENTS)
    student = toy.toy_config(num_train_steps=10, seed=1, **small, **{
        "distill.teacher_workdir": str(tmp_path / "teacher"), "distill.weight": 1.0, "distill.temperature": 2.0,
        "optimizer.learning_rate": 1e-2, "optimizer.warmup_steps": 1})
    train_and_evaluate(student, tmp_path / "student", components=toy.COMPONENTS)
    log = [json.loads(line) for line in (tmp_path / "student" / "log.jsonl").read_text().splitlines()]
    kl = [r["distill_kl"] for r in log]
    assert len(kl) == 10 and kl[0] > 0
    assert sum(kl[-3:]) / 3 < 0.7 * kl[0], kl
    assert all(r["total_loss"] > r["loss"] for r in log)


def test_teacher_must_be_a_run_directory(tmp_path):
    config = toy.toy_config(**{"distill.teacher_workdir": str(tmp_path), "distill.weight": 1.0})
    with pytest.raises(ValueError, match="distill.teacher_workdir: .* has no config.json"):
        train_and_evaluate(config, tmp_path / "student", components=toy.COMPONENTS)
