"""The pure train and eval steps.

    train_step(state, batch, rng, teacher) -> (state, metrics)
    eval_step(state, batch) -> metrics

Both are pure functions of arrays; `loop.py` jits them once with explicit shardings (the state
donated). Metrics are `name -> (sum, count)` pairs of float32 scalars, the model kind's
convention, so that sums over microbatches, devices and eval batches stay exact; the host
divides. The per-step randomness is `fold_in(rng, state.step)`: a resumed run draws the same
numbers as one that never stopped.

Gradient accumulation (`optimizer.grad_accum_steps = k > 1`) splits the global batch into `k`
interleaved microbatches (example `i` goes to microbatch `i % k`, which keeps each microbatch
evenly split over the `data` axis), runs them in a `lax.scan`, and applies the mean gradient
once: one call is one optimizer update.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from sparseformer.train.state import TrainState

Metrics = dict[str, tuple[jax.Array, jax.Array]]
Batch = dict[str, jax.Array]


def _pair(total: Any, count: Any) -> tuple[jax.Array, jax.Array]:
    return jnp.asarray(total, jnp.float32), jnp.asarray(count, jnp.float32)


def distill_kl(student_logits: jax.Array, teacher_logits: jax.Array, weights: jax.Array, temperature: float) -> tuple[jax.Array, jax.Array]:
    """`(sum, count)` of KL(teacher/T || student/T) over the positions `weights` selects."""
    t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
    s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    kl = jnp.sum(jnp.exp(t) * (t - s), axis=-1)
    w = weights.astype(jnp.float32)
    return jnp.sum(kl * w), jnp.sum(w)


def make_train_step(
    graphdef: nnx.GraphDef,
    kind: Any,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    *,
    grad_accum_steps: int = 1,
    teacher_graphdef: nnx.GraphDef | None = None,
    distill_weight: float = 0.0,
    distill_temperature: float = 1.0,
) -> Callable[..., tuple[TrainState, Metrics]]:
    """The train step for a model kind (`kind.loss`, and `kind.logits` when distilling)."""
    distilling = teacher_graphdef is not None

    def loss_fn(params: Any, extra: Any, batch: Batch, rng: jax.Array, teacher: Any) -> tuple[jax.Array, Metrics]:
        model = nnx.merge(graphdef, params, extra)
        loss, metrics = kind.loss(model, batch, rng=rng, train=True)
        metrics = {k: _pair(*v) for k, v in metrics.items()}
        if distilling:
            t_model = nnx.merge(teacher_graphdef, *teacher)
            t_logits, _ = kind.logits(t_model, batch, rng=rng, train=False)
            s_logits, weights = kind.logits(model, batch, rng=rng, train=True)
            kl_sum, kl_count = distill_kl(s_logits, jax.lax.stop_gradient(t_logits), weights, distill_temperature)
            kl = kl_sum / jnp.maximum(kl_count, 1.0)
            loss = loss + distill_weight * distill_temperature**2 * kl
            metrics["distill_kl"] = (kl_sum, kl_count)
            metrics["total_loss"] = _pair(loss, 1.0)
        return loss, metrics

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def grads_and_metrics(state: TrainState, batch: Batch, rng: jax.Array, teacher: Any) -> tuple[Any, Metrics]:
        if grad_accum_steps == 1:
            (_, metrics), grads = grad_fn(state.params, state.extra, batch, rng, teacher)
            return grads, metrics
        k = grad_accum_steps

        def split(x: jax.Array) -> jax.Array:  # [B, ...] -> [k, B/k, ...], example i in microbatch i % k
            return jnp.swapaxes(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 0, 1)

        micro = jax.tree.map(split, batch)

        def body(carry: tuple[Any, Metrics], xs: tuple[Batch, jax.Array]) -> tuple[tuple[Any, Metrics], None]:
            grads, metrics = carry
            mb, i = xs
            (_, m), g = grad_fn(state.params, state.extra, mb, jax.random.fold_in(rng, i), teacher)
            return (jax.tree.map(jnp.add, grads, g), jax.tree.map(jnp.add, metrics, m)), None

        zero_g = jax.tree.map(jnp.zeros_like, state.params)
        first = jax.tree.map(lambda x: x[0], micro)
        zero_m = jax.tree.map(jnp.zeros_like, jax.eval_shape(lambda: grad_fn(state.params, state.extra, first, rng, teacher)[0][1]))
        (grads, metrics), _ = jax.lax.scan(body, (zero_g, zero_m), (micro, jnp.arange(k)))
        return jax.tree.map(lambda g: g / k, grads), metrics

    def train_step(state: TrainState, batch: Batch, rng: jax.Array, teacher: Any = None) -> tuple[TrainState, Metrics]:
        step_rng = jax.random.fold_in(rng, state.step)
        grads, metrics = grads_and_metrics(state, batch, step_rng, teacher)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics["grad_norm"] = _pair(optax.tree.norm(grads), 1.0)
        metrics["learning_rate"] = _pair(schedule(state.step), 1.0)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    return train_step


def make_eval_step(graphdef: nnx.GraphDef, kind: Any) -> Callable[[TrainState, Batch], Metrics]:
    """Sums of the model kind's metrics over one batch (padding rows carry `example_mask = False`)."""

    def eval_step(state: TrainState, batch: Batch) -> Metrics:
        model = nnx.merge(graphdef, state.params, state.extra)
        _, metrics = kind.loss(model, batch, rng=jax.random.key(0), train=False)
        return {k: _pair(*v) for k, v in metrics.items()}

    return eval_step


def make_predict_step(graphdef: nnx.GraphDef, kind: Any) -> Callable[[TrainState, Batch], jax.Array]:
    """Generated token ids for one batch (seq2seq and language models)."""

    def predict_step(state: TrainState, batch: Batch) -> jax.Array:
        return kind.predict(nnx.merge(graphdef, state.params, state.extra), batch)

    return predict_step


def make_probe_step(graphdef: nnx.GraphDef, dense_graphdef: nnx.GraphDef, kind: Any) -> Callable[..., dict[str, Any]]:
    """What monitoring follows, on one batch in evaluation mode (deterministic):

    `agreement`: `(sum, count)` of the positions (examples, or weighted tokens) where the model's
    prediction equals the prediction of the same parameters with dense attention
    (`dense_graphdef`, the kind's own `logits`); `layer_fidelity` and `layer_captured`
    `[calls, H]`: the model's per-layer, per-head attention statistics for this batch.
    """

    def probe_step(params: Any, extra: Any, dense_params: Any, dense_extra: Any, batch: Batch) -> dict[str, Any]:
        model = nnx.merge(graphdef, params, extra)
        logits, _, weights, aux = model.forward(batch, rng=None, train=False)
        dense_logits, _ = kind.logits(nnx.merge(dense_graphdef, dense_params, dense_extra), batch, rng=None, train=False)
        same = (jnp.argmax(logits, -1) == jnp.argmax(dense_logits, -1)).astype(jnp.float32)
        w = weights.astype(jnp.float32)
        return {"agreement": _pair(jnp.sum(same * w), jnp.sum(w)), "layer_fidelity": aux["layer_fidelity"],
                "layer_captured": aux["layer_captured"]}

    return probe_step


def finalize(metrics: dict[str, Any]) -> dict[str, float]:
    """Host side: `(sum, count)` pairs -> means."""
    out = {}
    for name, (total, count) in metrics.items():
        total, count = float(total), float(count)
        out[name] = total / count if count else float("nan")
    return out
