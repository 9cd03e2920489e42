"""Launching the runs of a sweep: one sub-workdir per run, each run a separate process.

The state of a run is read from its directory, so a sweep can be re-launched at any time:

- `metrics.json` present: the run finished, it is *skipped*;
- `checkpoints/` present (not empty) but no `metrics.json`: the run was interrupted; the same
  command is launched again and the trainer resumes from the checkpoint (*resumed*);
- otherwise the run is launched from scratch (*done* when it succeeds).

A run fails when its process exits non-zero or exits without writing `metrics.json`; its
`error.txt` then holds the return code, the command and the tail of its stderr, and the sweep
goes on. Output goes to `stdout.log` / `stderr.log` in the run directory.

The command of a run is injectable (`command_fn`): by default `TrainerCommand()`, i.e.
`python -m sparseformer train --config=PATH:ARG --workdir=RUNDIR --config.KEY=VALUE ...`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import enum
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sparseformer.sweep.expand import Run

METRICS_FILE = "metrics.json"
RUN_FILE = "run.json"
ERROR_FILE = "error.txt"
CHECKPOINT_DIR = "checkpoints"
SUMMARY_FILE = "sweep_summary.json"
STDERR_TAIL_LINES = 40

CommandFn = Callable[[Run, Path], list[str]]
"""Builds the command line of a run, given the run and its directory."""


class Status(str, enum.Enum):
    """What happened to a run in this invocation of the sweep."""

    DONE = "done"          # ran from scratch and finished
    SKIPPED = "skipped"    # had already finished (metrics.json was there)
    RESUMED = "resumed"    # had a checkpoint, ran again and finished
    FAILED = "failed"      # exited non-zero or without metrics.json (see error.txt)


@dataclasses.dataclass(frozen=True)
class Outcome:
    name: str
    status: Status
    rundir: str
    error: str = ""
    seconds: float = 0.0


@dataclasses.dataclass(frozen=True)
class Summary:
    """The outcomes of a sweep, in the order of its runs."""

    outcomes: tuple[Outcome, ...]

    def names(self, status: Status) -> list[str]:
        return [o.name for o in self.outcomes if o.status == status]

    @property
    def ok(self) -> bool:
        return not self.names(Status.FAILED)

    def format(self) -> str:
        counts = ", ".join(f"{len(self.names(s))} {s.value}" for s in Status)
        lines = [f"sweep: {len(self.outcomes)} runs: {counts}"]
        for o in self.outcomes:
            if o.status == Status.FAILED:
                first = o.error.strip().splitlines()[0] if o.error.strip() else "failed"
                lines.append(f"  FAILED  {o.name}: {first} (see {Path(o.rundir) / ERROR_FILE})")
        for status in (Status.RESUMED, Status.SKIPPED):
            if self.names(status):
                lines.append(f"  {status.value}: {', '.join(self.names(status))}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {"counts": {s.value: len(self.names(s)) for s in Status},
                "runs": [{**dataclasses.asdict(o), "status": o.status.value} for o in self.outcomes]}


def format_override(value: Any) -> str:
    """A value as ml_collections' `--config.KEY=VALUE` flags parse it."""
    if isinstance(value, str):
        return value
    return repr(value) if isinstance(value, (tuple, list, dict)) else str(value)


@dataclasses.dataclass(frozen=True)
class TrainerCommand:
    """The command of a run: `program --config=PATH:ARG --workdir=RUNDIR --config.K=V ...`.

    `program` defaults to the trainer (`python -m sparseformer train`); tests swap in a fake
    trainer script taking the same flags. A dataclass rather than a closure so that submitit
    can pickle it."""

    program: tuple[str, ...] = (sys.executable, "-m", "sparseformer", "train")

    def __call__(self, run: Run, rundir: Path) -> list[str]:
        return [*self.program, f"--config={run.config}", f"--workdir={rundir}",
                *(f"--config.{k}={format_override(v)}" for k, v in run.overrides.items())]


def run_state(rundir: Path) -> str:
    """`"finished"`, `"interrupted"` (a checkpoint but no metrics) or `"new"`."""
    if (rundir / METRICS_FILE).is_file():
        return "finished"
    ckpt = rundir / CHECKPOINT_DIR
    if ckpt.is_dir() and any(ckpt.iterdir()):
        return "interrupted"
    return "new"


