"""The `sparseformer` command: a thin dispatcher to library functions.

Each subcommand lives in its own module and parses its own arguments, so importing the
CLI stays cheap (JAX is imported only by the command that needs it). A subcommand is one
entry in `COMMANDS`: name -> ("module", "function", "one-line help"). The function takes
the argument list after the subcommand name and returns an exit code.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, tuple[str, str, str]] = {
    "train": ("sparseformer.train.cli", "train_main", "train and evaluate a task config"),
    "eval": ("sparseformer.train.cli", "eval_main", "evaluate the latest checkpoint of a workdir"),
    "presets": ("sparseformer.attention.cli", "presets_main", "list the attention presets and their components"),
    "tasks": ("sparseformer.data.cli", "tasks_main", "list the tasks"),
    "prepare": ("sparseformer.data.cli", "prepare_main", "generate a built-in task's data"),
    "sweep": ("sparseformer.sweep.cli", "sweep_main", "run a named sweep of a config over seeds"),
    "table": ("sparseformer.sweep.cli", "table_main", "turn a sweep's metrics into tables and a plot"),
    "bench": ("sparseformer.bench.cli", "bench_main", "benchmark attention presets against dense attention"),
    "kernel-check": ("sparseformer.attention.kernel_check", "kernel_check_main",
                     "check the fused attention kernel against the reference on this device"),
    "predict": ("sparseformer.infer.cli", "predict_main", "predict with a trained run or an exported model (JSON Lines in and out)"),
    "export": ("sparseformer.infer.cli", "export_main", "serialize a trained run with jax.export (runs with jax and numpy alone)"),
    "demo": ("sparseformer.demo", "demo_main", "the main job on built-in data (what `make demo` runs)"),
    "adopt": ("sparseformer.adopt.cli", "adopt_main", "from a dense run to sparse attention, staged, with a go/no-go report"),
    "monitor": ("sparseformer.monitor", "monitor_main", "check a sparse model's fidelity and agreement on new inputs"),
}


def _usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = ["usage: sparseformer <command> [flags]   (`sparseformer <command> --help` for its flags)", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, _, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        sys.exit(0)
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"sparseformer: unknown command {name!r}; known commands: {', '.join(COMMANDS)}", file=sys.stderr)
        sys.exit(2)
    module, func, _ = COMMANDS[name]
    code = getattr(importlib.import_module(module), func)(rest)
    sys.exit(int(code or 0))
