"""Two processes on localhost (4 CPU devices each) train like one process on 8 devices."""

import json
import socket
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_train_resume import finish, toy_process  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def losses(workdir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (workdir / "log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_processes_agree_with_one(tmp_path):
    overrides = {"num_train_steps": 4, "checkpoint_every_steps": 2, "mesh.data": 4, "mesh.model": 2,
                 "data.eval_batches": 1}
    coordinator = f"127.0.0.1:{free_port()}"
    procs = [toy_process(tmp_path / "multi", overrides, coordinator, "2", str(i), devices=4) for i in range(2)]
    single = toy_process(tmp_path / "single", overrides)
    outs = [finish(p) for p in procs]
    finish(single)
    assert "2 process(es)" in outs[0]
    multi = json.loads((tmp_path / "multi" / "metrics.json").read_text())
    assert multi["process_count"] == 2 and multi["mesh"] == {"data": 4, "model": 2}
    np.testing.assert_allclose(losses(tmp_path / "multi"), losses(tmp_path / "single"), rtol=1e-5)
    ref = json.loads((tmp_path / "single" / "metrics.json").read_text())
    np.testing.assert_allclose(multi["eval_loss"], ref["eval_loss"], rtol=1e-5)
    assert sorted(p.name for p in (tmp_path / "multi" / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]
