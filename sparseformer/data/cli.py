"""`sparseformer tasks` and `sparseformer prepare`: list the tasks; prepare a task's data."""

from __future__ import annotations

import argparse
import sys

import ml_collections

from sparseformer.data.base import SCALES, Task, get_task, resolve_data_dir, task_names


def run_config(task: Task, scale: str, data_dir: str = "", data_seed: int | None = None) -> ml_collections.ConfigDict:
    """The minimal run config a task's `prepare`/`pipeline` read (task, scale, batch size, data)."""
    data = task.default_data_config(scale)
    if data_dir:
        key = "lra_dir" if "lra_dir" in data else "data_dir"
        data[key] = data_dir
    if data_seed is not None and "data_seed" in data:
        data.data_seed = data_seed
    return ml_collections.ConfigDict(dict(task=task.name, scale=scale, batch_size=1, data=data))


def _lengths(task: Task) -> str:
    parts = []
    for scale in SCALES:
        data = task.default_data_config(scale)
        length = str(data.max_len)
        if "max_target_len" in data:
            length += f"/{data.max_target_len}"
        parts.append(length)
    return " ".join(parts)


def tasks_main(argv: list[str]) -> int:
    """Print a table of the tasks: kind, metric, vocabulary, classes, lengths per scale, source."""
    parser = argparse.ArgumentParser(prog="sparseformer tasks", description="List the tasks.")
    parser.add_argument(
        "--data_dir", default="", help="where prepared data lives (default: $SPARSEFORMER_DATA_DIR or ~/tensorflow_datasets)"
    )
    parser.add_argument("--scale", default="tiny", choices=SCALES, help="scale whose preparation is reported")
    args = parser.parse_args(argv)
    lengths = f"max_len {'/'.join(SCALES)}"
    header = ("task", "kind", "metric", "vocab", "classes", lengths, "source", f"prepared ({args.scale})")
    rows = [header]
    for name in task_names():
        task = get_task(name)
        if name.startswith("lra_"):
            source, prepared = "LRA files", "set config.data.lra_dir"
        elif name.startswith("files_"):
            source, prepared = "your files", "set config.data.train_file"
        else:
            source = "built-in" if task.builtin else f"tfds {getattr(task, 'tfds_name', '')}"
            try:
                prepared = "yes" if task.is_prepared(run_config(task, args.scale, args.data_dir)) else "no"
            except Exception as e:  # a broken data_dir should not break the listing
                prepared = f"? ({type(e).__name__})"
        classes = str(task.num_classes or "-")
        rows.append((name, task.kind, task.metric, str(task.vocab_size), classes, _lengths(task), source, prepared))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    print(f"\ndata_dir: {resolve_data_dir(args.data_dir)}   (lengths: inputs/targets for seq2seq)")
    return 0


def prepare_main(argv: list[str]) -> int:
    """`sparseformer prepare --task=listops --scale=small [--data_dir=...] [--data_seed=0]`."""
    parser = argparse.ArgumentParser(
        prog="sparseformer prepare",
        description="Generate a built-in task's data (no network), or check that a catalog/LRA task's data is there.",
    )
    parser.add_argument("--task", required=True, help=f"one of: {', '.join(task_names())}")
    parser.add_argument("--scale", default="small", choices=SCALES)
    parser.add_argument("--data_dir", default="", help="data directory (LRA tasks: the release files' directory)")
    parser.add_argument("--data_seed", type=int, default=None, help="seed of the generated data (built-in tasks)")
    args = parser.parse_args(argv)
    try:
        task = get_task(args.task)
        where = task.prepare(run_config(task, args.scale, args.data_dir, args.data_seed))
    except (ValueError, FileNotFoundError, RuntimeError, ImportError) as e:
        print(f"sparseformer prepare: {e}", file=sys.stderr)
        return 1
    print(f"{args.task} ({args.scale}): ready in {where}")
    return 0
