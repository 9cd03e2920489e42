"""`sparseformer sweep` and `sparseformer table`: flags parsed here, the work done by
`sparseformer.sweep.launch` and `sparseformer.sweep.report`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from sparseformer.sweep import expand, launch, table

_SWEEP_EPILOG = """\
examples:
  sparseformer sweep --config=configs/listops.py:scale=small --sweep=ablation --seeds=3 \\
      --workdir=runs/listops_ablation --parallel=2
  sparseformer sweep --config=configs/listops.py:scale=small --sweep=presets --dry_run --workdir=runs/x
  sparseformer sweep ... --launcher=slurm --slurm_partition=gpu --slurm_gpus_per_node=1 --slurm_time=120

Each run gets WORKDIR/<name>__seed<s>/ with run.json, stdout.log, stderr.log and what the
trainer writes. Re-running the same command skips finished runs (metrics.json present),
resumes interrupted ones (checkpoints/ present) and retries failed ones (error.txt).
The summary is printed at the end and written to WORKDIR/sweep_summary.json; the exit
code is 1 when a run failed.
"""

_TABLE_EPILOG = """\
layouts:
  1  task metric per task (columns) per attention (rows), with Avg   (Long Range Arena Table 1)
  2  steps/s and peak memory relative to dense per length 1K..4K   (Long Range Arena Table 2);
     from the training runs, or from bench.json (`sparseformer bench`) when no run has steps/s
  3  component ablation: task metric, fidelity, steps/s and memory relative to dense, per task
  auto  3 for an ablation sweep, 2 for several lengths (or a benchmark alone), else 1

Cells are mean ± sample std (ddof=1) over seeds; a count (n=..) is shown where it differs
from the table's usual number of seeds. The best entry per column is bold (md, latex) or
followed by * (csv): higher accuracy/BLEU/speed, lower perplexity/fidelity (KL)/memory;
the reference row (dense) does not compete in the columns relative to it.

examples:
  sparseformer table --workdir=runs/listops_ablation
  sparseformer table --workdir=runs/table1 --layout=1 --format=latex --out=paper/
  sparseformer table --workdir=runs/ablation --rows=dense,rsa --cols=listops
"""


def _sweep_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sparseformer sweep", description="Run a named sweep of a config file over seeds.",
        epilog=_SWEEP_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, metavar="PATH:ARG",
                   help="config file and its argument, e.g. configs/listops.py:scale=small")
    p.add_argument("--sweep", required=True, metavar="NAME",
                   help="name of a sweep the config's get_sweep(name, arg) knows, e.g. ablation, presets")
    p.add_argument("--workdir", required=True, help="directory holding one sub-directory per run")
    p.add_argument("--seeds", default="3", metavar="N|S1,S2,..",
                   help="N seeds 0..N-1, or an explicit comma-separated list (default: 3)")
    p.add_argument("--parallel", type=int, default=1, metavar="N",
                   help="runs at a time (local processes; slurm: array parallelism) (default: 1)")
    p.add_argument("--launcher", choices=launch.LAUNCHERS, default="local",
                   help="local processes, or a Slurm job array through submitit (default: local)")
    p.add_argument("--dry_run", action="store_true", help="print the runs and their commands, run nothing")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    s = p.add_argument_group("slurm (with --launcher=slurm)")
    s.add_argument("--slurm_partition", default=None)
    s.add_argument("--slurm_time", type=int, default=60, metavar="MINUTES", help="time limit per run (default: 60)")
    s.add_argument("--slurm_gpus_per_node", type=int, default=0)
    s.add_argument("--slurm_cpus_per_task", type=int, default=None)
    s.add_argument("--slurm_mem_gb", type=float, default=None)
    s.add_argument("--slurm_cluster", default=None,
                   help="submitit cluster: slurm (default when available), local or debug (for trying it out)")
    return p


def sweep_main(argv: Sequence[str]) -> int:
    args = _sweep_parser().parse_args(list(argv))
    try:
        runs = expand.expand_runs(args.config, args.sweep, args.seeds)
    except (ValueError, FileNotFoundError) as e:
        print(f"sparseformer sweep: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(launch.describe(runs, args.workdir))
        return 0
    summary = launch.run_sweep(
        runs, args.workdir, launcher=args.launcher, parallel=args.parallel, progress=not args.no_progress,
        cluster=args.slurm_cluster, partition=args.slurm_partition, time_min=args.slurm_time,
        gpus_per_node=args.slurm_gpus_per_node, cpus_per_task=args.slurm_cpus_per_task,
        mem_gb=args.slurm_mem_gb)
    print(summary.format())
    return 0 if summary.ok else 1


def _table_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sparseformer table", description="Turn the metrics of finished runs into a table and a plot.",
        epilog=_TABLE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, action="append",
                   help="directory searched for metrics.json (repeat to combine several)")
    p.add_argument("--format", choices=list(table.FORMATTERS), default="md", help="output format (default: md)")
    p.add_argument("--layout", choices=[*table.LAYOUTS, "auto"], default="auto", help="see below (default: auto)")
    p.add_argument("--rows", default=None, help="comma-separated row labels to show, in this order")
    p.add_argument("--cols", default=None, help="comma-separated columns or column groups (tasks, lengths) to show")
    p.add_argument("--bench", action="append", default=None, metavar="BENCH_JSON",
                   help="benchmark file(s) for layout 2 (default: any bench.json below the workdir)")
    p.add_argument("--reference", default="dense", help="the row speed and memory are relative to (default: dense)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="also write table<N>.<md|tex|csv> and the plot table<N>.png into DIR")
    p.add_argument("--no_plot", action="store_true", help="with --out, skip the plot")
    return p


def _split(text: str | None) -> list[str] | None:
    return [x.strip() for x in text.split(",") if x.strip()] if text else None


def table_main(argv: Sequence[str]) -> int:
    from sparseformer.sweep.report import make_report  # noqa: PLC0415 (matplotlib only here)

    args = _table_parser().parse_args(list(argv))
    try:
        report = make_report(args.workdir, layout=args.layout, fmt=args.format, rows=_split(args.rows),
                             cols=_split(args.cols), bench=args.bench, reference=args.reference,
                             out=args.out, plot=not args.no_plot)
    except (ValueError, FileNotFoundError) as e:
        print(f"sparseformer table: {e}", file=sys.stderr)
        return 2
    print(report.text, end="")
    for path in (report.table_path, report.plot_path):
        if path is not None:
            print(f"wrote {path}", file=sys.stderr)
    return 0