def _same_run(rundir: Path, run: Run) -> str:
    """An error message when `rundir` already holds a different run (a name clash between
    sweeps sharing a workdir), else ''."""
    path = rundir / RUN_FILE
    if not path.is_file():
        return ""
    old = json.loads(path.read_text())
    new = json.loads(json.dumps(run.to_json()))
    if (old.get("config"), old.get("overrides")) != (new["config"], new["overrides"]):
        return (f"{rundir} already holds another run ({old.get('config')} with "
                f"{old.get('overrides')}); use another --workdir")
    return ""


def _tail(path: Path, lines: int = STDERR_TAIL_LINES) -> str:
    if not path.is_file():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def execute_run(run: Run, rundir: str | Path, command_fn: CommandFn | None = None) -> Outcome:
    """Run one run to completion in `rundir` (skip it when it has finished) and say how it went.
    Never raises for a failing run: the failure is written to `error.txt` and returned."""
    rundir = Path(rundir)
    command_fn = TrainerCommand() if command_fn is None else command_fn
    clash = _same_run(rundir, run)
    if clash:
        return Outcome(run.name, Status.FAILED, str(rundir), clash)
    state = run_state(rundir)
    if state == "finished":
        return Outcome(run.name, Status.SKIPPED, str(rundir))
    rundir.mkdir(parents=True, exist_ok=True)
    (rundir / RUN_FILE).write_text(json.dumps(run.to_json(), indent=2) + "\n")
    (rundir / ERROR_FILE).unlink(missing_ok=True)  # a retry of a failed run starts clean
    command = command_fn(run, rundir)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    start = time.monotonic()
    stamp = f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(command)}\n"
    try:
        with open(rundir / "stdout.log", "a") as out, open(rundir / "stderr.log", "a") as err:
            out.write(stamp)
            err.write(stamp)
            out.flush()
            err.flush()
            returncode = subprocess.run(command, stdout=out, stderr=err, env=env,
                                        stdin=subprocess.DEVNULL, check=False).returncode
    except OSError as e:  # the program could not be started at all
        returncode, tail = -1, f"{type(e).__name__}: {e}"
    else:
        tail = _tail(rundir / "stderr.log")
    seconds = time.monotonic() - start
    if returncode == 0 and (rundir / METRICS_FILE).is_file():
        return Outcome(run.name, Status.RESUMED if state == "interrupted" else Status.DONE,
                       str(rundir), seconds=seconds)
    reason = (f"return code {returncode}" if returncode != 0
              else f"exited 0 without writing {METRICS_FILE}")
    error = f"{reason}\ncommand: {shlex.join(command)}\n--- tail of stderr ---\n{tail}\n"
    (rundir / ERROR_FILE).write_text(error)
    return Outcome(run.name, Status.FAILED, str(rundir), error, seconds)


def run_dirs(runs: Sequence[Run], workdir: str | Path) -> list[Path]:
    """Each run's directory: `workdir/<run name>`."""
    return [Path(workdir) / run.name for run in runs]


def write_summary(workdir: str | Path, summary: Summary) -> Path:
    path = Path(workdir) / SUMMARY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary.to_json(), indent=2) + "\n")
    return path


def run_local(runs: Sequence[Run], workdir: str | Path, *, parallel: int = 1,
              command_fn: CommandFn | None = None, progress: bool = True) -> Summary:
    """Run the runs on this machine, `parallel` processes at a time, with a progress bar."""
    from tqdm import tqdm  # noqa: PLC0415

    if parallel < 1:
        raise ValueError(f"--parallel must be at least 1, got {parallel}")
    dirs = run_dirs(runs, workdir)
    outcomes: list[Outcome | None] = [None] * len(runs)
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=parallel)
    try:
        with tqdm(total=len(runs), desc="runs", unit="run", disable=not progress) as bar:
            futures = {pool.submit(execute_run, run, d, command_fn): i
                       for i, (run, d) in enumerate(zip(runs, dirs))}
            for future in concurrent.futures.as_completed(futures):
                i = futures[future]
                outcome = future.result()
                outcomes[i] = outcome
                bar.set_postfix_str(f"last: {outcome.name} {outcome.status.value}")
                bar.update()
    except KeyboardInterrupt:
        # Ctrl-C reached the running trainers too (same process group); launch no more.
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    summary = Summary(tuple(o for o in outcomes if o is not None))
    write_summary(workdir, summary)
    return summary


