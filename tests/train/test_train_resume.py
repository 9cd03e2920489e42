"""Checkpoints: exact resume after SIGKILL, unreadable checkpoints skipped, NaN stop, other mesh."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import toy  # noqa: E402

from sparseformer.train import checkpoint, loop, sharding, train_and_evaluate  # noqa: E402
from sparseformer.train.state import TrainState  # noqa: E402

MAIN = str(Path(__file__).parent / "toy_main.py")
ROOT = Path(__file__).parents[2]


def env(devices: int = 8) -> dict[str, str]:
    e = dict(os.environ)
    # the conftest's compile-fast flags stay (every process these tests compare gets the same ones)
    flags = [f for f in e.get("XLA_FLAGS", "").split() if "device_count" not in f]
    e.update(XLA_FLAGS=" ".join([f"--xla_force_host_platform_device_count={devices}", *flags]), JAX_PLATFORMS="cpu",
             PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3")
    return e


def toy_process(workdir: Path, overrides: dict, *extra: str, devices: int = 8) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, MAIN, str(workdir), json.dumps(overrides), *extra], env=env(devices),
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(p: subprocess.Popen, timeout: float = 240) -> str:
    out, _ = p.communicate(timeout=timeout)
    assert p.returncode == 0, out[-3000:]
    return out


def metrics(workdir: Path) -> dict:
    return json.loads((workdir / "metrics.json").read_text())


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    overrides = {"num_train_steps": 12, "checkpoint_every_steps": 4, "data.delay": 0.15, "mesh.model": 2}
    reference = toy_process(tmp_path / "ref", {**overrides, "data.delay": 0.0})
    victim = toy_process(tmp_path / "run", overrides)
    first = tmp_path / "run" / "checkpoints" / "4"
    deadline = time.time() + 240
    while not first.exists() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert first.exists(), "no checkpoint appeared"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (tmp_path / "run" / "metrics.json").exists(), "the run ended before it was killed"
    out = finish(toy_process(tmp_path / "run", overrides))
    assert "resumed from" in out
    finish(reference)
    got, want = metrics(tmp_path / "run"), metrics(tmp_path / "ref")
    assert got["final_loss"] == want["final_loss"]  # exactly
    assert got["accuracy"] == want["accuracy"] and got["eval_loss"] == want["eval_loss"]
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))  # steps logged after the checkpoint were dropped and logged again


def _corrupt(step_dir: Path) -> None:
    for f in sorted((step_dir / "state").rglob("*")):
        if f.is_file() and f.stat().st_size > 0 and "metadata" not in f.name:
            f.unlink()


def test_unreadable_checkpoint_is_skipped(tmp_path):
    config = toy.toy_config(num_train_steps=8, checkpoint_every_steps=4, **{"data.eval_batches": 1})
    first = train_and_evaluate(config, tmp_path, components=toy.COMPONENTS)
    ckpts = tmp_path / "checkpoints"
    assert sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) == [4, 8]
    _corrupt(ckpts / "8")  # a truncated latest checkpoint
    (ckpts / "9").mkdir()  # and a bogus one
    (tmp_path / "metrics.json").unlink()
    again = train_and_evaluate(config, tmp_path, components=toy.COMPONENTS)
    assert again["final_loss"] == first["final_loss"]  # resumed from 4, trained 5..8 again
    assert sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) == [4, 8]


def test_planted_nan_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    config = toy.toy_config(num_train_steps=12, checkpoint_every_steps=4, **{"data.nan_at": 5})
    with pytest.raises(FloatingPointError, match=r"non-finite loss at step 6: .*last good checkpoint: step 4"):
        train_and_evaluate(config, tmp_path, components=toy.COMPONENTS)
    ckpts = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if p.name.isdigit()) == ["4"]
    assert not (tmp_path / "metrics.json").exists()
    rt = loop._Runtime(config, toy.COMPONENTS, sharding.make_mesh(8, 1))
    step, state, data, _ = checkpoint.Checkpointer(ckpts).restore_latest(rt.plan.abstract.as_dict())
    assert step == 4 and data == {"next_index": 4}
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(state["params"])))


def test_restore_onto_another_mesh(tmp_path):
    config = toy.toy_config(num_train_steps=4, checkpoint_every_steps=4, **{"mesh.data": 2, "mesh.model": 4,
                                                                            "data.eval_batches": 1})
    train_and_evaluate(config, tmp_path, components=toy.COMPONENTS)
    restored = {}
    for shape in [(2, 4), (4, 2), (1, 1)]:
        devices = jax.devices()[: shape[0] * shape[1]]
        rt = loop._Runtime(config, toy.COMPONENTS, sharding.make_mesh(*shape, devices))
        ckpt = checkpoint.Checkpointer(tmp_path / "checkpoints")
        step, state, _, _ = ckpt.restore_latest(rt.plan.abstract.as_dict())
        ckpt.close()
        state = TrainState(**state)
        assert step == 4 and int(state.step) == 4
        assert state.params["up"]["kernel"].sharding.mesh.shape == dict(zip(("data", "model"), shape))
        restored[shape] = jax.device_get(state)
    for shape in [(4, 2), (1, 1)]:
        jax.tree.map(np.testing.assert_array_equal, restored[shape], restored[(2, 4)])
