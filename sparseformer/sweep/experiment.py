"""What the scripts of `experiments/` share: run one named sweep over several task configs
(one sub-workdir per task), then write the table and the plot.

    experiments/table3_ablation.py --scale=small  ==
      for task in (listops, retrieval):
          sparseformer sweep --config=configs/<task>.py:scale=small --sweep=ablation --seeds=3 \\
              --workdir=runs/table3_small/<task>
      sparseformer table --workdir=runs/table3_small --layout=3 --out=experiments/results/small
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sparseformer.sweep import expand, launch
from sparseformer.sweep.report import make_report

SCALES = ("tiny", "small", "paper")
DEFAULT_SEEDS = {"tiny": 1, "small": 3, "paper": 3}


def task_configs(config_dir: str | Path = "configs") -> list[str]:
    """The task names of every config file in `config_dir` that defines sweeps."""
    found = []
    for path in sorted(Path(config_dir).glob("*.py")):
        if not path.name.startswith("_") and "def get_sweep" in path.read_text():
            found.append(path.stem)
    return found


@dataclasses.dataclass(frozen=True)
class Experiment:
    """One table of the paper: which sweep, on which tasks, in which layout."""

    number: str               # the table's layout ("1", "2", "3")
    sweep: str                # the sweep each task config runs
    tasks: tuple[str, ...]    # default tasks; empty: every config in configs/
    description: str


def parser(exp: Experiment) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=exp.description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--scale", choices=SCALES, default="small", help="tiny: seconds (tests); small: the CPU demo; "
                   "paper: the Long Range Arena sizes (GPU/TPU)")
    p.add_argument("--tasks", default=",".join(exp.tasks) or None,
                   help="comma-separated task configs (configs/<task>.py); default: every config with sweeps")
    p.add_argument("--config_dir", default="configs")
    p.add_argument("--seeds", default=None, help="seeds per configuration (default: 1 at tiny scale, else 3)")
    p.add_argument("--workdir", default=None, help="runs go to WORKDIR/<task>/ (default: runs/table<N>_<scale>)")
    p.add_argument("--out", default=None, help="table and plot directory (default: experiments/results/<scale>)")
    p.add_argument("--format", default="md", choices=["md", "latex", "csv"])
    p.add_argument("--parallel", type=int, default=1, help="runs at a time")
    p.add_argument("--launcher", default="local", choices=launch.LAUNCHERS)
    p.add_argument("--bench", action="append", default=None,
                   help="benchmark JSON to build the table from (layout 2) instead of training runs")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override added to every run (repeatable), e.g. --set=num_train_steps=200; "
                        "TASK:KEY=VALUE for one task's runs only, e.g. --set=listops:num_train_steps=150")
    p.add_argument("--only", default="", help="comma-separated run labels to keep (e.g. dense,local,rsa); default all")
    p.add_argument("--dry_run", action="store_true", help="print the runs; run nothing, write nothing")
    p.add_argument("--table_only", action="store_true", help="skip the sweep: tabulate what is in WORKDIR")
    return p


def parse_settings(settings: Sequence[str], task: str | None = None) -> dict[str, Any]:
    """`["num_train_steps=200", "optimizer.learning_rate=2e-3"]` -> overrides (Python literals
    where they parse, strings otherwise). `TASK:KEY=VALUE` applies to that task's runs only
    (dropped when `task` is another one)."""
    out: dict[str, Any] = {}
    for item in settings:
        key, sep, value = item.partition("=")
        only, colon, key = key.rpartition(":")
        if not sep or not key or (colon and not only):
            raise ValueError(f"--set: {item!r} is not KEY=VALUE or TASK:KEY=VALUE")
        if colon and task is not None and only != task:
            continue
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def main(exp: Experiment, argv: Sequence[str] | None = None, *,
         command_fn: launch.CommandFn | None = None) -> int:
    """Run the experiment's sweep on its tasks, then write its table and plot. `command_fn`
    replaces the trainer command (tests)."""
    args = parser(exp).parse_args(argv)
    workdir = Path(args.workdir or f"runs/table{exp.number}_{args.scale}")
    out = Path(args.out or f"experiments/results/{args.scale}")
    seeds = args.seeds or str(DEFAULT_SEEDS[args.scale])
    tasks = args.tasks.split(",") if args.tasks else task_configs(args.config_dir)
    ok = True
    if not args.bench and not args.table_only:
        if not tasks:
            print(f"no task configs with sweeps in {args.config_dir}/", file=sys.stderr)
            return 2
        for task in tasks:
            spec = f"{args.config_dir}/{task}.py:scale={args.scale}"
            try:
                runs = expand.expand_runs(spec, exp.sweep, seeds)
                extra = parse_settings(args.set, task)
            except (ValueError, FileNotFoundError) as e:
                print(f"{task}: {e}", file=sys.stderr)
                return 2
            runs = [dataclasses.replace(r, overrides={**r.overrides, **extra}) for r in runs]
            if args.only:
                keep = set(args.only.split(","))
                runs = [r for r in runs if r.label in keep]
            if args.dry_run:
                print(launch.describe(runs, workdir / task))
                continue
            print(f"== {task}: sweep {exp.sweep!r}, {len(runs)} runs in {workdir / task}", file=sys.stderr)
            summary = launch.run_sweep(runs, workdir / task, launcher=args.launcher,
                                       parallel=args.parallel, command_fn=command_fn)
            print(summary.format(), file=sys.stderr)
            ok &= summary.ok
    if args.dry_run:
        return 0
    # with --bench the table comes from the benchmark alone, not from training runs
    report = make_report([] if args.bench else workdir, layout=exp.number, fmt=args.format,
                         bench=args.bench, out=out)
    print(report.text, end="")
    print(f"wrote {report.table_path}" + (f" and {report.plot_path}" if report.plot_path else ""), file=sys.stderr)
    return 0 if ok else 1
