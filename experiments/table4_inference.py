"""Table 4: what a trained model gains at inference. Per task, dense vs `rsa` trained from scratch vs
`rsa` distilled from the dense run: the task metric, and the inference speed-up and memory ratio to
dense at the task's length (`sparseformer bench --model`).

    python experiments/table4_inference.py --stage=train            # the runs (resumable), shared CPU is fine
    python experiments/table4_inference.py --stage=bench            # timings, with the machine alone
    python experiments/table4_inference.py --stage=table            # experiments/results/small/table4.md

Tasks (small scale, sized for a shared 2-core CPU):
  retrieval_1k     retrieval at 1024 tokens (its answer >= 512 tokens from the query), 1 layer, blocks
                   of 64; speed and memory also at 2K-16K (same architecture, random parameters)
  synth_translate  the synthetic translation task at 128 tokens in blocks of 8 (BLEU)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from sparseformer.demo import INFERENCE_CONFIG, INFERENCE_OVERRIDES

ROOT = Path(__file__).resolve().parent.parent

# name -> (config file, config argument without attention, overrides for every run). Sized to what this
# shared 2-core CPU trains in minutes: at 4096 tokens a dense step took 6.9 s (batch 8, 1 layer) and dense
# retrieval sat at chance after 75 steps, so the long-length numbers come from `bench_lengths` (the same
# architecture at longer lengths, random parameters: speed and memory do not depend on their values).
TASKS: dict[str, tuple[str, str, dict[str, object]]] = {
    "retrieval_1k": (INFERENCE_CONFIG, "scale=small,seed=0", INFERENCE_OVERRIDES),  # the demo's step 3 runs
    "synth_translate": ("configs/synth_translate.py", "scale=small,seed=0", {
        "data.max_len": 128, "data.max_target_len": 128, "data.num_train": 6000, "data.num_test": 200,
        "model.attention.selection.block_size": 8, "batch_size": 16, "num_train_steps": 400,
        "eval_every_steps": 100, "checkpoint_every_steps": 100, "max_checkpoints_to_keep": 4, "num_eval_batches": -1,
        "log_every_steps": 25,
    }),
}
BENCH_LENGTHS = {"retrieval_1k": (2048, 4096, 8192, 16384), "synth_translate": (512,)}
DISTILL = {"distill.weight": 1.0, "distill.temperature": 2.0}
VARIANTS = ("dense", "rsa", "rsa_distilled")  # rsa_distilled: rsa trained toward the dense run's outputs


def run_dirs(workdir: Path, task: str) -> dict[str, Path]:
    return {v: workdir / task / v for v in VARIANTS}


def train_command(task: str, variant: str, workdir: Path) -> list[str]:
    path, arg, overrides = TASKS[task]
    attention = "dense" if variant == "dense" else "rsa"
    settings = dict(overrides)
    if variant == "rsa_distilled":
        settings.update(DISTILL, **{"distill.teacher_workdir": str(run_dirs(workdir, task)["dense"])})
    return [sys.executable, "-m", "sparseformer", "train", f"--config={path}:attention={attention},{arg}",
            f"--workdir={run_dirs(workdir, task)[variant]}"] + [f"--config.{k}={v}" for k, v in settings.items()]


def train(tasks: list[str], workdir: Path) -> int:
    for task in tasks:
        for variant in VARIANTS:
            d = run_dirs(workdir, task)[variant]
            if (d / "metrics.json").exists():
                print(f"{task}/{variant}: done", flush=True)
                continue
            cmd = train_command(task, variant, workdir)
            print(f"{task}/{variant}: {' '.join(cmd[1:])}", flush=True)
            t0 = time.time()
            code = subprocess.call(cmd, cwd=ROOT)
            print(f"{task}/{variant}: exit {code} after {(time.time() - t0) / 60:.1f} min", flush=True)
            if code:
                return code
    return 0


def bench(tasks: list[str], workdir: Path, out: Path, repeats: int) -> int:
    """All three runs at the task's length (trained parameters), then dense and rsa at the longer
    `BENCH_LENGTHS` (random parameters: the distilled run has rsa's architecture, so it is not timed
    twice); one report per task."""
    from sparseformer.infer import bench as bench_lib

    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    for task in tasks:
        dirs = run_dirs(workdir, task)
        result = bench_lib.run_benchmark([str(d) for d in dirs.values()], batch_sizes=(1, 4), repeats=repeats, progress=log)
        if BENCH_LENGTHS.get(task):
            longer = bench_lib.run_benchmark([str(dirs["dense"]), str(dirs["rsa"])], lengths=BENCH_LENGTHS[task],
                                             batch_sizes=(1, 4), repeats=repeats, progress=log)
            result["results"] += [r for r in longer["results"] if not r["trained_params"]]
            result["options"]["lengths"] = longer["options"]["lengths"]
        for r in result["results"]:  # the distilled run is rsa too: name rows by variant
            r["attention"] = Path(r["run"]).name
        bench_lib.add_ratios(result["results"])
        bench_lib.write(result, str(out / f"table4_{task}"), command=f"experiments/table4_inference.py --stage=bench --tasks={task}")
    return 0


def metric_curve(run: Path) -> list[tuple[int, float]]:
    """The task metric of every kept checkpoint of a run, on its test split: `(step, metric)`.

    Each step is evaluated from a copy of the run directory that holds that checkpoint alone (the
    evaluator restores the latest one). Cached in RUN/metric_curve.json.
    """
    import shutil
    import tempfile

    from sparseformer.train.loop import evaluate_workdir

    cache = run / "metric_curve.json"
    if cache.exists():
        return [tuple(x) for x in json.loads(cache.read_text())]
    curve = []
    steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    for step in steps:
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copy(run / "config.json", tmp)
            shutil.copytree(run / "checkpoints" / str(step), Path(tmp) / "checkpoints" / str(step))
            res = evaluate_workdir(tmp, "test")
        metric = "bleu" if "bleu" in res else "accuracy"
        curve.append((step, float(res[metric])))
        print(f"{run}: step {step}: {metric} {res[metric]:.3f}", flush=True)
    cache.write_text(json.dumps(curve))
    return curve


def table(tasks: list[str], workdir: Path, out: Path) -> str:
    lines = ["**Inference of trained models: task metric, and speed and memory relative to dense at the task's length**", "",
             "| task | length | variant | metric | batch-1 latency ms (speed-up) | throughput /s (x dense) | peak memory MB (x dense) "
             "| compiled MB (x dense) | train wall min |", "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for task in tasks:
        b = json.loads((out / f"table4_{task}" / "inference.json").read_text())
        rows = {r["attention"]: r for r in b["results"] if r["trained_params"]}
        for variant, d in run_dirs(workdir, task).items():
            m = json.loads((d / "metrics.json").read_text())
            metric = "bleu" if "bleu" in m else "accuracy"
            value = m[metric] if metric == "bleu" else 100 * m[metric]
            r = rows[variant]
            x = lambda k, f="{:.2f}x": "" if variant == "dense" or r.get(k) is None else " (" + f.format(r[k]) + ")"  # noqa: E731
            lines.append(
                f"| {task} | {r['length']} | {variant} | {metric} {value:.2f} | {r['latency_ms_p50']:.1f}{x('latency_speedup')} "
                f"| {r['throughput_per_s']:.1f}{x('throughput_ratio')} | {(r['peak_rss_bytes'] or 0) / 2**20:.0f}{x('peak_rss_vs_dense', '{:.3f}')} "
                f"| {r['compiled_bytes'] / 2**20:.0f}{x('compiled_vs_dense', '{:.3f}')} | {m.get('wall_seconds', 0) / 60:.1f} |")
    lines += ["", "**The same architectures at longer inputs (random parameters): rsa's batch-1 latency speed-up and "
              "memory fraction of dense**", "", "| task | length | latency dense ms | latency rsa ms (speed-up) | peak memory "
              "dense MB | rsa (x dense) | compiled dense MB | rsa (x dense) |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for task in tasks:
        b = json.loads((out / f"table4_{task}" / "inference.json").read_text())
        for length in sorted({r["length"] for r in b["results"] if not r["trained_params"]}):
            at = {r["attention"]: r for r in b["results"] if r["length"] == length}
            d, r = at.get("dense"), at.get("rsa")
            if not d or not r or r.get("latency_ms_p50") is None:
                continue
            g = lambda x, k, f="{:.1f}": "skipped" if x.get(k) is None else f.format(x[k])  # noqa: E731
            mb = lambda x, k: "" if x.get(k) is None else f"{x[k] / 2**20:.0f}"  # noqa: E731
            lines.append(f"| {task} | {length} | {g(d, 'latency_ms_p50')} | {g(r, 'latency_ms_p50')} ({g(r, 'latency_speedup', '{:.2f}x')}) "
                         f"| {mb(d, 'peak_rss_bytes')} | {mb(r, 'peak_rss_bytes')} ({g(r, 'peak_rss_vs_dense', '{:.3f}')}) "
                         f"| {mb(d, 'compiled_bytes')} | {mb(r, 'compiled_bytes')} ({g(r, 'compiled_vs_dense', '{:.3f}')}) |")
    curves = [(task, v, metric_curve(d)) for task in tasks for v, d in run_dirs(workdir, task).items()
              if v == "dense" and len([p for p in (d / "checkpoints").iterdir() if p.name.isdigit()]) > 1]
    if curves:
        lines += ["", "**The dense runs' task metric during training (test split, each kept checkpoint)**", "",
                  "| task | variant | " + " | ".join(f"step {s}" for s, _ in curves[0][2]) + " |",
                  "| --- | --- |" + " ---: |" * len(curves[0][2])]
        lines += [f"| {task} | {v} | " + " | ".join(f"{m:.2f}" for _, m in c) + " |" for task, v, c in curves]
    text = "\n".join(lines) + "\n"
    (out / "table4.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--stage", choices=["train", "bench", "table", "all"], default="all")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--workdir", default="runs/table4_small")
    p.add_argument("--out", default="experiments/results/small")
    p.add_argument("--repeats", type=int, default=7)
    a = p.parse_args(argv)
    tasks = [t for t in a.tasks.split(",") if t]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        print(f"--tasks: {', '.join(unknown)} not one of {', '.join(TASKS)}", file=sys.stderr)
        return 2
    workdir, out = Path(a.workdir), Path(a.out)
    if a.stage in ("train", "all") and (code := train(tasks, workdir)):
        return code
    if a.stage in ("bench", "all"):
        bench(tasks, workdir, out, a.repeats)
    if a.stage in ("table", "all"):
        print(table(tasks, workdir, out), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
