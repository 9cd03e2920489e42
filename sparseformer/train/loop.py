"""`train_and_evaluate(config, workdir)`: the one training loop for every task.

    mesh -> sharded state (or the latest checkpoint) -> compiled step -> loop -> eval -> metrics.json

The step is compiled once ahead of time (`jit(...).lower(...).compile()`), so its memory is
known and printed before the first step. Inside the loop the host only feeds batches and reads
the previous step's metrics after dispatching the next step, so the devices never wait for it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx
from flax.core import spmd as flax_spmd

from sparseformer.train import checkpoint as checkpoint_lib
from sparseformer.train import metrics_io
from sparseformer.train import optim
from sparseformer.train import sharding as sharding_lib
from sparseformer.train import step as step_lib
from sparseformer.train.state import StatePlan, TrainState, plan_train_state


# On a GPU, XLA's scatter-adds (the gradients of gathers: embeddings, gathered key blocks) and some
# reductions use atomics, so two runs of one step differ in the last bits and a resumed run drifts
# from one that never stopped. The step is compiled with XLA's deterministic ops there (scatters
# sorted, then summed in order); the fused attention kernel's backward has no atomics of its own.
DETERMINISTIC_GPU_OPTIONS = {"xla_gpu_deterministic_ops": True}


def compile_step(lowered: Any, backend: str | None = None) -> Any:
    """Compile the lowered train step; on a GPU with `DETERMINISTIC_GPU_OPTIONS`. If that fails (an
    XLA that no longer knows the option, or an op with no deterministic GPU implementation), the
    step compiles without it, saying why: the run goes on, no longer bit-reproducible on resume.
    An error that has nothing to do with the option fails the second compile too, and is raised."""
    if (backend or jax.default_backend()) != "gpu":
        return lowered.compile()
    try:
        return lowered.compile(compiler_options=DETERMINISTIC_GPU_OPTIONS)
    except Exception as e:  # noqa: BLE001 (XLA reports both as runtime errors)
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        print(f"warning: the train step does not compile with deterministic GPU ops ({reason}); a resumed "
              "run may differ in the last bits from one that never stopped", flush=True)
        return lowered.compile()


@dataclasses.dataclass(frozen=True)
class Components:
    """What the loop needs from the rest of the package (tests pass their own small ones).

    task: `.metric`, `.metrics`, `.kind`, `.pipeline(config, split, *, seed, process_index, process_count)`,
      `.decode(ids)` for generation metrics.
    kind: `.loss(model, batch, *, rng, train) -> (loss, {name: (sum, count)})`, `.logits(...)` for
      distillation, `.predict(model, batch)` for generation metrics.
    build_model: `(config, rngs) -> nnx.Module`.
    """

    task: Any
    kind: Any
    build_model: Callable[..., nnx.Module]


def default_components(config: ml_collections.ConfigDict) -> Components:
    """The registered task and model kind named by the config."""
    from sparseformer.data import get_task
    from sparseformer.models import MODEL_KINDS, build_model

    return Components(task=get_task(config.task), kind=MODEL_KINDS[config.model.kind], build_model=build_model)


def validate_train_config(config: ml_collections.ConfigDict) -> None:
    """The training keys; raises `ValueError` naming the key and the allowed values."""
    for key in ("num_train_steps", "batch_size", "log_every_steps", "checkpoint_every_steps", "max_checkpoints_to_keep"):
        value = config[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{key}: {value!r} must be a positive integer")
    if not isinstance(config.eval_every_steps, int) or config.eval_every_steps < 0:
        raise ValueError(f"eval_every_steps: {config.eval_every_steps!r} must be >= 0 (0 = only at the end)")
    if not isinstance(config.num_eval_batches, int) or config.num_eval_batches < -1 or config.num_eval_batches == 0:
        raise ValueError(f"num_eval_batches: {config.num_eval_batches!r} must be a positive integer or -1 (whole split)")
    optim.validate(config.optimizer)
    sharding_lib.rules_dict(config.logical_axis_rules)
    for key in ("data", "model"):
        v = config.mesh[key]
        if not isinstance(v, int) or (v < 1 and v != -1):
            raise ValueError(f"mesh.{key}: {v!r} must be a positive integer or -1")
    d = config.distill
    if d.teacher_workdir:
        if not (Path(d.teacher_workdir) / "config.json").exists():
            raise ValueError(f"distill.teacher_workdir: {d.teacher_workdir!r} has no config.json (not a run directory)")
        if not float(d.weight) > 0:
            raise ValueError(f"distill.weight: {d.weight!r} must be positive when distill.teacher_workdir is set")
        if not float(d.temperature) > 0:
            raise ValueError(f"distill.temperature: {d.temperature!r} must be positive")


def load_config(workdir: str | Path) -> ml_collections.ConfigDict:
    """The `config.json` of a run directory (JSON lists where the config had tuples). Model and
    attention keys added since the run was saved get the values it ran with (`config.upgrade_model`)."""
    from sparseformer.config import upgrade_model  # noqa: PLC0415

    config = ml_collections.ConfigDict(json.loads((Path(workdir) / "config.json").read_text()))
    if "model" in config:
        upgrade_model(config.model)
    return config


def config_to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
    return json.loads(config.to_json_best_effort())


def memory_bytes(compiled: Any) -> dict[str, int]:
    """XLA's memory analysis of a compiled program, per device.

    `peak_memory_bytes = temp + arguments + outputs - aliased` (donated inputs reuse their
    buffers for outputs, so the aliased bytes would otherwise count twice).
    """
    m = compiled.memory_analysis()
    if m is None:
        return {"peak_memory_bytes": -1}
    out = {
        "temp_bytes": int(m.temp_size_in_bytes),
        "argument_bytes": int(m.argument_size_in_bytes),
        "output_bytes": int(m.output_size_in_bytes),
        "alias_bytes": int(m.alias_size_in_bytes),
    }
    out["peak_memory_bytes"] = out["temp_bytes"] + out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"]
    return out


def _attention_line(config: ml_collections.ConfigDict) -> str:
    """What attention the model runs at its length, e.g. `attention at 1024 tokens: encoder
    self-attention: selection (pallas) + pool`, with a pointer to `sparseformer kernel-check` where
    the fused GPU kernel runs (it has not been measured on every GPU and JAX)."""
    from sparseformer.infer.speed import attention_kernel  # imported here: the trainer runs without it otherwise

    length = int(config.data.max_len)
    try:
        what = attention_kernel(config, length)
    except ValueError as e:  # the config was validated for training; say why rather than stop
        return f"attention at {length} tokens: not described ({e})"
    hint = " (the fused kernel: `sparseformer kernel-check` checks it on this device)" if "(pallas)" in what else ""
    return f"attention at {length} tokens: {what}{hint}"


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


class _Runtime:
    """Mesh, compiled steps and evaluation for one config (shared by train and eval)."""

    def __init__(self, config: ml_collections.ConfigDict, comps: Components, mesh: jax.sharding.Mesh):
        self.config, self.comps, self.mesh = config, comps, mesh
        self.rules = tuple(tuple(r) for r in config.logical_axis_rules)
        self.tx, self.schedule = optim.make_optimizer(config.optimizer, num_train_steps=int(config.num_train_steps))
        self.plan: StatePlan = plan_train_state(
            lambda: comps.build_model(config, rngs=nnx.Rngs(int(config.seed))), self.tx, mesh, self.rules
        )
        self.batch_sharding = sharding_lib.batch_sharding(mesh)
        self.replicated = sharding_lib.replicated(mesh)
        self._eval = None
        self._predict = None
        self._probe = None

    def context(self) -> Any:
        """Trace under the mesh and the logical-axis rules (for activation sharding constraints)."""
        import contextlib

        stack = contextlib.ExitStack()
        stack.enter_context(jax.set_mesh(self.mesh))
        stack.enter_context(flax_spmd.logical_axis_rules(self.rules))
        return stack

    def pipeline(self, split: str) -> Any:
        return self.comps.task.pipeline(
            self.config, split, seed=int(self.config.seed),
            process_index=jax.process_index(), process_count=jax.process_count(),
        )  # fmt: skip

    def shard(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        return sharding_lib.shard_batch(batch, self.mesh)

    def evaluate(self, state: TrainState, split: str) -> dict[str, float]:
        """Mean metrics over `num_eval_batches` batches of `split` (all of it for -1)."""
        if self._eval is None:
            fn = step_lib.make_eval_step(self.plan.graphdef, self.comps.kind)
            self._eval = jax.jit(fn, in_shardings=(self.plan.shardings, self.batch_sharding), out_shardings=self.replicated)
        limit = int(self.config.num_eval_batches)
        totals = None
        with self.context():
            for i, batch in enumerate(self.pipeline(split)):
                if 0 <= limit <= i:
                    break
                m = self._eval(state, self.shard(batch))
                totals = m if totals is None else jax.tree.map(lambda a, b: a + b, totals, m)
        if totals is None:
            raise ValueError(f"split {split!r} of task {self.config.task!r} yielded no batches")
        return step_lib.finalize(jax.device_get(totals))

    def generation_metrics(self, state: TrainState, split: str) -> dict[str, float]:
        """BLEU of decoded predictions against the targets (seq2seq tasks)."""
        from jax.experimental import multihost_utils

        from sparseformer.data.metrics import bleu

        task = self.comps.task
        if self._predict is None:
            fn = step_lib.make_predict_step(self.plan.graphdef, self.comps.kind)
            self._predict = jax.jit(fn, in_shardings=(self.plan.shardings, self.batch_sharding), out_shardings=self.replicated)
        limit = int(self.config.num_eval_batches)
        hyps, refs = [], []
        with self.context():
            for i, batch in enumerate(self.pipeline(split)):
                if 0 <= limit <= i:
                    break
                ids = np.asarray(jax.device_get(self._predict(state, self.shard(batch))))
                local = {k: batch[k] for k in ("targets", "example_mask")}
                full = multihost_utils.process_allgather(local, tiled=True) if jax.process_count() > 1 else local
                for row, target, real in zip(ids, full["targets"], full["example_mask"]):
                    if real:
                        hyps.append(task.decode(row))
                        refs.append(task.decode(target))
        score, signature = bleu(hyps, refs)
        return {"bleu": score, "bleu_signature": signature}  # type: ignore[dict-item]

    def probe(self, state: TrainState, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        """`step.make_probe_step` on one batch: agreement with dense attention (the same
        parameters) and per-layer, per-head fidelity and captured mass, as numpy."""
        if self._probe is None:
            from sparseformer.attention import presets
            from sparseformer.train.state import abstract_model

            dense_config = with_attention(self.config, presets.get("dense"))
            d_graphdef, d_params, d_extra = abstract_model(
                lambda: self.comps.build_model(dense_config, rngs=nnx.Rngs(int(self.config.seed))))
            d_params, d_extra = nnx.to_pure_dict(d_params), nnx.to_pure_dict(d_extra)
            fn = step_lib.make_probe_step(self.plan.graphdef, d_graphdef, self.comps.kind)

            def probe_fn(state: TrainState, batch: Any) -> dict[str, Any]:
                # dense attention has no parameters of its own: its model is the same tree, less those
                return fn(state.params, state.extra, _restrict(state.params, d_params), _restrict(state.extra, d_extra), batch)

            self._probe = jax.jit(probe_fn, in_shardings=(self.plan.shardings, self.batch_sharding),
                                  out_shardings=self.replicated)
        with self.context():
            return jax.tree.map(np.asarray, jax.device_get(self._probe(state, self.shard(batch))))

    def task_metrics(self, state: TrainState, split: str) -> dict[str, Any]:
        """Eval metrics plus the task metric under its own name."""
        out: dict[str, Any] = dict(self.evaluate(state, split))
        metric = self.comps.task.metric
        if metric == "bleu" and "bleu" not in out:
            out.update(self.generation_metrics(state, split))
        elif metric == "perplexity" and "perplexity" not in out:
            out["perplexity"] = math.exp(out.get("nll", out["loss"]))
        return out



def _restrict(tree: Any, ref: Any) -> Any:
    """The entries of the nested dict `tree` that `ref` also has."""
    if isinstance(ref, dict):
        return {k: _restrict(tree[k], v) for k, v in ref.items()}
    return tree


def is_dense(attention: ml_collections.ConfigDict) -> bool:
    """Whether a `model.attention` config computes plain dense attention."""
    return not attention.selection.enabled and not attention.compression.enabled


def with_attention(config: ml_collections.ConfigDict, attention: ml_collections.ConfigDict,
                   name: str | None = None) -> ml_collections.ConfigDict:
    """A copy of a run config with `model.attention` replaced (and `attention_name`, if given)."""
    import copy

    out = copy.deepcopy(config)
    with out.unlocked():
        out.model.attention = copy.deepcopy(attention)
        if name is not None:
            out.attention_name = name
    return out


def _restore_latest(rt: "_Runtime", workdir: Path):
    """`(step, state)` of the latest readable checkpoint of a run directory, placed as `rt`'s
    plan says, or None (used for evaluating a run and for loading a distillation teacher)."""
    ckpt = checkpoint_lib.Checkpointer(workdir / "checkpoints", max_to_keep=int(rt.config.max_checkpoints_to_keep))
    try:
        return ckpt.restore_latest(rt.plan.abstract.as_dict())
    finally:
        ckpt.close()

@dataclasses.dataclass(frozen=True)
class TrainedModel:
    """The parameters of a run's latest checkpoint, ready for `nnx.merge(graphdef, params, extra)`."""

    config: ml_collections.ConfigDict
    graphdef: nnx.GraphDef
    params: Any  # pure dict
    extra: Any  # pure dict (the model's non-parameter variables; often empty)
    step: int


