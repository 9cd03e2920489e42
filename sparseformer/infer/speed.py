"""Speed and memory of a whole model at inference: `measure_model(config, length=...)`.

    from sparseformer.infer.speed import measure_model
    r = measure_model(config, length=4096, batch_sizes=(1, 4, 16))
    r["latency_ms_p50"], r["throughput_per_s"], r["compiled_bytes"], r["peak_rss_bytes"], r["kernel"]

The model is the one `config` describes (a run's `config.json` or a task config), sized to `length`
input tokens: its positions are made for `length` and its attention is validated there. Parameters
are random unless given (speed and memory do not depend on their values). What is timed, per kind:

| kind | latency program | decode program |
| --- | --- | --- |
| classifier, dual_encoder | the forward pass to class probabilities | none |
| seq2seq | the prefill: encoder pass + cross-attention keys/values | one cached greedy step (last target position) |
| lm | the prefill: the prompt's causal pass + the KV cache | one cached greedy step (position `length - 1`) |

A program is compiled once per batch size, called `warmup` times, then timed over `repeats` calls
(each blocked until its outputs are ready). Memory is XLA's compiled memory analysis of the batch-1
latency program, and the peak memory of a fresh process running it once (`bench.measure.peak_memory_of`:
resident-memory growth on CPU, device peak on GPU). This module is also the probe's entry point:
`python -m sparseformer.infer.speed --config=CONFIG.json --length=N` prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from sparseformer.bench import measure
from sparseformer.infer import model as model_lib

PROGRAMS = ("latency", "decode")


def attention_kernel(config: ml_collections.ConfigDict, length: int) -> str:
    """Which attention computation runs at `length`, per attention use of the model, e.g.
    `encoder self-attention: selection (scan) + pool`; uses that agree are listed once."""
    from sparseformer.attention.config import block_multiple, budget_exceeds_keys, selection_kernel
    from sparseformer.config import attention_uses

    sized = model_lib.sized_config(config, length)
    parts: dict[str, list[str]] = {}
    for what, att, kw in attention_uses(sized.model):
        S = kw.get("kv_len", kw["seq_len"])
        mult = block_multiple(att, causal=kw["causal"])
        S_pad = -(-S // mult) * mult
        bits = []
        if budget_exceeds_keys(att, causal=kw["causal"], kv_len=S_pad):  # attend runs dense attention
            bits.append(f"exact (the budget exceeds the {-(-S_pad // att.selection.block_size)} key blocks)")
        else:
            if att.selection.enabled:
                head_dim = int(sized.model.emb_dim) // int(sized.model.num_heads)
                kernel = selection_kernel(att, S_pad, head_dim=head_dim, dtype=sized.model.get("dtype"))
                bits.append(f"selection ({kernel})")
            if att.compression.enabled:
                bits.append(att.compression.kind)
        name = " + ".join(bits) or "dense"
        parts.setdefault(name, []).append(what)
    if "cross_attention" in sized.model and sized.model.cross_attention == "dense":
        parts.setdefault("dense", []).append("cross-attention")
    return "; ".join(f"{', '.join(whats)}: {name}" for name, whats in parts.items())


def _params_for(config: ml_collections.ConfigDict, params: Any, seed: int) -> model_lib.Model:
    m = model_lib.random_model(config, seed=seed)
    if params is None:
        return m
    want = jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), m.params)
    got = jax.tree.map(lambda x: (tuple(np.shape(x)), str(x.dtype)), params)
    if jax.tree.structure(want) != jax.tree.structure(got) or want != got:
        raise ValueError(
            f"params do not fit the model sized to length {config.model.max_len} (positions are made "
            "for the length): pass params=None to measure another length with random parameters"
        )
    return model_lib.Model(config, m.graphdef, params, m.extra, None)


def _compile(fn: Any, *args: Any) -> Any:
    return jax.jit(fn).lower(*args).compile()


def _time(compiled: Any, args: tuple, *, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return times


def prepare(m: model_lib.Model, program: str, batch: int, length: int) -> tuple[Any, tuple]:
    """`(compiled, args)` of a model's `latency` or `decode` program at a batch size (inputs random)."""
    progs = model_lib.kind_programs(m.config.model.kind)
    arrays = model_lib.example_arrays(m.config, batch, length)
    if program == "latency":
        fn = model_lib.pure(m, progs.latency)
        args = (m.params, m.extra, *arrays)
        return _compile(fn, *args), args
    if program == "decode":
        if progs.decode is None:
            raise ValueError(f"model kind {m.config.model.kind!r} has no decoding step")
        state = jax.jit(model_lib.pure(m, progs.decode_state))(m.params, m.extra, *arrays)
        fn = model_lib.pure(m, progs.decode)
        args = (m.params, m.extra, state)
        return _compile(fn, *args), args
    raise ValueError(f"program: {program!r} is not one of {', '.join(PROGRAMS)}")


def _pct(times: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(times) * 1e3, q))


