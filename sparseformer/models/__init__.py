"""Models (Flax NNX) and the registry of model kinds the trainer uses.

    model = build_model(config, nnx.Rngs(config.seed))
    loss, metrics = MODEL_KINDS[config.model.kind].loss(model, batch, rng=key, train=True)

Every kind (`classifier`, `dual_encoder`, `seq2seq`, `lm`) provides:
  - `build(config, rngs) -> nnx.Module`;
  - `loss(model, batch, *, rng, train) -> (loss, metrics)`: the loss includes the layers'
    `aux_loss`; metrics map a name to a float32 `(sum, count)` pair: `loss`, `accuracy`
    (per example or per token), `aux_loss`, `fidelity`, `captured` (the share of attention
    computed exactly), the last two per attention call as `fidelity_layer<i>` and
    `captured_layer<i>`, and `nll` for token kinds (perplexity = exp(sum / count));
  - `logits(model, batch, *, rng, train) -> (logits, weights)`: for distillation (a KL between
    teacher and student over the positions where `weights > 0`);
  - `predict(model, batch) -> ids`: argmax classes, or decoded `[B, Lt]` ids for seq2seq
    (greedy, or beam search when `model.beam_size > 1`), or next-token argmax for lm.
`rng` drives dropout and the attention core's randomness when `train` is True (pass a fresh
key each step); with `train=False` everything is deterministic.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from sparseformer.models.encoder import DualEncoder, Encoder, EncoderClassifier
from sparseformer.models.layers import MultiHeadAttention
from sparseformer.models.lm import DecoderLM
from sparseformer.models.seq2seq import EncoderDecoder

Batch = dict[str, Any]
Metrics = dict[str, tuple[jax.Array, jax.Array]]


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> tuple[jax.Array, jax.Array]:
    """Per-position `(loss, nll)`: the (smoothed) cross-entropy and the plain negative log-likelihood."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    nll = -jnp.take_along_axis(logp, labels[..., None].astype(jnp.int32), -1)[..., 0]
    if not label_smoothing:
        return nll, nll
    return (1.0 - label_smoothing) * nll - label_smoothing * jnp.mean(logp, -1), nll


def loss_fn(model: nnx.Module, batch: Batch, *, rng: jax.Array | None, train: bool) -> tuple[jax.Array, Metrics]:
    """Weighted mean cross-entropy (with label smoothing from the model) plus the aux loss."""
    logits, labels, w, aux = model.forward(batch, rng=rng, train=train)
    loss, nll = cross_entropy(logits, labels, getattr(model, "label_smoothing", 0.0))
    total = jnp.sum(w)
    loss_sum = jnp.sum(loss * w)
    correct = jnp.sum((jnp.argmax(logits, -1) == labels).astype(jnp.float32) * w)
    one = jnp.ones((), jnp.float32)
    metrics: Metrics = {
        "loss": (loss_sum, total),
        "accuracy": (correct, total),
        "aux_loss": (aux["aux_loss"], one),
        "fidelity": (aux["fidelity"], one),
        "captured": (aux["captured"], one),
    }
    for i in range(aux["layer_fidelity"].shape[0]):  # per attention call, averaged over heads
        metrics[f"fidelity_layer{i}"] = (jnp.mean(aux["layer_fidelity"][i]), one)
        metrics[f"captured_layer{i}"] = (jnp.mean(aux["layer_captured"][i]), one)
    if logits.ndim == 3:
        metrics["nll"] = (jnp.sum(nll * w), total)
    return loss_sum / jnp.maximum(total, 1.0) + aux["aux_loss"], metrics


def logits_fn(model: nnx.Module, batch: Batch, *, rng: jax.Array | None, train: bool) -> tuple[jax.Array, jax.Array]:
    """`(logits, weights)`: `[B, C]` and `[B]`, or `[B, L, V]` and `[B, L]`."""
    logits, _, w, _ = model.forward(batch, rng=rng, train=train)
    return logits, w


def _predict_argmax(model: nnx.Module, batch: Batch) -> jax.Array:
    logits, _ = logits_fn(model, batch, rng=None, train=False)
    return jnp.argmax(logits, -1).astype(jnp.int32)


def _predict_seq2seq(model: EncoderDecoder, batch: Batch) -> jax.Array:
    return model.predict(batch["inputs"], batch["inputs_mask"])


@dataclasses.dataclass(frozen=True)
class ModelKind:
    """What the trainer needs to know about one kind of model."""

    name: str
    module: type[nnx.Module]
    predict: Callable[[nnx.Module, Batch], jax.Array]
    loss: Callable[..., tuple[jax.Array, Metrics]] = loss_fn
    logits: Callable[..., tuple[jax.Array, jax.Array]] = logits_fn

    def build(self, config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> nnx.Module:
        """The model for `config.model` (label smoothing from `config.model.label_smoothing`)."""
        model = self.module(config.model, rngs=rngs)
        model.label_smoothing = float(config.model.get("label_smoothing", 0.0))
        return model


MODEL_KINDS: dict[str, ModelKind] = {
    "classifier": ModelKind("classifier", EncoderClassifier, _predict_argmax),
    "dual_encoder": ModelKind("dual_encoder", DualEncoder, _predict_argmax),
    "seq2seq": ModelKind("seq2seq", EncoderDecoder, _predict_seq2seq),
    "lm": ModelKind("lm", DecoderLM, _predict_argmax),
}


def get_kind(kind: str) -> ModelKind:
    """The registered model kind; an unknown name raises `ValueError` listing the known ones."""
    if kind not in MODEL_KINDS:
        raise ValueError(f"model.kind: {kind!r} is not one of {', '.join(MODEL_KINDS)}")
    return MODEL_KINDS[kind]


def build_model(config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> nnx.Module:
    """`MODEL_KINDS[config.model.kind].build(config, rngs)`.

    Parameters carry logical axis names. Inside `jax.set_mesh(mesh)` with
    `nnx.logical_axis_rules(rules)` they are created sharded; with no mesh set they are
    created unsharded (the names stay in the metadata), e.g. for tests and `nnx.eval_shape`.
    """
    kind = get_kind(config.model.kind)
    if jax.sharding.get_abstract_mesh().empty:
        with nnx.use_eager_sharding(False):
            return kind.build(config, rngs)
    return kind.build(config, rngs)


__all__ = [
    "MODEL_KINDS", "ModelKind", "build_model", "get_kind", "loss_fn", "logits_fn", "cross_entropy",
    "EncoderClassifier", "DualEncoder", "Encoder", "EncoderDecoder", "DecoderLM", "MultiHeadAttention",
]
