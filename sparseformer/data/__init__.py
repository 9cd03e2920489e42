"""Tasks: built-in generated tasks and TFDS catalog tasks behind one registry.

    task = sparseformer.data.get_task("listops")
    config.data = task.default_data_config("small")
    batches = task.pipeline(config, "train", seed=0)

See docs/interfaces.md (section "Tasks") for the contract.
"""

from __future__ import annotations

# Importing the task modules registers their tasks (in this order in `task_names()`).
from sparseformer.data import listops, retrieval, mqar, copying, synth_translate  # noqa: F401  isort: skip
from sparseformer.data import catalog, lra, files  # noqa: F401  isort: skip
from sparseformer.data.base import (
    BOS_ID,
    EOS_ID,
    KINDS,
    PAD_ID,
    SCALES,
    SPLITS,
    Task,
    get_task,
    register_task,
    resolve_data_dir,
    task_names,
)

__all__ = [
    "BOS_ID",
    "EOS_ID",
    "KINDS",
    "PAD_ID",
    "SCALES",
    "SPLITS",
    "Task",
    "get_task",
    "register_task",
    "resolve_data_dir",
    "task_names",
]