def measure_model(
    config: ml_collections.ConfigDict,
    *,
    length: int,
    batch_sizes: Sequence[int] = (1,),
    params: Any = None,
    target_length: int | None = None,
    repeats: int = 20,
    warmup: int = 2,
    rss: bool = True,
    decode: bool = True,
    seed: int = 0,
    timeout_s: float = 900.0,
) -> dict[str, Any]:
    """Latency, throughput and memory of the model `config` describes, at `length` input tokens.

    Args:
      config: a run config (`config.json` of a run, or a task config); its `model` block is used.
      length: input tokens (the classifier's sequence, the source sentence, the LM's prompt).
      batch_sizes: the batch sizes whose throughput is measured (batch 1 is always timed for latency).
      params: the trained parameters (a pure dict, as the train state holds them); None: random.
        Only for the length they were trained at, since positions are made for `length`.
      target_length: a seq2seq model's decoder length (default: the config's `max_target_len`).
      repeats, warmup: timed and untimed calls per program and batch size (throughput uses
        `max(3, repeats // 4)` timed calls per batch size above 1).
      rss: also run the batch-1 latency program once in a fresh process for its peak memory.
      decode: also time one cached decoding step (seq2seq and lm).

    Returns a dict (JSON-serialisable) with the keys:
      kind, length, target_length (seq2seq, else None), attention (the config's attention_name),
      kernel (`attention_kernel`: which attention computation ran), num_params, backend,
      latency_ms_p50, latency_ms_p95: the batch-1 latency program, milliseconds;
      throughput_per_s: examples per second of the latency program at the best batch size;
      best_batch_size; throughput_by_batch: {batch size (str): examples per second};
      compiled_bytes (temp + output), temp_bytes, output_bytes, argument_bytes: XLA's memory
        analysis of the batch-1 latency program (arguments include the parameters);
      peak_rss_bytes (CPU), peak_device_bytes (GPU), peak_how: the fresh-process peak of one batch-1
        call (None when `rss` is False or the probe failed; then peak_error says why);
      decode_ms_per_token_p50, decode_ms_per_token_p95, decode_compiled_bytes: one cached decoding
        step at batch 1 (None for classifiers or when `decode` is False);
      repeats, batch_sizes.
    """
    sized = model_lib.sized_config(config, length, target_length=target_length)
    kind = sized.model.kind
    m = _params_for(sized, params, seed)
    sizes = sorted({1, *(int(b) for b in batch_sizes)})
    out: dict[str, Any] = {
        "kind": kind, "length": int(length),
        "target_length": int(sized.model.max_target_len) if "max_target_len" in sized.model else None,
        "attention": sized.get("attention_name", ""), "kernel": attention_kernel(sized, length),
        "num_params": int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(m.params))),
        "backend": jax.default_backend(), "repeats": int(repeats), "batch_sizes": sizes,
    }  # fmt: skip
    by_batch: dict[str, float] = {}
    for b in sizes:
        compiled, args = prepare(m, "latency", b, length)
        if b == 1:
            out.update(measure.compiled_memory(compiled))
            times = _time(compiled, args, warmup=warmup, repeats=repeats)
            out["latency_ms_p50"], out["latency_ms_p95"] = _pct(times, 50), _pct(times, 95)
            by_batch["1"] = 1.0 / float(np.median(times))
        else:
            times = _time(compiled, args, warmup=min(warmup, 1), repeats=max(3, repeats // 4))
            by_batch[str(b)] = b / float(np.median(times))
        del compiled, args
    best = max(by_batch, key=lambda k: by_batch[k])
    out.update(throughput_per_s=by_batch[best], best_batch_size=int(best), throughput_by_batch=by_batch)

    out.update(decode_ms_per_token_p50=None, decode_ms_per_token_p95=None, decode_compiled_bytes=None)
    if decode and model_lib.kind_programs(kind).decode is not None:
        compiled, args = prepare(m, "decode", 1, length)
        times = _time(compiled, args, warmup=warmup, repeats=repeats)
        out.update(decode_ms_per_token_p50=_pct(times, 50), decode_ms_per_token_p95=_pct(times, 95),
                   decode_compiled_bytes=measure.compiled_memory(compiled)["compiled_bytes"])
        del compiled, args

    out.update(peak_rss_bytes=None, peak_device_bytes=None, peak_how=None)
    if rss:
        probe = probe_fresh_process(sized, length=length, program="latency", timeout_s=timeout_s)
        if "error" in probe:
            out["peak_error"] = probe["error"]
        else:
            out.update(peak_rss_bytes=probe.get("peak_rss_bytes"), peak_device_bytes=probe.get("peak_device_bytes"),
                       peak_how=probe.get("how"))
    return out


# --- the fresh-process probe ---------------------------------------------------------------------


def probe_in_process(config: ml_collections.ConfigDict, *, length: int, program: str = "latency",
                     batch: int = 1) -> dict[str, Any]:
    """Build the model (random parameters), compile one program, run it once: its peak memory."""
    sized = model_lib.sized_config(config, length)
    m = model_lib.random_model(sized)
    compiled, args = prepare(m, program, batch, length)
    jax.block_until_ready(args)
    return measure.peak_memory_of(lambda: measure.run_blocked(compiled, args))


def probe_fresh_process(config: ml_collections.ConfigDict, *, length: int, program: str = "latency",
                        batch: int = 1, timeout_s: float = 900.0) -> dict[str, Any]:
    """`probe_in_process` in a fresh Python process; its report, or `{"error": ...}`."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        f.write(config.to_json_best_effort())
        path = f.name
    cmd = [sys.executable, "-m", "sparseformer.infer.speed", f"--config={path}", f"--length={length}",
           f"--program={program}", f"--batch={batch}"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    finally:
        os.unlink(path)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = proc.stderr.strip().splitlines()[-1:] or [""]
        return {"error": f"exit {proc.returncode}: {tail[0]}"}
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> int:
    """`python -m sparseformer.infer.speed --config=CONFIG.json --length=N`: one JSON line."""
    p = argparse.ArgumentParser(prog="python -m sparseformer.infer.speed", description=probe_in_process.__doc__)
    p.add_argument("--config", required=True, help="a run's config.json")
    p.add_argument("--length", type=int, required=True)
    p.add_argument("--program", choices=PROGRAMS, default="latency")
    p.add_argument("--batch", type=int, default=1)
    a = p.parse_args(argv)
    with open(a.config) as f:
        config = ml_collections.ConfigDict(json.load(f))
    print(json.dumps(probe_in_process(config, length=a.length, program=a.program, batch=a.batch)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
