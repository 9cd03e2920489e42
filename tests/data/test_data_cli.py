"""`sparseformer tasks` and `sparseformer prepare`."""

from __future__ import annotations

import os

from sparseformer.data import cli, task_names


def test_tasks_lists_every_task(capsys, tmp_path):
    assert cli.tasks_main(["--data_dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for name in task_names():
        assert f"\n{name} " in out
    assert "built-in" in out and "tfds imdb_reviews" in out and "128 256 2048" in out


def test_prepare_generates_a_builtin_task_and_refuses_bad_names(capsys, tmp_path):
    assert cli.prepare_main(["--task=copy", "--scale=tiny", f"--data_dir={tmp_path}"]) == 0
    assert os.path.isdir(tmp_path / "sparseformer_copy" / "tiny_seed0" / "1.0.0")
    assert "ready in" in capsys.readouterr().out
    assert cli.prepare_main(["--task=nope"]) == 1
    assert "known tasks: listops" in capsys.readouterr().err
    assert cli.prepare_main(["--task=text", f"--data_dir={tmp_path}"]) == 1
    assert "download_and_prepare" in capsys.readouterr().err
