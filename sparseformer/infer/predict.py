"""`predict --workdir`: a run's latest checkpoint as a `runtime.Backend`, and the length buckets.

    backend = load_backend("runs/x")                      # buckets chosen from the model's attention
    summary = runtime.predict_file(backend, "in.jsonl", "out.jsonl", batch_size=32)
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from sparseformer.infer import model as model_lib
from sparseformer.infer import runtime

SMALLEST_BUCKET = 32


def _multiple(config: ml_collections.ConfigDict) -> int:
    """The block multiple the input length is padded to by the attention it feeds."""
    from sparseformer.attention import block_multiple

    att = config.model.attention
    return block_multiple(att, causal=config.model.kind == "lm")


def make_buckets(config: ml_collections.ConfigDict, *, smallest: int = SMALLEST_BUCKET) -> list[int]:
    """Bucket lengths for a model: `smallest` (rounded up to the attention's block multiple), doubled
    until `max_len`, and `max_len`; lengths at which the attention cannot run are left out, and a
    fixed-length compression (Linformer) gets `max_len` alone. A bucket with fewer key blocks than a
    selection budget runs exact attention there (`attention.config.budget_exceeds_keys`). Every bucket
    is validated as a whole config at that length."""
    from sparseformer.attention import COMPRESSIONS

    max_len = int(config.model.max_len)
    att = config.model.attention
    if att.compression.enabled and COMPRESSIONS.get(att.compression.kind).fixed_length:
        return [max_len]
    mult = _multiple(config)
    b = max(mult, -(-int(smallest) // mult) * mult)
    candidates = []
    while b < max_len:
        candidates.append(b)
        b *= 2
    out = []
    for b in candidates:
        try:
            model_lib.sized_config(config, b)
        except ValueError:
            continue
        out.append(b)
    return out + [max_len]


def check_buckets(config: ml_collections.ConfigDict, buckets: Sequence[int]) -> list[int]:
    """Given bucket lengths, sorted, validated at their length, ending at `max_len`."""
    max_len = int(config.model.max_len)
    out = sorted({int(b) for b in buckets})
    if not out or out[-1] != max_len:
        raise ValueError(f"--buckets: {','.join(map(str, out))} must end at the model's max_len {max_len}")
    for b in out[:-1]:
        if b < 1:
            raise ValueError(f"--buckets: {b} must be positive")
        try:
            model_lib.sized_config(config, b)
        except ValueError as e:
            raise ValueError(f"--buckets: the attention cannot run at {b} tokens: {e}") from None
    return out


DECODING_KEYS = ("beam_size", "decode_len_ratio", "decode_len_extra")
"""Translation's decoding choices a trained run can be given at predict or export time."""


def with_decoding(m: model_lib.Model, *, beam_size: int | None = None, decode_len_ratio: float | None = None,
                  decode_len_extra: int | None = None) -> model_lib.Model:
    """The model with other decoding choices (seq2seq; its structure holds them): beam width, and
    the output length bound `decode_len_ratio x source tokens + decode_len_extra` (ratio 0: none)."""
    asked = {"beam_size": beam_size, "decode_len_ratio": decode_len_ratio, "decode_len_extra": decode_len_extra}
    changes = {k: v for k, v in asked.items() if v is not None and m.config.model.get(k) != v}
    if not changes or m.config.model.kind != "seq2seq":
        return m
    for key, low in (("beam_size", 1), ("decode_len_ratio", 0), ("decode_len_extra", 1)):
        if key in changes and changes[key] < low:
            raise ValueError(f"--{key.replace('_', '-')}: {changes[key]} must be >= {low}")
    from sparseformer.models import build_model

    config = ml_collections.ConfigDict(copy.deepcopy(m.config.to_dict()))
    config.model.update(changes)
    with nnx.use_eager_sharding(False):
        graphdef, _, _ = nnx.split(nnx.eval_shape(lambda: build_model(config, nnx.Rngs(0))), nnx.Param, ...)
    return model_lib.Model(config, graphdef, m.params, m.extra, m.step)


class ModelBackend:
    """The model's predict program, jitted, compiled once per (bucket, rows) shape."""

    def __init__(self, m: model_lib.Model, *, buckets: Sequence[int] | None = None):
        from sparseformer.data import get_task

        config = m.config
        task = get_task(config.task)
        self.model = m
        self.kind = config.model.kind
        self.codec = task.codec(config)
        self.labels = task.label_names(config)
        self.prompt_prefix = tuple(task.prompt_prefix)
        self.buckets = check_buckets(config, buckets) if buckets else make_buckets(config)
        self._fn = jax.jit(model_lib.pure(m, model_lib.kind_programs(self.kind).predict))
        self.compiled: dict[tuple[int, ...], Any] = {}

    def run(self, bucket: int, arrays: tuple[np.ndarray, ...]) -> dict[str, np.ndarray]:
        key = tuple(np.shape(a) for a in arrays)
        if key not in self.compiled:
            self.compiled[key] = self._fn.lower(self.model.params, self.model.extra, *arrays).compile()
        return jax.device_get(self.compiled[key](self.model.params, self.model.extra, *arrays))


def load_backend(workdir: str, *, buckets: Sequence[int] | None = None, beam_size: int | None = None) -> ModelBackend:
    """The latest checkpoint of a run as a prediction backend."""
    return ModelBackend(with_decoding(model_lib.trained_model(workdir), beam_size=beam_size), buckets=buckets)

