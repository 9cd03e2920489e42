"""Tiny run directories of each model kind for the inference tests.

A run is written the way the trainer writes one (config.json and an orbax checkpoint of the sharded
train state through `train.checkpoint.Checkpointer`), from freshly initialised parameters: the
inference code under test restores and runs it exactly as it would a trained run, and no training
step has to be compiled (the trainer itself is tested in tests/train).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path

import jax
import pytest
from flax import nnx

from sparseformer.config import TINY, base_config, validate_config
from sparseformer.models import build_model
from sparseformer.train import checkpoint, loop, optim, sharding
from sparseformer.train.state import plan_train_state

# task -> (attention, overrides); one per model kind, each with sparse attention where it can run
RUNS = {
    "listops": ("rsa", {"data.max_len": 128}),  # classifier: rsa at 128 and 64 tokens (blocks of 8)
    "lra_retrieval": ("rsa", {"data.max_len": 128}),  # dual encoder (bytes)
    "synth_translate": ("rsa", {"data.max_len": 64, "data.max_target_len": 48}),  # seq2seq
    "mqar": ("rsa", {"data.max_len": 64}),  # causal LM
}
SMALL = {"model.num_layers": 1, "model.emb_dim": 16, "model.mlp_dim": 32, "model.num_heads": 2, "model.num_kv_heads": 1,
         "model.attention.selection.block_size": 8, "model.attention.selection.top_k": 2,
         # window + global as the tests' bucket lengths assume (rsa's own default reserves neither)
         "model.attention.selection.window": 1, "model.attention.selection.global_blocks": 1}


def make_run(workdir: Path, task: str, attention: str, overrides: dict, *, seed: int = 0) -> Path:
    """A run directory with a checkpoint at step 1 (parameters initialised from `seed`)."""
    config = base_config(task, f"attention={attention},scale=tiny,seed={seed}", scales={"tiny": TINY})
    settings = {**SMALL, **overrides}
    if "num_decoder_layers" in config.model:
        settings["model.num_decoder_layers"] = 1
    for key, value in settings.items():
        node = config
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    validate_config(config)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(json.dumps(loop.config_to_dict(config)))
    mesh = sharding.make_mesh(1, 1, jax.devices()[:1])
    tx, _ = optim.make_optimizer(config.optimizer, num_train_steps=1)
    rules = tuple(tuple(r) for r in config.logical_axis_rules)
    plan = plan_train_state(lambda: build_model(config, nnx.Rngs(seed)), tx, mesh, rules)
    ckpt = checkpoint.Checkpointer(workdir / "checkpoints")
    ckpt.save(1, plan.init().as_dict(), data={}, meta={"step": 1}, config=loop.config_to_dict(config))
    ckpt.close()
    return workdir


@pytest.fixture(scope="session")
def runs(tmp_path_factory) -> dict[str, Path]:
    """task -> a tiny run directory (classifier, dual encoder, seq2seq, language model).

    Made once per `pytest` session: under xdist the first worker to get here writes them into the
    session's shared temporary directory while the others wait on a file lock, then all read them
    (the tests only read runs). Without xdist they go to this session's own temporary directory."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        root = tmp_path_factory.mktemp("runs")
        return {task: make_run(root / task, task, att, ov) for task, (att, ov) in RUNS.items()}
    root = tmp_path_factory.getbasetemp().parent / "infer_runs"  # the session's, shared by its workers
    with open(root.parent / "infer_runs.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / "complete").exists():
            shutil.rmtree(root, ignore_errors=True)  # a worker that failed half-way
            for task, (att, ov) in RUNS.items():
                make_run(root / task, task, att, ov)
            (root / "complete").touch()
    return {task: root / task for task in RUNS}
