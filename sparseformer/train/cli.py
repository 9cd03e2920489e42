"""`sparseformer train` and `sparseformer eval`: parse flags, then call the library.

    sparseformer train --config=configs/listops.py:attention=rsa,scale=small --workdir=runs/listops \
        [--config.KEY=VALUE ...] [--config.mesh.data=2 --config.mesh.model=4]
    sparseformer eval --workdir=runs/listops [--split=test]

Several processes (hosts): pass `--coordinator=HOST:PORT --num_processes=N --process_id=I` to
each (or set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID), or
`--coordinator=auto` where JAX detects the cluster itself (TPU pods, Slurm, ...).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from absl import flags

TRAIN_DOC = """usage: sparseformer train --config=CONFIG.py[:ARG] --workdir=DIR [--config.KEY=VALUE ...]

Trains, evaluates and writes DIR/config.json, DIR/log.jsonl, DIR/metrics.json and
DIR/checkpoints/. Running the same command again in the same DIR resumes from the latest
complete checkpoint (a finished run just re-evaluates and rewrites metrics.json).

examples:
  sparseformer train --config=configs/listops.py:attention=rsa,scale=tiny --workdir=runs/lo
  sparseformer train --config=configs/listops.py:attention=rsa --workdir=runs/lo \\
      --config.model.attention.selection.top_k=8 --config.num_train_steps=2000
  # one host, 8 devices: 2-way data parallel x 4-way model parallel
  sparseformer train ... --config.mesh.data=2 --config.mesh.model=4
  # two hosts (run on each, with its own --process_id)
  sparseformer train ... --coordinator=10.0.0.1:1234 --num_processes=2 --process_id=0
"""

EVAL_DOC = """usage: sparseformer eval --workdir=DIR [--split=test]