def restore_trained(workdir: str | Path, *, devices: Sequence[jax.Device] | None = None) -> TrainedModel:
    """The latest readable checkpoint of a run directory, on one device (default the first) for
    inference; raises `FileNotFoundError` naming the directory when there is none."""
    workdir = Path(workdir)
    if not (workdir / "config.json").exists():
        raise FileNotFoundError(f"{workdir} has no config.json: not a run directory")
    config = load_config(workdir)
    mesh = sharding_lib.make_mesh(1, 1, list(devices or jax.devices()[:1]))
    rt = _Runtime(config, default_components(config), mesh)
    found = _restore_latest(rt, workdir)
    if found is None:
        raise FileNotFoundError(f"no readable checkpoint in {workdir / 'checkpoints'}")
    state = found[1]
    return TrainedModel(config, rt.plan.graphdef, state["params"], state["extra"], int(found[0]))


def _restore_teacher(config: ml_collections.ConfigDict, comps: Components, mesh: jax.sharding.Mesh) -> tuple[Any, Any, Any]:
    """`(graphdef, (params, extra), shardings)` of the teacher's latest checkpoint."""
    tdir = Path(config.distill.teacher_workdir)
    tconfig = load_config(tdir)
    if tconfig.task != config.task:
        raise ValueError(f"distill.teacher_workdir: the teacher was trained on {tconfig.task!r}, not {config.task!r}")
    rt = _Runtime(tconfig, comps, mesh)
    found = _restore_latest(rt, tdir)
    if found is None:
        raise ValueError(f"distill.teacher_workdir: no readable checkpoint in {tdir / 'checkpoints'}")
    state = found[1]
    sh = rt.plan.shardings
    print(f"distilling from {tdir} (step {found[0]}, attention {tconfig.get('attention_name', '?')})", flush=True)
    return rt.plan.graphdef, (state["params"], state["extra"]), (sh.params, sh.extra)


