"""`sparseformer export`: a trained run as `jax.export` functions that run without sparseformer.

    manifest = export_run("runs/x", "exported/x", platforms=("cpu", "cuda"))
    # then, with Python, jax and numpy only:  python exported/x/run.py in.jsonl out.jsonl

One function per bucket length, each with a symbolic batch size, taking the parameters (a flat list
of arrays, stored once in `params.npz`) and the bucket's arrays (`runtime.ARRAYS[kind]`). Each is
the same predict program `sparseformer predict --workdir` jits, so predictions agree. For seq2seq
and language models the whole decoding loop (greedy or beam search, with the KV cache) is inside
the exported function. The layout is described in `sparseformer.infer.artifact`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparseformer.infer import artifact, runtime
from sparseformer.infer import model as model_lib
from sparseformer.infer import predict as predict_lib

PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
_RUNTIME_FILES = {  # what DIR/runtime/ holds: the modules run.py needs, copied as they are
    "artifact.py": Path(artifact.__file__),
    "runtime.py": Path(runtime.__file__),
    "text_codec.py": Path(__file__).parent.parent / "data" / "text_codec.py",
}


def array_specs(kind: str, bucket: int, batch: Any) -> tuple[jax.ShapeDtypeStruct, ...]:
    """Shapes of a bucket's arrays with batch size `batch` (an int or a symbolic dimension)."""
    ids = jax.ShapeDtypeStruct((batch, bucket), jnp.int32)
    mask = jax.ShapeDtypeStruct((batch, bucket), jnp.bool_)
    if kind == "dual_encoder":
        return ids, mask, ids, mask
    if kind == "lm":
        return ids, jax.ShapeDtypeStruct((batch,), jnp.int32), jax.ShapeDtypeStruct((), jnp.int32)
    return ids, mask


def flat_program(m: model_lib.Model) -> tuple[Any, list[np.ndarray]]:
    """The predict program as `fn(leaves, *arrays)` over the flat list of parameter arrays."""
    leaves, treedef = jax.tree.flatten((m.params, m.extra))
    predict = model_lib.kind_programs(m.config.model.kind).predict

    def fn(leaves: list[jax.Array], *arrays: jax.Array) -> dict[str, jax.Array]:
        params, extra = jax.tree.unflatten(treedef, leaves)
        return predict(nnx.merge(m.graphdef, params, extra), *arrays)

    return fn, [np.asarray(x) for x in leaves]


def _check_platforms(platforms: Sequence[str]) -> tuple[str, ...]:
    out = tuple(p.strip() for p in platforms if p.strip())
    bad = [p for p in out if p not in PLATFORMS]
    if not out or bad:
        raise ValueError(f"--platforms: {','.join(bad) or 'nothing'} is not allowed; choose from {', '.join(PLATFORMS)}")
    return out


def export_model(m: model_lib.Model, out_dir: str | Path, *, platforms: Sequence[str] = ("cpu",),
                 buckets: Sequence[int] | None = None, source: str = "") -> dict[str, Any]:
    """Write an export directory for a model (see the module docstring); returns its manifest."""
    from sparseformer.data import get_task

    platforms = _check_platforms(platforms)
    config = m.config
    kind = config.model.kind
    task = get_task(config.task)
    codec = task.codec(config)
    bucket_list = predict_lib.check_buckets(config, buckets) if buckets else predict_lib.make_buckets(config)
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / artifact.MANIFEST).exists():
        raise FileExistsError(f"--out: {out_dir} exists and is not an export directory; choose another")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        fn, leaves = flat_program(m)
        np.savez(tmp / artifact.PARAMS, **{artifact.leaf_name(i): x for i, x in enumerate(leaves)})
        leaf_specs = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves]
        (batch,) = jax.export.symbolic_shape("batch")
        functions = {}
        for b in bucket_list:
            exported = jax.export.export(jax.jit(fn), platforms=platforms)(leaf_specs, *array_specs(kind, b, batch))
            name = artifact.bucket_file(b)
            (tmp / name).write_bytes(exported.serialize())
            functions[str(b)] = name
        spec = codec.spec()
        for name in spec.get("files", []):
            shutil.copyfile(getattr(codec, "model_file", ""), tmp / name)
        (tmp / "runtime").mkdir()
        for name, path in _RUNTIME_FILES.items():
            shutil.copyfile(path, tmp / "runtime" / name)
        (tmp / "run.py").write_text(artifact.RUN_PY)
        manifest = {
            "format_version": artifact.FORMAT_VERSION,
            "task": config.task,
            "kind": kind,
            "attention": config.get("attention_name", ""),
            "source": source,
            "step": m.step,
            "buckets": bucket_list,
            "max_len": int(config.model.max_len),
            "max_target_len": int(config.model.max_target_len) if "max_target_len" in config.model else None,
            "beam_size": int(config.model.beam_size) if "beam_size" in config.model else None,
            "decode_len": ([float(config.model.decode_len_ratio), int(config.model.decode_len_extra)]
                           if kind == "seq2seq" else None),  # [ratio, extra]: outputs end by ratio x source + extra
            "input_fields": list(runtime.FIELDS[kind]),
            "output_fields": ["prediction", "probabilities"] if kind in ("classifier", "dual_encoder") else ["prediction"],
            "arrays": list(runtime.ARRAYS[kind]),
            "labels": task.label_names(config),
            "prompt_prefix": list(task.prompt_prefix),
            "codec": spec,
            "platforms": list(platforms),
            "params": artifact.PARAMS,
            "num_params_arrays": len(leaves),
            "functions": functions,
            "jax_version": jax.__version__,
        }
        (tmp / artifact.MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def export_run(workdir: str, out_dir: str | Path, *, platforms: Sequence[str] = ("cpu",),
               buckets: Sequence[int] | None = None, **decoding: Any) -> dict[str, Any]:
    """Export the latest checkpoint of a run directory (`decoding`: `predict.with_decoding`'s choices)."""
    m = predict_lib.with_decoding(model_lib.trained_model(workdir), **decoding)
    return export_model(m, out_dir, platforms=platforms, buckets=buckets, source=str(workdir))