def make_slurm_executor(folder: str | Path, *, cluster: str | None = None,
                        partition: str | None = None, time_min: int = 60,
                        gpus_per_node: int = 0, cpus_per_task: int | None = None,
                        mem_gb: float | None = None, array_parallelism: int = 32,
                        **extra: Any) -> Any:
    """A `submitit.AutoExecutor` for the sweep (`cluster="local"` runs jobs as local processes,
    which is how tests exercise this path). `extra` goes to `update_parameters` as is."""
    import submitit  # noqa: PLC0415

    executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    params: dict[str, Any] = {"timeout_min": time_min, "gpus_per_node": gpus_per_node,
                              "slurm_array_parallelism": array_parallelism}
    if partition:
        params["slurm_partition"] = partition
    if cpus_per_task:
        params["cpus_per_task"] = cpus_per_task
    if mem_gb:
        params["mem_gb"] = mem_gb
    if executor.cluster != "slurm":  # other executors reject slurm_* keys
        params = {k: v for k, v in params.items() if not k.startswith("slurm_")}
    executor.update_parameters(**params, **extra)
    return executor


def run_submitit(runs: Sequence[Run], workdir: str | Path, executor: Any, *,
                 command_fn: CommandFn | None = None, progress: bool = True) -> Summary:
    """Submit the unfinished runs as one job array through a submitit executor, wait for them,
    and summarise. Finished runs are skipped without a job. Each job runs `execute_run`."""
    from tqdm import tqdm  # noqa: PLC0415

    dirs = run_dirs(runs, workdir)
    outcomes: dict[int, Outcome] = {}
    todo: list[int] = []
    for i, (run, d) in enumerate(zip(runs, dirs)):
        if run_state(d) == "finished" and not _same_run(d, run):
            outcomes[i] = Outcome(run.name, Status.SKIPPED, str(d))
        else:
            todo.append(i)
    if todo:
        jobs = executor.map_array(execute_run, [runs[i] for i in todo], [str(dirs[i]) for i in todo],
                                  [command_fn] * len(todo))
        print(f"submitted {len(jobs)} jobs (array {jobs[0].job_id.split('_')[0]}); "
              f"logs in {executor.folder}", file=sys.stderr)
        for i, job in tqdm(zip(todo, jobs), total=len(todo), desc="runs", unit="run",
                           disable=not progress):
            try:
                outcomes[i] = job.result()
            except Exception as e:  # noqa: BLE001 (the job itself died: record it, go on)
                error = f"job {job.job_id} failed: {type(e).__name__}: {e}"
                Path(dirs[i]).mkdir(parents=True, exist_ok=True)
                (Path(dirs[i]) / ERROR_FILE).write_text(error + "\n")
                outcomes[i] = Outcome(runs[i].name, Status.FAILED, str(dirs[i]), error)
    summary = Summary(tuple(outcomes[i] for i in range(len(runs))))
    write_summary(workdir, summary)
    return summary


LAUNCHERS = ("local", "slurm")


def describe(runs: Sequence[Run], workdir: str | Path, command_fn: CommandFn | None = None) -> str:
    """What `--dry_run` prints: one block per run, its state, label and command."""
    command_fn = TrainerCommand() if command_fn is None else command_fn
    lines = [f"{len(runs)} runs in {workdir}:"]
    for run, d in zip(runs, run_dirs(runs, workdir)):
        lines.append(f"  {run.name}  [{run_state(d)}]  label={run.label!r}")
        lines.append(f"    {shlex.join(command_fn(run, d))}")
    return "\n".join(lines)


def run_sweep(runs: Sequence[Run], workdir: str | Path, *, launcher: str = "local", parallel: int = 1,
              command_fn: CommandFn | None = None, executor: Any = None, progress: bool = True,
              **slurm: Any) -> Summary:
    """Run `runs` under `workdir` with the chosen launcher (`local`: `parallel` processes at a
    time; `slurm`: a submitit job array, `executor` given or built from `slurm` keyword
    arguments of `make_slurm_executor`)."""
    if launcher == "local":
        return run_local(runs, workdir, parallel=parallel, command_fn=command_fn, progress=progress)
    if launcher == "slurm":
        if executor is None:
            executor = make_slurm_executor(Path(workdir) / "submitit", array_parallelism=parallel, **slurm)
        return run_submitit(runs, workdir, executor, command_fn=command_fn, progress=progress)
    raise ValueError(f"unknown launcher {launcher!r}; known launchers: {', '.join(LAUNCHERS)}")