def _validate_all(config: ml_collections.ConfigDict) -> None:
    """The models engineer's whole-config check, then the training keys."""
    from sparseformer.config import validate_config

    validate_config(config)
    validate_train_config(config)


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    *,
    components: Components | None = None,
    devices: Sequence[jax.Device] | None = None,
) -> dict[str, Any]:
    """Train `config` in `workdir` (resuming from its latest checkpoint), evaluate, write metrics.json.

    Returns the final metrics (what metrics.json holds). Raises `FloatingPointError` on a
    non-finite loss, leaving the last good checkpoint in place. `components` replaces the
    registered task and model (tests); `devices` restricts the mesh (default: every device).
    """
    wall_start = time.time()
    workdir = Path(workdir)
    if components is None:
        _validate_all(config)
        components = default_components(config)
        # What the run learns from its data (file tasks: labels, tokenizer), fixed and validated
        # before anything is written; other tasks keep the config as it is.
        resolved = components.task.resolve(config, workdir)
        if resolved is not config:
            config = resolved
            _validate_all(config)
    else:
        validate_train_config(config)
    primary = jax.process_index() == 0
    if primary:
        workdir.mkdir(parents=True, exist_ok=True)
        metrics_io.write_json(workdir / "config.json", config_to_dict(config))

    mesh = sharding_lib.make_mesh(config.mesh.data, config.mesh.model, devices)
    grad_accum = int(config.optimizer.grad_accum_steps)
    sharding_lib.check_batch_size(int(config.batch_size), mesh, jax.process_count(), grad_accum)
    rt = _Runtime(config, components, mesh)
    plan = rt.plan
    num_steps = int(config.num_train_steps)
    if primary:
        print(f"mesh {dict(mesh.shape)} over {jax.device_count()} devices, {jax.process_count()} process(es); "
              f"{plan.num_params:,} parameters", flush=True)
        print(_attention_line(config), flush=True)

    teacher_graphdef, teacher, teacher_sh = None, None, None
    if config.distill.teacher_workdir:
        teacher_graphdef, teacher, teacher_sh = _restore_teacher(config, components, mesh)

    train_iter = rt.pipeline("train")
    # Agreement with dense attention (same parameters) is followed on one fixed validation batch.
    probe = {"batch": None}
    if "attention" in config.model and not is_dense(config.model.attention):
        probe["batch"] = next(iter(rt.pipeline("validation")))

    def agreement(state: TrainState) -> dict[str, float]:
        if probe["batch"] is None:
            return {}
        try:
            total, count = rt.probe(state, probe["batch"])["agreement"]
        except (RuntimeError, MemoryError) as e:  # dense attention may not fit where the sparse one does
            print(f"warning: agreement with dense attention not measured ({type(e).__name__}: "
                  f"{str(e).splitlines()[0][:200] if str(e) else ''}); no monitor_reference.json", flush=True)
            probe["batch"] = None
            return {}
        return {"agreement": float(total) / max(float(count), 1.0)}

    ckpt = checkpoint_lib.Checkpointer(workdir / "checkpoints", max_to_keep=int(config.max_checkpoints_to_keep))
    writer = None
    try:
        found = ckpt.restore_latest(plan.abstract.as_dict())
        meta: dict[str, Any] = {}
        if found is not None:
            start, state_dict, data_state, meta = found
            state = TrainState(**state_dict)
            train_iter.set_state(data_state)
            if primary:
                for name in ("log.jsonl", "eval.jsonl"):
                    metrics_io.truncate_log(workdir / name, start)
                print(f"resumed from {ckpt.directory / str(start)}", flush=True)
        else:
            start, state = 0, plan.init()
        last_saved = start if found is not None else None

        rng = jax.make_array_from_process_local_data(
            rt.replicated, np.asarray(jax.random.key_data(jax.random.key(int(config.seed))))
        )
        train_step = step_lib.make_train_step(
            plan.graphdef, components.kind, rt.tx, rt.schedule, grad_accum_steps=grad_accum,
            teacher_graphdef=teacher_graphdef, distill_weight=float(config.distill.weight),
            distill_temperature=float(config.distill.temperature),
        )  # fmt: skip

        def step_fn(state: TrainState, batch: Any, rng: jax.Array, teacher: Any) -> Any:
            return train_step(state, batch, jax.random.wrap_key_data(rng), teacher)

        jitted = jax.jit(
            step_fn,
            in_shardings=(plan.shardings, rt.batch_sharding, rt.replicated, teacher_sh),
            out_shardings=(plan.shardings, rt.replicated),
            donate_argnums=0,
        )
        writer = metrics_io.MetricsWriter(workdir, active=primary, total_steps=num_steps, initial_step=start)
        final_loss = meta.get("loss")
        steps_per_second = meta.get("steps_per_second")
        memory = meta.get("memory", {})

        if start < num_steps:
            batch = rt.shard(next(train_iter))
            with rt.context():
                compiled = compile_step(jitted.lower(state, batch, rng, teacher))
            memory = memory_bytes(compiled)
            if primary:
                detail = ", ".join(f"{k[:-6]} {_mib(v)}" for k, v in memory.items() if k != "peak_memory_bytes")
                print(f"compiled train step: peak memory {_mib(memory['peak_memory_bytes'])} per device ({detail})", flush=True)

            log_every = int(config.log_every_steps)
            ckpt_every = int(config.checkpoint_every_steps)
            eval_every = int(config.eval_every_steps)
            timer = {"t0": None, "n0": start}

            def handle(done: int, metrics: Any) -> float:
                """Read the metrics of the update that made step `done`; stop on a non-finite loss."""
                values = step_lib.finalize(jax.device_get(metrics))
                loss = values["loss"]
                if not (math.isfinite(loss) and math.isfinite(values["grad_norm"])):
                    kept = f"step {last_saved} in {ckpt.directory}" if last_saved else "none"
                    raise FloatingPointError(
                        f"non-finite loss at step {done}: loss={loss}, grad_norm={values['grad_norm']}; "
                        f"training stopped, last good checkpoint: {kept}"
                    )
                now = time.perf_counter()
                if timer["t0"] is None:  # the first update includes warm-up: time from its end
                    timer["t0"], timer["n0"] = now, done
                sps = (done - timer["n0"]) / (now - timer["t0"]) if done > timer["n0"] else None
                if done % log_every == 0 or done == num_steps:
                    writer.write(done, {**values, **({"steps_per_second": sps} if sps else {})})
                    writer.progress(done, loss, sps)
                timer["sps"] = sps
                return loss

            pending: tuple[int, Any] | None = None
            for i in range(start, num_steps):
                if i > start:
                    batch = rt.shard(next(train_iter))
                state, metrics = compiled(state, batch, rng, teacher)
                if pending is not None:
                    final_loss = handle(*pending)
                pending = (i + 1, metrics)
                done = i + 1
                if done % ckpt_every == 0 or done == num_steps:
                    final_loss = handle(*pending)  # never save a state made by a non-finite update
                    pending = None
                    steps_per_second = timer.get("sps") or steps_per_second
                    ckpt.save(done, state.as_dict(), data=train_iter.get_state(),
                              meta={"step": done, "loss": final_loss, "steps_per_second": steps_per_second,
                                    "memory": memory, "seed": int(config.seed)},
                              config=config_to_dict(config))  # fmt: skip
                    last_saved = done
                if eval_every and done % eval_every == 0 and done != num_steps:
                    if pending is not None:
                        final_loss = handle(*pending)
                        pending = None
                    writer.write(done, {**rt.evaluate(state, "validation"), **agreement(state)}, prefix="validation_",
                                 log_name="eval.jsonl")
            if pending is not None:
                final_loss = handle(*pending)
            steps_per_second = timer.get("sps") or steps_per_second
        ckpt.wait()

        eval_split = "test"
        results = {**rt.task_metrics(state, eval_split), **agreement(state)}
        metric = components.task.metric
        reference = None
        if probe["batch"] is not None:  # what `sparseformer monitor` compares new inputs with
            from sparseformer.train import probe as probe_lib

            reference = {**probe_lib.training_reference(rt, state), "step": num_steps}
        final = {
            "task": config.task,
            "attention": config.get("attention_name", ""),
            "seed": int(config.seed),
            "scale": config.get("scale", ""),
            "max_len": int(config.data.max_len) if "max_len" in config.data else None,
            metric: results.get(metric),
            "fidelity": results.get("fidelity"),
            "captured": results.get("captured"),
            "agreement": results.get("agreement"),
            "steps_per_second": steps_per_second,
            "peak_memory_bytes": memory.get("peak_memory_bytes"),
            "num_params": plan.num_params,
            "final_loss": final_loss,
            "num_train_steps": num_steps,
            "eval_loss": results.get("loss"),
            "eval_split": eval_split,
            "peak_rss_bytes": metrics_io.peak_rss_bytes(),
            "wall_seconds": time.time() - wall_start,
            "memory": memory,
            "mesh": dict(mesh.shape),
            "process_count": jax.process_count(),
            **{f"eval_{k}": v for k, v in results.items() if k != metric},
        }
        if primary:
            writer.write(num_steps, {k: v for k, v in results.items() if isinstance(v, float)}, prefix=f"{eval_split}_",
                         log_name="eval.jsonl")
            if reference is not None:
                metrics_io.write_json(workdir / probe_lib.REFERENCE, reference)
            metrics_io.write_json(workdir / "metrics.json", final)
            print(f"done: {metric} {final[metric]}, final loss {final_loss}, {steps_per_second or 0:.2f} steps/s; "
                  f"{workdir / 'metrics.json'}", flush=True)
        return final
    finally:
        ckpt.close()
        if writer is not None:
            writer.close()


