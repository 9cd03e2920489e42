"""`make demo` / `sparseformer demo`: the main job on built-in data, on this machine.

1. The attention alone: dense against `rsa` at 1K-4K tokens, forward and backward, measured
   side by side (time, XLA's compiled memory, error on random and needle inputs).
2. The component ablation of `rsa` (9 configurations) on the built-in ListOps and retrieval
   tasks at small scale, over two seeds: 36 short training runs (ListOps 150 steps, retrieval
   200), each a separate trainer process, two at a time; finished runs are skipped when the
   demo is run again. Then table 3 and its accuracy-speed plot.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from sparseformer.sweep.experiment import Experiment
from sparseformer.sweep.experiment import main as run_experiment

ABLATION = Experiment(
    number="3",
    sweep="ablation",
    tasks=("listops", "retrieval"),
    description="the component ablation of rsa",
)


# Short runs that still separate the configurations (measured on a 2-core CPU): retrieval
# needs ~200 steps before dense and rsa find the needle; ListOps moves little after 150.
DEMO_STEPS = {"listops": 150, "retrieval": 200}


def _step_settings(steps: int | None, scale: str) -> list[str]:
    """`--set` flags giving each task its number of steps (evaluated and saved at the end)."""
    if steps is None and scale != "small":
        return []
    out = []
    for task, default in DEMO_STEPS.items():
        n = steps or default
        out += [f"--set={task}:{key}={n}" for key in ("num_train_steps", "eval_every_steps", "checkpoint_every_steps")]
    return out


def _banner(text: str) -> None:
    print(f"\n{'=' * 78}\n{text}\n{'=' * 78}", flush=True)


def demo_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="sparseformer demo",
        description="Attention benchmark (dense vs rsa), then the component ablation on built-in "
        "ListOps and retrieval at small scale with table 3 and its plot.",
    )
    parser.add_argument("--workdir", default="runs/demo", help="where runs, tables and plots go")
    parser.add_argument("--scale", default="small", choices=["tiny", "small"], help="tiny: a smoke test in ~2 minutes")
    parser.add_argument("--seeds", default="2", help="seeds per configuration")
    parser.add_argument("--parallel", type=int, default=2, help="trainer processes at a time")
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps per run, both tasks (default at small scale: "
                        + ", ".join(f"{t} {n}" for t, n in DEMO_STEPS.items()) + "; tiny: the scale's own)")
    parser.add_argument("--lengths", default="1024,2048,4096", help="attention benchmark lengths")
    parser.add_argument("--skip_bench", action="store_true", help="only the ablation")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir)
    start = time.time()
    # the two seeds of a configuration compile the same programs: let the second reuse them
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str((workdir / "jax_cache").resolve()))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")

    if not args.skip_bench:
        from sparseformer.bench.cli import bench_main

        _banner("1/2  attention alone: dense vs rsa, forward+backward (B=1, H=4, D=64, float32)")
        code = bench_main(
            ["--presets=dense,rsa", f"--lengths={args.lengths}", "--passes=fwd_bwd", "--rss=none",
             "--repeats=3", f"--out={workdir / 'bench'}"]
        )
        if code:
            return code

    _banner(f"2/2  component ablation of rsa: listops and retrieval, scale={args.scale}, seeds={args.seeds}")
    code = run_experiment(
        ABLATION,
        [
            f"--scale={args.scale}",
            f"--seeds={args.seeds}",
            f"--parallel={args.parallel}",
            f"--workdir={workdir / 'runs'}",
            f"--out={workdir / 'results'}",
            *_step_settings(args.steps, args.scale),
        ],
    )
    print(f"\ndemo finished in {(time.time() - start) / 60:.1f} minutes; everything is under {workdir}/", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(demo_main(sys.argv[1:]))