Restores the latest checkpoint of a run directory, evaluates it on --split and writes
DIR/eval_SPLIT.json (and prints it).
"""


def _define_multihost(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("coordinator", os.environ.get("JAX_COORDINATOR_ADDRESS"),
                        "HOST:PORT of process 0 for several processes, or 'auto' (cluster detection)", flag_values=fv)
    flags.DEFINE_integer("num_processes", int(os.environ.get("JAX_NUM_PROCESSES", 0)) or None,
                         "number of processes (hosts) taking part", flag_values=fv)
    flags.DEFINE_integer("process_id", int(os.environ["JAX_PROCESS_ID"]) if "JAX_PROCESS_ID" in os.environ else None,
                         "this process's index in [0, num_processes)", flag_values=fv)


def initialize_distributed(coordinator: str | None, num_processes: int | None, process_id: int | None) -> None:
    """Join the other processes (no-op for a single process). Must run before JAX is used."""
    if not coordinator:
        if num_processes and num_processes > 1:
            raise ValueError("--num_processes > 1 needs --coordinator=HOST:PORT (or 'auto')")
        return
    import jax

    if coordinator == "auto":
        jax.distributed.initialize()
    else:
        if num_processes is None or process_id is None:
            raise ValueError("--coordinator needs --num_processes and --process_id")
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)


def _one_line(e: BaseException) -> str:
    """The message of a flag error in one line (a config file's traceback reduced to its last line)."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    if len(lines) > 1 and ("Traceback" in str(e) or lines[0].endswith(":")):
        return f"{lines[0]} {lines[-1]}"
    return lines[0]


def _load_config_file(spec: str) -> object:
    """`path.py[:arg]` -> that file's `get_config(arg)` (no flag parsing: ml_collections reads sys.argv)."""
    import importlib.util

    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("_sparseformer_config_check", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def _unknown_override(argv: Sequence[str]) -> str | None:
    """The first `--config.KEY=` override whose KEY the config does not have (None if all exist)."""
    specs = [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    try:
        config = _load_config_file(specs[-1])
    except Exception:  # noqa: BLE001  only a better message is at stake; the caller has one
        return None
    for arg in argv:
        if arg.startswith("--config.") and "=" in arg:
            key = arg[len("--config."):].split("=", 1)[0]
            node = config
            for part in key.split("."):
                if not hasattr(node, "keys") or part not in node:
                    known = ", ".join(sorted(node.keys())) if hasattr(node, "keys") else "nothing (not a block)"
                    return f"unknown config key {key!r}: {part!r} is not one of {known}"
                node = node[part]
    return None


def _parse(fv: flags.FlagValues, prog: str, argv: Sequence[str], doc: str) -> int | None:
    """Parse into `fv`; returns an exit code when the command should stop (help or bad flags)."""
    if any(a in ("-h", "--help", "--helpfull", "help") for a in argv):
        print(doc)
        print("flags:")
        print(fv.get_help(include_special_flags=False))
        return 0
    for arg in argv:
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1].partition(":")[0]
            if not os.path.isfile(path):
                print(f"{prog}: --config: no such config file {path!r}", file=sys.stderr)
                return 2
    try:
        fv([prog, *argv])
    except (flags.Error, KeyError, AttributeError, TypeError, ValueError) as e:
        msg = (_unknown_override(argv) if any(a.startswith("--config=") for a in argv) else None) or _one_line(e)
        print(f"{prog}: {msg}", file=sys.stderr)
        return 2
    if not flags.FLAGS.is_parsed():  # grain workers read absl flags
        flags.FLAGS.mark_as_parsed()
    return None


def _fail(prog: str, e: BaseException) -> int:
    print(f"{prog}: error: {e}", file=sys.stderr)
    return 1


def train_main(argv: Sequence[str]) -> int:
    """`sparseformer train`: returns an exit code (0 done, 1 failed run, 2 bad flags or config)."""
    from ml_collections import config_flags

    prog = "sparseformer train"
    fv = flags.FlagValues()
    # `sys_argv`: the `--config.KEY=` override flags are found in these arguments, not in sys.argv.
    config_flags.DEFINE_config_file("config", None, "config file and its argument, CONFIG.py:ARG", flag_values=fv,
                                    lock_config=True, sys_argv=[prog, *argv])
    flags.DEFINE_string("workdir", None, "run directory (created; resumed when it has checkpoints)", flag_values=fv)
    _define_multihost(fv)
    code = _parse(fv, prog, argv, TRAIN_DOC)
    if code is not None:
        return code
    try:
        config = fv.config  # the file is loaded lazily, on first access
        if config is not None:
            config.keys()
    except (OSError, ValueError, AttributeError, KeyError) as e:
        print(f"{prog}: --config: {_one_line(e)}", file=sys.stderr)
        return 2
    if config is None or not fv.workdir:
        print(f"{prog}: --config and --workdir are required (see --help)", file=sys.stderr)
        return 2
    try:
        from sparseformer.config import validate_config

        validate_config(config)
        initialize_distributed(fv.coordinator, fv.num_processes, fv.process_id)
    except ValueError as e:
        print(f"{prog}: invalid config: {e}", file=sys.stderr)
        return 2
    from sparseformer.data.files import DataFileError
    from sparseformer.train.loop import train_and_evaluate

    try:
        train_and_evaluate(config, fv.workdir)
    except DataFileError as e:
        print(f"{prog}: invalid data: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"{prog}: invalid config: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        return _fail(prog, e)
    return 0


def eval_main(argv: Sequence[str]) -> int:
    """`sparseformer eval`: evaluate a run directory's latest checkpoint on a split."""
    prog = "sparseformer eval"
    fv = flags.FlagValues()
    flags.DEFINE_string("workdir", None, "run directory written by `sparseformer train`", flag_values=fv)
    flags.DEFINE_enum("split", "test", ["train", "validation", "test"], "split to evaluate", flag_values=fv)
    _define_multihost(fv)
    code = _parse(fv, prog, argv, EVAL_DOC)
    if code is not None:
        return code
    if not fv.workdir:
        print(f"{prog}: --workdir is required (see --help)", file=sys.stderr)
        return 2
    from sparseformer.train.loop import evaluate_workdir

    try:
        initialize_distributed(fv.coordinator, fv.num_processes, fv.process_id)
        results = evaluate_workdir(fv.workdir, fv.split)
    except (ValueError, FileNotFoundError) as e:
        return _fail(prog, e)
    import json

    print(json.dumps(results, indent=2, sort_keys=True, default=str))
    return 0
