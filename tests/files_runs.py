"""Tiny file datasets and runs on them, shared by the adopt and monitor tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from sparseformer.train import cli

ROOT = Path(__file__).parents[1]


def records(n: int, seed: int, long: bool = False) -> list[dict]:
    """Short two-class documents (a few words: rsa's 8 chosen blocks of 8 tokens cover them), or
    128 bytes of varied letters (`long`: half the blocks left to rsa's pooled summaries)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        label = ("pos", "neg")[i % 2]
        if long:
            text = "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz "), size=128))
        else:
            text = f"{label} " + " ".join(rng.choice(["ab", "cd", "ef"], size=int(rng.integers(2, 12))))
        out.append({"text": text, "label": label})
    return out


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_run(root: Path, attention: str) -> tuple[Path, Path]:
    """`(training file, run directory)` of 3 training steps of a tiny classifier, blocks of 8."""
    train = write(root / "train.jsonl", records(120, 0))
    run = root / attention
    code = cli.train_main([f"--config={ROOT}/configs/files.py:kind=classify,attention={attention},scale=tiny",
                           f"--workdir={run}", f"--config.data.train_file={train}", "--config.num_train_steps=3",
                           "--config.num_eval_batches=1", "--config.model.attention.selection.block_size=8"])
    assert code == 0
    return train, run
