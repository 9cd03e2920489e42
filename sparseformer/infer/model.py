"""The inference programs of each model kind, as pure functions of (parameters, arrays).

    m = trained_model("runs/x")                      # or random_model(config)
    fn = predict_program(m.config)                   # (params, extra, *arrays) -> outputs
    outputs = jax.jit(fn)(m.params, m.extra, *arrays)

`predict_program` is what `predict` runs and what `export` serializes, so both give the same
predictions. Per kind (arrays are batch-major; `L` is the bucket length):

| kind | arrays | outputs |
| --- | --- | --- |
| classifier | `inputs [B, L]` int32, `inputs_mask [B, L]` bool | `probabilities [B, C]` |
| dual_encoder | `inputs1`, `inputs1_mask`, `inputs2`, `inputs2_mask` | `probabilities [B, C]` |
| seq2seq | `inputs [B, L]`, `inputs_mask [B, L]` | `ids [B, Lt]` (greedy or beam search, padding after EOS) |
| lm | `inputs [B, L]` (prompts, left-aligned), `lengths [B]` int32, `max_new` int32 scalar | `ids [B, max_len]` (prompt + continuation, padding after it) |

The speed programs (`latency_program`, `decode_program`) are what `speed.measure_model` times:
the forward pass for classifiers, the prefill (encoder, or the prompt's causal pass) and one cached
decoding step for seq2seq and language models.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from sparseformer.data.base import EOS_ID, PAD_ID
from sparseformer.infer import runtime

Program = Callable[..., Any]


@dataclasses.dataclass(frozen=True)
class Model:
    """A model's structure and parameters (trained, or random for speed)."""

    config: ml_collections.ConfigDict
    graphdef: nnx.GraphDef
    params: Any  # pure dict
    extra: Any  # pure dict
    step: int | None = None  # the checkpoint's step; None: random parameters

    def merge(self, params: Any = None, extra: Any = None) -> nnx.Module:
        return nnx.merge(self.graphdef, self.params if params is None else params, self.extra if extra is None else extra)


def sized_config(config: ml_collections.ConfigDict, length: int, *, target_length: int | None = None) -> ml_collections.ConfigDict:
    """A copy of a run config whose inputs (and positions) are `length` tokens long, validated.

    `target_length` sets a seq2seq model's decoder length (default: the config's own). Raises the
    config validation's one-line `ValueError` when the attention cannot run at that length.
    """
    from sparseformer.config import validate_config

    c = ml_collections.ConfigDict(copy.deepcopy(config.to_dict()))
    c.data.max_len = int(length)
    c.model.max_len = int(length)
    if target_length is not None and "max_target_len" in c.model:
        c.data.max_target_len = int(target_length)
        c.model.max_target_len = int(target_length)
    validate_config(c, inference=True)
    return c


def random_model(config: ml_collections.ConfigDict, *, seed: int = 0) -> Model:
    """The config's model with random parameters, created by one jitted initialiser (speed and memory
    do not depend on the values)."""
    from sparseformer.models import build_model

    build = lambda: build_model(config, nnx.Rngs(seed))  # noqa: E731
    with nnx.use_eager_sharding(False):
        graphdef, _, _ = nnx.split(nnx.eval_shape(build), nnx.Param, ...)

    def init():
        with nnx.use_eager_sharding(False):
            _, params, extra = nnx.split(build(), nnx.Param, ...)
        return nnx.to_pure_dict(params), nnx.to_pure_dict(extra)

    # it runs once: compile it fast (as the trainer's init does on CPU); the values do not depend on it
    options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
    params, extra = jax.jit(init).lower().compile(compiler_options=options)()
    return Model(config, graphdef, params, extra, None)


def trained_model(workdir: str, *, devices: Any = None) -> Model:
    """The latest checkpoint of a run directory (see `train.loop.restore_trained`)."""
    from sparseformer.train.loop import restore_trained

    t = restore_trained(workdir, devices=devices)
    return Model(t.config, t.graphdef, t.params, t.extra, t.step)


# --- the programs ---------------------------------------------------------------------------------


def _classify(model: nnx.Module, inputs: jax.Array, inputs_mask: jax.Array) -> dict[str, jax.Array]:
    logits, _ = model(inputs, inputs_mask)
    return {"probabilities": jax.nn.softmax(logits, -1)}


def _classify_pair(model: nnx.Module, inputs1, inputs1_mask, inputs2, inputs2_mask) -> dict[str, jax.Array]:
    logits, _ = model(inputs1, inputs1_mask, inputs2, inputs2_mask)
    return {"probabilities": jax.nn.softmax(logits, -1)}


def _translate(model: nnx.Module, inputs: jax.Array, inputs_mask: jax.Array) -> dict[str, jax.Array]:
    return {"ids": model.predict(inputs, inputs_mask)}


