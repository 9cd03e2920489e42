"""The stages of `sparseformer adopt`: from a trained dense run to sparse attention, measured.

    stage 0  the dense model as trained: task metric, latency, throughput, memory at the data's length
    stage 1  the same parameters with the attention swapped, no training: metric, agreement with
             dense, fidelity and captured mass per layer and head, speed and memory
    stage 2  a short fine-tune distilled from the dense model (the one trainer, `config.distill`):
             metric, agreement, fidelity per layer and head
    stage 3  dense and the adopted model side by side, timed in interleaved rounds: at the data's
             length (trained parameters) and at longer lengths (random parameters: speed does not
             depend on their values); the cost of a million predictions given a price per hour
    verdict  go / no-go against the thresholds, with the reason in one sentence

Each stage writes `DIR/stage<N>.json` atomically when it finishes, with the inputs it depends on;
a re-run skips a stage whose file is there with the same inputs and redoes it (and the stages
after it that depend on it) when they changed. Stage 2 trains in `DIR/stage2/`, a normal run
directory (resumable by the trainer, monitored by `sparseformer monitor`).
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ml_collections

from sparseformer.train.metrics_io import write_json

STAGES = ("stage0", "stage1", "stage2", "stage3")
PROBE_ROWS = 16  # fidelity rows per layer when the chosen attention samples none of its own


@dataclasses.dataclass(frozen=True)
class AdoptOptions:
    """What `sparseformer adopt` was asked (see `sparseformer adopt --help`)."""

    teacher: str  # run directory of the trained dense model
    out: str  # where the stages, the report and the plots go
    attention: str = "rsa"  # preset to adopt
    overrides: tuple[str, ...] = ()  # `model.attention.KEY=VALUE` changes to the preset
    steps: int = 100  # fine-tuning steps of stage 2
    max_metric_drop: float = 1.0  # points (accuracy, BLEU), or percent (perplexity)
    min_speedup: float = 2.0  # at the data's length
    speedup: str = "latency"  # what the speed-up threshold reads: latency (batch 1) or throughput
    lengths: tuple[int, ...] = ()  # stage 3 (default: 2x and 4x the data's length)
    price_per_hour: float | None = None  # of the machine, for the cost of a million predictions
    batch_sizes: tuple[int, ...] = (1, 8)  # throughput is the best of these
    repeats: int = 10  # timed calls per measurement
    sample: int = 256  # test examples probed for fidelity, captured mass and agreement
    learning_rate: float | None = None  # stage 2 (default: a quarter of the teacher's peak rate, constant)
    distill_weight: float = 1.0
    distill_temperature: float = 2.0
    rss: bool = True  # fresh-process peak memory (a JAX process per measurement)


# ------------------------------------------------------------------------------------- configs
def parse_override(text: str) -> tuple[str, Any]:
    """`model.attention.selection.top_k=8` -> (`model.attention.selection.top_k`, 8)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.startswith("model.attention."):
        raise ValueError(f"--set: {text!r} must be model.attention.KEY=VALUE")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    return key.strip(), value


def student_config(teacher: ml_collections.ConfigDict, options: AdoptOptions) -> ml_collections.ConfigDict:
    """The teacher's run config with `options.attention` (sized like the teacher's: block size,
    rank and kernel come from it) and the overrides; validated."""
    from sparseformer.attention import presets
    from sparseformer.config import apply_overrides, validate_config
    from sparseformer.train.loop import is_dense, with_attention

    if not is_dense(teacher.model.attention):
        raise ValueError(f"--teacher: the run uses attention {teacher.get('attention_name', '?')!r}; adopt starts "
                         "from a model trained with dense attention")
    att = presets.get(options.attention)
    t = teacher.model.attention
    att.selection.block_size, att.selection.kernel = int(t.selection.block_size), t.selection.kernel
    att.compression.rank = int(t.compression.rank)
    if att.correction.aux_rows == 0:  # measure fidelity even where the preset samples no rows (it trains nothing)
        att.correction.aux_rows = PROBE_ROWS
    config = with_attention(teacher, att, name=options.attention)
    apply_overrides(config, dict(parse_override(o) for o in options.overrides))
    validate_config(config)
    return config