def restore_run(
    workdir: str | Path,
    *,
    config: ml_collections.ConfigDict | None = None,
    components: Components | None = None,
    devices: Sequence[jax.Device] | None = None,
) -> tuple["_Runtime", TrainState, int]:
    """`(runtime, state, step)`: a run directory's latest checkpoint, restored into the runtime of
    its own config or of `config` (the same parameters under another attention, say). The runtime's
    `evaluate`, `task_metrics`, `probe` and `pipeline` then serve eval, adopt and monitor."""
    workdir = Path(workdir)
    if not (workdir / "config.json").exists():
        raise FileNotFoundError(f"{workdir} has no config.json: not a run directory")
    config = load_config(workdir) if config is None else config
    components = components or default_components(config)
    mesh = sharding_lib.make_mesh(config.mesh.data, config.mesh.model, devices)
    rt = _Runtime(config, components, mesh)
    found = _restore_latest(rt, workdir)
    if found is None:
        raise FileNotFoundError(f"no readable checkpoint in {workdir / 'checkpoints'}")
    return rt, TrainState(**found[1]), int(found[0])


def evaluate_workdir(
    workdir: str | Path,
    split: str = "test",
    *,
    components: Components | None = None,
    devices: Sequence[jax.Device] | None = None,
) -> dict[str, Any]:
    """Evaluate the latest checkpoint of a run directory on `split`; writes `eval_<split>.json`."""
    workdir = Path(workdir)
    rt, state, step = restore_run(workdir, components=components, devices=devices)
    results = rt.task_metrics(state, split)
    out = {"step": step, "split": split, "task": rt.config.task, **results}
    if jax.process_index() == 0:
        metrics_io.write_json(workdir / f"eval_{split}.json", out)
    return out