def continue_prompts(model: nnx.Module, prompt_BL: jax.Array, lengths_B: jax.Array, max_new: jax.Array,
                     *, eos_id: int = EOS_ID) -> jax.Array:
    """Greedy continuation of prompts of different lengths, with the KV cache: `[B, max_len]` ids.

    The bucket (`prompt_BL`, padded after each prompt) runs through one causal pass (`prefill`);
    then one cached step per position from the shortest prompt's end: a row still inside its
    prompt is fed its own next token, a row past it its argmax. Each row gets at most `max_new` new
    tokens (and at most `max_len` in all); after an EOS, or past its budget, it is padding. The
    loop stops when every row is done. Causal attention at a position sees only earlier
    positions, so a row's continuation does not depend on the other rows or on the padding.
    """
    B, L = prompt_BL.shape
    T = model.max_len
    lengths_B = jnp.clip(lengths_B.astype(jnp.int32), 1, L)
    _, cache = model.prefill(prompt_BL)
    ids = jnp.zeros((B, T), jnp.int32).at[:, :L].set(prompt_BL)
    stop_B = jnp.minimum(lengths_B + jnp.maximum(max_new, 0), T)  # a row's first position that stays padding
    end = jnp.max(stop_B)

    def step(carry):
        t, ids, done, cache = carry
        logits, cache = model.decode_step(jax.lax.dynamic_index_in_dim(ids, t, 1, keepdims=False), cache, t)
        nxt = t + 1
        in_prompt = nxt < lengths_B
        new = jnp.argmax(logits, -1).astype(jnp.int32)
        keep = in_prompt | (~done & (nxt < stop_B))
        tok = jnp.where(in_prompt, jax.lax.dynamic_index_in_dim(ids, jnp.minimum(nxt, T - 1), 1, keepdims=False),
                        jnp.where(keep, new, PAD_ID))
        done = done | (~in_prompt & ((new == eos_id) | (nxt + 1 >= stop_B)))
        ids = jax.lax.dynamic_update_slice_in_dim(ids, tok[:, None], jnp.minimum(nxt, T - 1), 1)
        return nxt, ids, done, cache

    def running(carry):
        t, _, done, _ = carry
        return (t + 1 < end) & ~jnp.all(done)

    done0 = lengths_B >= stop_B
    init = (jnp.min(lengths_B) - 1, ids, done0, cache)
    return jax.lax.while_loop(running, step, init)[1]


def _continue(model: nnx.Module, inputs: jax.Array, lengths: jax.Array, max_new: jax.Array) -> dict[str, jax.Array]:
    return {"ids": continue_prompts(model, inputs, lengths, max_new)}


@dataclasses.dataclass(frozen=True)
class KindPrograms:
    """What inference runs for one model kind (see the module docstring)."""

    predict: Callable[..., dict[str, jax.Array]]  # (model, *arrays named runtime.ARRAYS[kind]) -> outputs
    latency: Callable[..., Any]  # (model, *arrays) -> outputs: the program whose batch-1 latency is reported
    decode: Callable[..., Any] | None = None  # (model, state) -> state: one cached decoding step
    decode_state: Callable[..., Any] | None = None  # (model, *arrays) -> the decode step's input state


def _s2s_prefill(model: nnx.Module, inputs: jax.Array, inputs_mask: jax.Array) -> Any:
    # the encoder pass plus the cross-attention keys and values: what decoding starts from
    return model._start(inputs, inputs_mask, 1)  # noqa: SLF001


def _s2s_state(model: nnx.Module, inputs: jax.Array, inputs_mask: jax.Array) -> Any:
    cache, mask = _s2s_prefill(model, inputs, inputs_mask)
    B = inputs.shape[0]
    return jnp.full((B,), model.bos_id, jnp.int32), cache, jnp.int32(model.max_target_len - 1), mask


def _s2s_step(model: nnx.Module, state: Any) -> Any:
    prev, cache, t, mask = state
    logp, cache = model._step(prev, cache, t, mask)  # noqa: SLF001
    return jnp.argmax(logp, -1).astype(jnp.int32), cache, t, mask


def _lm_prefill(model: nnx.Module, inputs: jax.Array, lengths: jax.Array, max_new: jax.Array) -> Any:
    logits, cache = model.prefill(inputs)
    return logits[:, -1], cache  # generation needs the last position's logits and the cache


def _lm_state(model: nnx.Module, inputs: jax.Array, lengths: jax.Array, max_new: jax.Array) -> Any:
    _, cache = model.prefill(inputs)
    B, L = inputs.shape
    return inputs[:, -1], cache, jnp.int32(L - 1)


def _lm_step(model: nnx.Module, state: Any) -> Any:
    ids, cache, t = state
    logits, cache = model.decode_step(ids, cache, t)
    return jnp.argmax(logits, -1).astype(jnp.int32), cache, t


KINDS: dict[str, KindPrograms] = {
    "classifier": KindPrograms(_classify, _classify),
    "dual_encoder": KindPrograms(_classify_pair, _classify_pair),
    "seq2seq": KindPrograms(_translate, _s2s_prefill, _s2s_step, _s2s_state),
    "lm": KindPrograms(_continue, _lm_prefill, _lm_step, _lm_state),
}


def kind_programs(kind: str) -> KindPrograms:
    if kind not in KINDS:
        raise ValueError(f"model.kind: {kind!r} is not one of {', '.join(KINDS)}")
    return KINDS[kind]


def pure(m: Model, program: Callable[..., Any]) -> Callable[..., Any]:
    """`program(model, *args)` as a pure function `(params, extra, *args)` of the model's structure."""

    def fn(params: Any, extra: Any, *args: Any) -> Any:
        return program(nnx.merge(m.graphdef, params, extra), *args)

    return fn


def example_arrays(config: ml_collections.ConfigDict, batch: int, length: int, *, seed: int = 0,
                   max_new: int = 1) -> tuple[np.ndarray, ...]:
    """Random full-length inputs of a kind's predict arrays: `batch` rows of `length` tokens."""
    rng = np.random.default_rng(seed)
    kind = config.model.kind
    high = max(int(config.model.vocab_size), 4)
    items = [runtime.Item(i, 0, {}, [rng.integers(3, high, length).tolist() for _ in runtime.FIELDS[kind]])
             for i in range(batch)]
    return runtime.batch_arrays(kind, items, length, batch, max_new=max_new)
