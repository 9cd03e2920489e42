"""The train state as a pure pytree, created already sharded.

`TrainState` holds the step, the parameters (a pure dict: `nnx.to_pure_dict(state)`), the
model's other variables (`extra`, usually empty) and the optax state. The model's structure
(`nnx.GraphDef`) stays outside, static: the step rebuilds the model with `nnx.merge`.

Creation never materialises unsharded parameters: shapes come from `nnx.eval_shape`, shardings
from the logical-axis rules, and one jitted init writes every array where it belongs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from sparseformer.train import sharding as sharding_lib


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array  # int32 scalar: the number of optimizer updates done
    params: Any  # pure dict of float32 arrays
    extra: Any  # pure dict of the model's non-Param variables (often empty)
    opt_state: Any  # optax state

    def as_dict(self) -> dict[str, Any]:
        """A plain dict (what the checkpoint stores)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclasses.dataclass(frozen=True)
class StatePlan:
    """Everything known about the train state before any array exists."""

    graphdef: nnx.GraphDef  # the model's static structure
    abstract: TrainState  # ShapeDtypeStruct leaves carrying their NamedSharding (an orbax restore target)
    shardings: TrainState  # NamedSharding per leaf
    param_specs: Any  # PartitionSpec per parameter (pure dict)
    num_params: int
    init: Callable[[], TrainState]  # jitted: creates the state directly in its shardings


def _split(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    graphdef, params, extra = nnx.split(model, nnx.Param, ...)
    return graphdef, params, extra


def abstract_model(build: Callable[[], nnx.Module]) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """GraphDef and abstract (shape-only) params/extra, with the Variables' logical-axis metadata."""
    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(build)
    return _split(model)


_FAST_COMPILE = {"xla_backend_optimization_level": 0}  # CPU only, where the gain was measured


def plan_train_state(
    build: Callable[[], nnx.Module],
    tx: optax.GradientTransformation,
    mesh: Mesh,
    rules: sharding_lib.Rules,
) -> StatePlan:
    """Shapes, shardings and a jitted sharded init for the state of the model `build()` returns."""
    graphdef, abs_params, abs_extra = abstract_model(build)
    param_specs = sharding_lib.variable_specs(abs_params, rules, mesh)
    extra_specs = sharding_lib.variable_specs(abs_extra, rules, mesh)

    def init() -> TrainState:
        with nnx.use_eager_sharding(False):
            model = build()
        _, params, extra = _split(model)
        params, extra = nnx.to_pure_dict(params), nnx.to_pure_dict(extra)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, extra=extra, opt_state=tx.init(params))

    shapes = jax.eval_shape(init)
    specs = TrainState(
        step=P(),
        params=param_specs,
        extra=extra_specs,
        opt_state=sharding_lib.follow_param_specs(shapes.opt_state, param_specs, shapes.params),
    )
    shardings = sharding_lib.named(mesh, specs)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)
    num_params = int(sum(np.prod(x.shape) for x in jax.tree.leaves(shapes.params)))
    jitted = jax.jit(init, out_shardings=shardings)

    def init_sharded() -> TrainState:
        with jax.set_mesh(mesh):
            # It runs once: compile it fast, not well (XLA's CPU backend spends seconds optimising
            # the random initialisers otherwise). The values do not depend on the level.
            options = _FAST_COMPILE if jax.default_backend() == "cpu" else None
            return jitted.lower().compile(compiler_options=options)()

    return StatePlan(graphdef, abstract, shardings, param_specs, num_params, init_sharded)
