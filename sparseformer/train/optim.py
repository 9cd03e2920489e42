"""Optimizers and learning-rate schedules, looked up by name from `config.optimizer`.

    tx, schedule = make_optimizer(config.optimizer, num_train_steps=config.num_train_steps)

Every schedule warms up linearly over `warmup_steps` to `learning_rate`, then follows its decay.
Gradient clipping by global norm (`grad_clip_norm > 0`) runs before the optimizer. Weight
decay skips vectors and scalars (biases, norm scales). Gradient accumulation is not an optax
wrapper: the train step loops over microbatches itself (see `sparseformer.train.step`), so one
call is one optimizer update and the step count, the schedule and resuming stay simple.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import ml_collections
import optax

Schedule = Callable[[ml_collections.ConfigDict, int], optax.Schedule]
Optimizer = Callable[[ml_collections.ConfigDict, optax.Schedule], optax.GradientTransformation]


def _warmup(opt: ml_collections.ConfigDict) -> optax.Schedule:
    return optax.linear_schedule(0.0, float(opt.learning_rate), max(int(opt.warmup_steps), 1))


def _cosine(opt: ml_collections.ConfigDict, num_train_steps: int) -> optax.Schedule:
    decay = max(num_train_steps - int(opt.warmup_steps), 1)
    return optax.join_schedules(
        [_warmup(opt), optax.cosine_decay_schedule(float(opt.learning_rate), decay)], [int(opt.warmup_steps)]
    )


def _inverse_sqrt(opt: ml_collections.ConfigDict, num_train_steps: int) -> optax.Schedule:
    del num_train_steps
    w = max(int(opt.warmup_steps), 1)
    lr = float(opt.learning_rate)

    def schedule(step: jax.Array) -> jax.Array:
        step = jax.numpy.asarray(step, jax.numpy.float32)
        return lr * jax.numpy.minimum(step / w, jax.numpy.sqrt(w / jax.numpy.maximum(step, 1.0)))

    return schedule


def _constant(opt: ml_collections.ConfigDict, num_train_steps: int) -> optax.Schedule:
    del num_train_steps
    return optax.join_schedules([_warmup(opt), optax.constant_schedule(float(opt.learning_rate))], [int(opt.warmup_steps)])


SCHEDULES: dict[str, Schedule] = {"cosine": _cosine, "inverse_sqrt": _inverse_sqrt, "constant": _constant}


def _decay_mask(params: object) -> object:
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def _adamw(opt: ml_collections.ConfigDict, lr: optax.Schedule) -> optax.GradientTransformation:
    return optax.adamw(lr, b1=float(opt.b1), b2=float(opt.b2), weight_decay=float(opt.weight_decay), mask=_decay_mask)


def _adafactor(opt: ml_collections.ConfigDict, lr: optax.Schedule) -> optax.GradientTransformation:
    return optax.adafactor(lr, weight_decay_rate=float(opt.weight_decay) or None, weight_decay_mask=_decay_mask)


def _sgd(opt: ml_collections.ConfigDict, lr: optax.Schedule) -> optax.GradientTransformation:
    tx = optax.sgd(lr, momentum=float(opt.b1) or None)
    if float(opt.weight_decay):
        tx = optax.chain(optax.add_decayed_weights(float(opt.weight_decay), mask=_decay_mask), tx)
    return tx


OPTIMIZERS: dict[str, Optimizer] = {"adamw": _adamw, "adafactor": _adafactor, "sgd": _sgd}


def validate(opt: ml_collections.ConfigDict) -> None:
    """Refuse unknown names and impossible values, naming the key."""
    if opt.name not in OPTIMIZERS:
        raise ValueError(f"optimizer.name: {opt.name!r} is not one of {', '.join(OPTIMIZERS)}")
    if opt.schedule not in SCHEDULES:
        raise ValueError(f"optimizer.schedule: {opt.schedule!r} is not one of {', '.join(SCHEDULES)}")
    if not float(opt.learning_rate) > 0:
        raise ValueError(f"optimizer.learning_rate: {opt.learning_rate!r} must be positive")
    if int(opt.warmup_steps) < 0:
        raise ValueError(f"optimizer.warmup_steps: {opt.warmup_steps!r} must be >= 0")
    if float(opt.grad_clip_norm) < 0:
        raise ValueError(f"optimizer.grad_clip_norm: {opt.grad_clip_norm!r} must be >= 0 (0 = no clipping)")
    if int(opt.grad_accum_steps) < 1:
        raise ValueError(f"optimizer.grad_accum_steps: {opt.grad_accum_steps!r} must be >= 1")


def make_optimizer(
    opt: ml_collections.ConfigDict, *, num_train_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """`(tx, schedule)` for the `config.optimizer` block."""
    validate(opt)
    schedule = SCHEDULES[opt.schedule](opt, int(num_train_steps))
    tx = OPTIMIZERS[opt.name](opt, schedule)
    if float(opt.grad_clip_norm) > 0:
        tx = optax.chain(optax.clip_by_global_norm(float(opt.grad_clip_norm)), tx)
    return tx, schedule