def metric_drop(metric: str, dense: float, sparse: float) -> float:
    """How much worse `sparse` is: accuracy in percentage points, BLEU in points, perplexity in
    percent of dense's (positive: worse)."""
    if metric == "accuracy":
        return 100.0 * (dense - sparse)
    if metric == "perplexity":
        return 100.0 * (sparse / dense - 1.0)
    return dense - sparse


def digest(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------- measuring
def evaluate(rt: Any, state: Any) -> dict[str, Any]:
    """The task metric on the test split (the run's own evaluation)."""
    results = rt.task_metrics(state, "test")
    metric = rt.comps.task.metric
    return {"metric": metric, "value": float(results[metric])}


def probe(rt: Any, state: Any, sample: int) -> dict[str, Any]:
    from sparseformer.train.probe import probe_stats

    return probe_stats(rt, state, rt.pipeline("test"), max_examples=sample)


# what the report keeps of a speed measurement (`infer.speed.measure_model`'s keys)
SPEED_KEYS = ("length", "kernel", "latency_ms_p50", "latency_ms_p95", "throughput_per_s", "best_batch_size",
              "throughput_by_batch", "compiled_bytes", "peak_rss_bytes", "peak_device_bytes")


def speed(config: ml_collections.ConfigDict, length: int, options: AdoptOptions, params: Any = None) -> dict[str, Any]:
    """`infer.speed.measure_model` (latency, throughput, compiled and fresh-process memory)."""
    from sparseformer.infer.speed import measure_model

    r = measure_model(config, length=length, batch_sizes=options.batch_sizes, params=params, repeats=options.repeats,
                      rss=options.rss, decode=False)
    return {k: r.get(k) for k in (*SPEED_KEYS, "num_params", "backend")}


def ratios(dense: dict[str, Any], sparse: dict[str, Any]) -> dict[str, float | None]:
    """Speed-ups (dense / sparse latency, sparse / dense throughput) and memory fractions."""
    def div(a: Any, b: Any) -> float | None:
        return float(a) / float(b) if a and b else None

    return {
        "latency_speedup": div(dense["latency_ms_p50"], sparse["latency_ms_p50"]),
        "throughput_speedup": div(sparse["throughput_per_s"], dense["throughput_per_s"]),
        "compiled_memory_fraction": div(sparse["compiled_bytes"], dense["compiled_bytes"]),
        "peak_memory_fraction": div(sparse.get("peak_rss_bytes") or sparse.get("peak_device_bytes"),
                                    dense.get("peak_rss_bytes") or dense.get("peak_device_bytes")),
    }


def cost_per_million(price_per_hour: float | None, throughput_per_s: float | None) -> float | None:
    """What a million predictions cost at `price_per_hour` and this throughput (one machine, busy)."""
    if not price_per_hour or not throughput_per_s:
        return None
    return price_per_hour * (1e6 / throughput_per_s) / 3600.0


# ------------------------------------------------------------------------------------- the run
class Adoption:
    """Runs the stages in `options.out`, skipping those already done with the same inputs."""

    def __init__(self, options: AdoptOptions, log: Callable[[str], None] = print):
        from sparseformer.train.loop import load_config

        self.o, self.log = options, log
        self.out = Path(options.out)
        self.teacher_dir = Path(options.teacher).absolute()
        if not (self.teacher_dir / "config.json").exists():
            raise FileNotFoundError(f"--teacher: {options.teacher} has no config.json (not a run directory)")
        self.teacher = load_config(self.teacher_dir)
        self.student = student_config(self.teacher, options)
        self.length = int(self.teacher.data.max_len)
        self.teacher_step = self._teacher_step()
        self.results: dict[str, dict[str, Any]] = {}

    def _teacher_step(self) -> int:
        steps = [int(p.name) for p in (self.teacher_dir / "checkpoints").glob("*") if p.name.isdigit()]
        if not steps:
            raise FileNotFoundError(f"--teacher: no checkpoint in {self.teacher_dir / 'checkpoints'}")
        return max(steps)

    # --- inputs of each stage: a stage is redone when they change ------------------------------
    def inputs(self, stage: str) -> dict[str, Any]:
        o = self.o
        base = {"teacher": str(self.teacher_dir), "teacher_step": self.teacher_step, "length": self.length,
                "batch_sizes": list(o.batch_sizes), "repeats": o.repeats, "rss": o.rss}
        attention = {"attention": o.attention, "attention_config": digest(self.student.model.attention.to_dict())}
        if stage == "stage0":
            return base
        if stage == "stage1":
            return {**base, **attention, "sample": o.sample}
        if stage == "stage2":
            return {**base, **attention, "sample": o.sample, "steps": o.steps, "learning_rate": self.finetune_lr(),
                    "distill_weight": o.distill_weight, "distill_temperature": o.distill_temperature}
        return {**base, **attention, "lengths": list(self.lengths())}

    def lengths(self) -> tuple[int, ...]:
        return tuple(self.o.lengths) or (2 * self.length, 4 * self.length)

    def finetune_lr(self) -> float:
        return float(self.o.learning_rate or 0.25 * float(self.teacher.optimizer.learning_rate))

    def run(self, stop_after: str | None = None) -> dict[str, Any]:
        """Every stage (or up to `stop_after`), then the verdict; returns the report dict."""
        self.out.mkdir(parents=True, exist_ok=True)
        for stage in STAGES:
            self.results[stage] = self._stage(stage)
            if stage == stop_after:
                break
        return self.results

    def _stage(self, stage: str) -> dict[str, Any]:
        path = self.out / f"{stage}.json"
        inputs = self.inputs(stage)
        if path.exists():
            done = json.loads(path.read_text())
            if done.get("inputs") == inputs:
                self.log(f"{stage}: done before ({path}), skipped")
                return done
            self.log(f"{stage}: its inputs changed ({', '.join(k for k in inputs if done.get('inputs', {}).get(k) != inputs[k])}); redoing it")
        self.log(f"{stage}: {STAGE_TITLES[stage]}")
        t0 = time.time()
        results = getattr(self, f"_{stage}")()
        record = {"stage": stage, "title": STAGE_TITLES[stage], "inputs": inputs, **results,
                  "seconds": time.time() - t0}
        write_json(path, record)
        return record

    # --- the stages ----------------------------------------------------------------------------
    def _stage0(self) -> dict[str, Any]:
        from sparseformer.train.loop import restore_run

        rt, state, _ = restore_run(self.teacher_dir)
        metric = evaluate(rt, state)
        return {"attention": "dense", **metric, "speed": speed(self.teacher, self.length, self.o, params=state.params)}

    def _stage1(self) -> dict[str, Any]:
        from sparseformer.train.loop import restore_run

        rt, state, _ = restore_run(self.teacher_dir, config=self.student)
        metric = evaluate(rt, state)
        sp = speed(self.student, self.length, self.o, params=state.params)
        dense = self.results["stage0"]
        return {"attention": self.o.attention, **metric,
                "metric_drop": metric_drop(metric["metric"], dense["value"], metric["value"]),
                **probe(rt, state, self.o.sample), "speed": sp, **ratios(dense["speed"], sp)}

    def _stage2(self) -> dict[str, Any]:
        from sparseformer.train.loop import restore_run, train_and_evaluate

        run_dir = self.out / "stage2"
        config = self._finetune_config()
        marker = run_dir / "adopt_inputs.json"
        if run_dir.exists() and (not marker.exists() or json.loads(marker.read_text()) != self.inputs("stage2")):
            shutil.rmtree(run_dir)  # made for other inputs: start the fine-tune again
        if not run_dir.exists():
            # the fine-tune continues the teacher's run: its latest checkpoint (parameters, optimizer,
            # data position) under the new attention, for `steps` more steps
            src = self.teacher_dir / "checkpoints" / str(self.teacher_step)
            shutil.copytree(src, run_dir / "checkpoints" / str(self.teacher_step))
            write_json(marker, self.inputs("stage2"))
        t0 = time.time()
        final = train_and_evaluate(config, run_dir)
        train_seconds = time.time() - t0
        rt, state, _ = restore_run(run_dir)
        metric = {"metric": rt.comps.task.metric, "value": float(final[rt.comps.task.metric])}
        dense = self.results["stage0"]
        return {"attention": self.o.attention, **metric,
                "metric_drop": metric_drop(metric["metric"], dense["value"], metric["value"]),
                **probe(rt, state, self.o.sample), "steps": self.o.steps, "train_seconds": train_seconds,
                "run_dir": str(run_dir.absolute()),
                "note": "speed and memory as stage 1: the same model and attention, new parameters"}

    def _finetune_config(self) -> ml_collections.ConfigDict:
        c = copy.deepcopy(self.student)
        steps = int(self.o.steps)
        c.num_train_steps = self.teacher_step + steps
        c.log_every_steps = max(1, steps // 10)
        c.eval_every_steps = 0
        c.checkpoint_every_steps = max(1, steps // 4)
        c.optimizer.schedule = "constant"
        c.optimizer.learning_rate = self.finetune_lr()
        c.distill.teacher_workdir = str(self.teacher_dir)
        c.distill.weight = float(self.o.distill_weight)
        c.distill.temperature = float(self.o.distill_temperature)
        with c.unlocked():
            c.attention_name = f"{self.o.attention} (distilled)"
        return c

    def _stage3(self) -> dict[str, Any]:
        """Dense and the adopted run side by side (`sparseformer bench --model`'s measurement: all
        programs of a length compiled, then timed in interleaved rounds): at the data's length with
        their trained parameters, at `lengths` with random ones."""
        from sparseformer.infer.bench import run_benchmark

        adopted = self.results["stage2"]["run_dir"]
        bench = run_benchmark([str(self.teacher_dir), adopted], lengths=self.lengths(),
                              batch_sizes=self.o.batch_sizes, repeats=self.o.repeats, rss=self.o.rss,
                              progress=lambda m: self.log(f"stage3: {m.strip()}"))
        by = {(r["run"], r["length"]): {k: r.get(k) for k in (*SPEED_KEYS, "skipped", "error")} for r in bench["results"]}
        rows = []
        for length in [self.length, *self.lengths()]:
            d, s = by.get((str(self.teacher_dir), length)), by.get((adopted, length))
            if d is None or s is None or d["latency_ms_p50"] is None or s["latency_ms_p50"] is None:
                why = "; ".join(x for x in ((d or {}).get("skipped") or (d or {}).get("error"),
                                            (s or {}).get("skipped") or (s or {}).get("error")) if x)
                rows.append({"length": length, "error": why or "not measured"})
                continue
            rows.append({"length": length, "trained_params": length == self.length, "dense": d, "sparse": s,
                         **ratios(d, s)})
        return {"lengths": rows, "machine": bench.get("machine")}

STAGE_TITLES = {
    "stage0": "the dense model as trained",
    "stage1": "attention swapped, no training",
    "stage2": "fine-tuned with distillation from the dense model",
    "stage3": "dense and adopted side by side, at the data's length and longer",
}


# ------------------------------------------------------------------------------------- verdict
def verdict(stage0: dict[str, Any], stage1: dict[str, Any], stage2: dict[str, Any] | None,
            stage3: dict[str, Any] | None = None, *, max_metric_drop: float, min_speedup: float,
            speedup: str = "latency") -> dict[str, Any]:
    """Go only when the adopted model (stage 2, else stage 1) loses at most `max_metric_drop` and
    is at least `min_speedup` times faster at the data's length (stage 3's side-by-side measurement;
    stage 1's, timed apart from stage 0's, without it); the reason in one sentence."""
    final = stage2 if stage2 is not None else stage1
    which = "after fine-tuning" if stage2 is not None else "without fine-tuning"
    drop = float(final["metric_drop"])
    key = f"{speedup}_speedup"
    length = stage0["speed"]["length"]
    side = [r for r in (stage3 or {}).get("lengths", []) if r["length"] == length and "error" not in r]
    sp = side[0].get(key) if side else stage1.get(key)
    unit = "%" if final["metric"] == "perplexity" else " points"
    what = "batch-1 latency" if speedup == "latency" else "throughput at the best batch size"
    drop_ok = drop <= max_metric_drop
    speed_ok = sp is not None and sp >= min_speedup
    fmt_sp = "unmeasured" if sp is None else f"{sp:.2f}x"
    head = f"{final['metric']} {which} {final['value']:.4g} vs dense {stage0['value']:.4g}"
    if drop_ok and speed_ok:
        reason = (f"go: {head} (a drop of {drop:.2f}{unit}, within {max_metric_drop:g}) and {fmt_sp} faster "
                  f"({what}, at least {min_speedup:g}x) at the data's length of {length} tokens.")
    else:
        parts = []
        if not drop_ok:
            parts.append(f"{final['metric']} drops by {drop:.2f}{unit} {which} ({head}), more than {max_metric_drop:g}")
        if not speed_ok:
            parts.append(f"it is only {fmt_sp} faster ({what}) at the data's length of {length} tokens, "
                         f"less than {min_speedup:g}x")
        reason = "no-go: " + " and ".join(parts) + "."
    return {"decision": "go" if drop_ok and speed_ok else "no-go", "reason": reason, "metric_drop": drop,
            "speedup": sp, "speedup_kind": speedup, "speedup_from": "stage3" if side else "stage1", "length": length,
            "max_metric_drop": max_metric_drop, "min_speedup": min_speedup,
            "from_stage": "stage2" if stage2 is not None else "stage1"}


def costs(results: dict[str, dict[str, Any]], price_per_hour: float | None) -> list[dict[str, Any]]:
    """The cost of a million predictions before (dense) and after, per length of stage 3."""
    return [{"length": r["length"], "dense": cost_per_million(price_per_hour, r["dense"]["throughput_per_s"]),
             "sparse": cost_per_million(price_per_hour, r["sparse"]["throughput_per_s"])}
            for r in results.get("stage3", {}).get("lengths", []) if "dense" in r]


def check_options(o: AdoptOptions) -> None:
    """One-line `ValueError`s for impossible options, before anything runs."""
    if o.steps < 1:
        raise ValueError(f"--steps: {o.steps} must be >= 1")
    if o.min_speedup < 0:
        raise ValueError(f"--min-speedup: {o.min_speedup} must be >= 0")
    if o.speedup not in ("latency", "throughput"):
        raise ValueError(f"--speedup: {o.speedup!r} is not one of latency, throughput")
    if any(n < 1 for n in o.lengths):
        raise ValueError(f"--lengths: {list(o.lengths)} must be positive")
    if o.price_per_hour is not None and o.price_per_hour <= 0:
        raise ValueError(f"--price-per-hour: {o.price_per_hour} must be positive")
    if not o.batch_sizes or any(b < 1 for b in o.batch_sizes):
        raise ValueError(f"--batch-sizes: {list(o.batch_sizes)} must be positive")
    if o.sample < 1 or o.repeats < 1:
        raise ValueError("--sample and --repeats must be >= 1")
    if not math.isfinite(o.max_metric_drop):
        raise ValueError(f"--max-metric-drop: {o.max_metric_drop} must be finite")


__all__ = ["AdoptOptions", "Adoption", "STAGES", "verdict", "costs", "metric_drop", "student_config", "check_options"]

