"""`make demo` / `sparseformer demo`: the main job on built-in data, on this machine.

1. The attention alone: dense against `rsa` at 1K-4K tokens, forward and backward, measured
   side by side (time, XLA's compiled memory, error on random and needle inputs).
2. The component ablation of `rsa` (9 configurations) on the built-in ListOps and retrieval
   tasks at small scale, one seed: 18 short training runs (ListOps 150 steps, retrieval 200),
   each a separate trainer process, two at a time; finished runs are skipped when the demo is run
   again. Then table 3 and its accuracy-speed plot.
3. Where it pays: a dense and an `rsa` retrieval classifier trained at 1024 tokens (the answer at
   least 512 tokens from the query), then both run as trained models (`sparseformer bench
   --model`): accuracy, batch-1 latency and peak memory side by side at 1024 tokens, and the same
   architectures at 4096.
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

# Step 3: retrieval at 1024 tokens, one layer, blocks of 64 (what rsa's scan kernel is made for); the
# same runs as experiments/table4_inference.py's `retrieval_1k`.
INFERENCE_CONFIG = "configs/retrieval.py"
INFERENCE_OVERRIDES: dict[str, object] = {
    "data.max_len": 1024, "data.num_train": 2000, "data.num_validation": 100, "data.num_test": 300,
    "model.num_layers": 1, "model.attention.selection.block_size": 64,
    "batch_size": 8, "num_train_steps": 200, "eval_every_steps": 200, "checkpoint_every_steps": 200,
    "log_every_steps": 20,
}
INFERENCE_LENGTHS = (4096,)


def train_commands(scale: str, workdir: Path) -> dict[str, list[str]]:
    """The trainer commands of step 3's dense and rsa runs (tiny: the tiny scale's own lengths)."""
    overrides = INFERENCE_OVERRIDES if scale == "small" else {"num_train_steps": 4}
    return {
        att: [sys.executable, "-m", "sparseformer", "train", f"--config={INFERENCE_CONFIG}:attention={att},scale={scale}",
              f"--workdir={workdir / att}"] + [f"--config.{k}={v}" for k, v in overrides.items()]
        for att in ("dense", "rsa")
    }


def inference_comparison(scale: str, workdir: Path) -> int:
    """Train (or reuse) the two runs side by side, then benchmark them as trained models."""
    import json
    import subprocess

    from sparseformer.infer import bench as bench_lib

    procs = {}
    for att, cmd in train_commands(scale, workdir).items():
        if not (workdir / att / "metrics.json").exists():
            (workdir / att).mkdir(parents=True, exist_ok=True)
            log = open(workdir / f"{att}.log", "w")  # noqa: SIM115
            procs[att] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log)
            print(f"training {att}: {' '.join(cmd[2:])} (log: {workdir / f'{att}.log'})", flush=True)
    for att, (proc, log) in procs.items():
        if proc.wait():
            print(f"training {att} failed; see {workdir / f'{att}.log'}", file=sys.stderr)
            return 1
        log.close()
    runs = [str(workdir / att) for att in ("dense", "rsa")]
    lengths = INFERENCE_LENGTHS if scale == "small" else ()
    bench = bench_lib.run_benchmark(runs, lengths=lengths, batch_sizes=(1, 4), repeats=5,
                                    progress=lambda m: print(m, flush=True))
    bench_lib.write(bench, str(workdir / "bench"), command="sparseformer demo (step 3)")
    acc = {att: json.loads((workdir / att / "metrics.json").read_text())["accuracy"] for att in ("dense", "rsa")}
    print("\n| attention | length | test accuracy | batch-1 latency ms (speed-up) | peak memory MB (x dense) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for r in sorted(bench["results"], key=lambda r: (r["length"], r["attention"] != "dense")):
        dense = r["attention"] == "dense"
        a = f"{100 * acc[r['attention']]:.1f}%" if r["trained_params"] else "(not trained at this length)"
        sp = "" if dense or r["latency_speedup"] is None else f" ({r['latency_speedup']:.1f}x)"
        mem = r["peak_rss_bytes"] if r["peak_rss_bytes"] is not None else r["compiled_bytes"]
        fr = "" if dense or r.get("peak_rss_vs_dense") is None else f" ({r['peak_rss_vs_dense']:.2f})"
        lat = "skipped" if r["latency_ms_p50"] is None else f"{r['latency_ms_p50']:.1f}{sp}"
        print(f"| {r['attention']} | {r['length']} | {a} | {lat} | {(mem or 0) / 2**20:.0f}{fr} |")
    print(f"\nfull report: {workdir / 'bench' / 'inference.md'} and its plot {workdir / 'bench' / 'inference.png'}", flush=True)
    return 0


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
        description="Attention benchmark (dense vs rsa), the component ablation on built-in ListOps and "
        "retrieval at small scale with table 3 and its plot, then trained dense and rsa classifiers at 1024 "
        "tokens side by side at inference (accuracy, latency, memory).",
    )
    parser.add_argument("--workdir", default="runs/demo", help="where runs, tables and plots go")
    parser.add_argument("--scale", default="small", choices=["tiny", "small"], help="tiny: a smoke test in ~2 minutes")
    parser.add_argument("--seeds", default="1", help="seeds per configuration of the ablation")
    parser.add_argument("--parallel", type=int, default=2, help="trainer processes at a time")
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps per run, both tasks (default at small scale: "
                        + ", ".join(f"{t} {n}" for t, n in DEMO_STEPS.items()) + "; tiny: the scale's own)")
    parser.add_argument("--lengths", default="1024,2048,4096", help="attention benchmark lengths")
    parser.add_argument("--skip_bench", action="store_true", help="skip the attention benchmark (step 1)")
    parser.add_argument("--skip_inference", action="store_true", help="skip the trained-model comparison (step 3)")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir)
    start = time.time()
    # the two seeds of a configuration compile the same programs: let the second reuse them
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str((workdir / "jax_cache").resolve()))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")

    if not args.skip_bench:
        from sparseformer.bench.cli import bench_main

        _banner("1/3  attention alone: dense vs rsa, forward+backward (B=1, H=4, D=64, float32)")
        code = bench_main(
            ["--presets=dense,rsa", f"--lengths={args.lengths}", "--passes=fwd_bwd", "--rss=none",
             "--repeats=3", f"--out={workdir / 'bench'}"]
        )
        if code:
            return code

    _banner(f"2/3  component ablation of rsa: listops and retrieval, scale={args.scale}, seeds={args.seeds}")
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
    if not args.skip_inference and not code:
        _banner(f"3/3  where it pays: trained dense and rsa classifiers (retrieval, 1024 tokens), scale={args.scale}")
        code = inference_comparison(args.scale, workdir / "inference")
    print(f"\ndemo finished in {(time.time() - start) / 60:.1f} minutes; everything is under {workdir}/", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(demo_main(sys.argv[1:]))
