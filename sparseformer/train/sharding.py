"""The device mesh, logical-axis rules, and the shardings of parameters, optimizer state and batches.

The mesh always has the two axes `('data', 'model')` with Auto axis types (the classic pjit
behaviour: XLA propagates shardings through the step; we only pin inputs and outputs).
Parameters carry logical axis names (`nnx.with_partitioning(init, ('embed', 'mlp'))`); the
config's `logical_axis_rules` maps each name to a mesh axis or to `None` (replicated).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES: tuple[str, str] = ("data", "model")
log = logging.getLogger(__name__)

Rules = Sequence[tuple[str, str | None]]


def mesh_shape(data: int, model: int, num_devices: int) -> tuple[int, int]:
    """Sizes of the `('data', 'model')` axes; one `-1` takes the devices left over."""
    if data == -1 and model == -1:
        raise ValueError("mesh: at most one of mesh.data and mesh.model may be -1")
    for key, size in (("mesh.data", data), ("mesh.model", model)):
        if size != -1 and size < 1:
            raise ValueError(f"{key}: {size} must be a positive size or -1 (fill with the remaining devices)")
    known = (data if data != -1 else 1) * (model if model != -1 else 1)
    if num_devices % known:
        raise ValueError(f"mesh: data={data} x model={model} does not divide the {num_devices} devices")
    data = num_devices // known if data == -1 else data
    model = num_devices // known if model == -1 else model
    if data * model != num_devices:
        raise ValueError(f"mesh: data={data} x model={model} = {data * model} but there are {num_devices} devices")
    return data, model


def make_mesh(data: int = -1, model: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `('data', 'model')` mesh with Auto axes over `devices` (default: all devices of all processes)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(int(data), int(model), len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 2, devices=devices)


def rules_dict(rules: Rules) -> dict[str, str | None]:
    """`logical_axis_rules` as a dict; the first rule for a name wins, unknown mesh axes are refused."""
    out: dict[str, str | None] = {}
    for rule in rules:
        logical, axis = tuple(rule)
        if axis is not None and axis not in MESH_AXES:
            raise ValueError(f"logical_axis_rules: {logical!r} -> {axis!r}; mesh axes are {MESH_AXES} or None")
        out.setdefault(str(logical), axis)
    return out


def logical_to_spec(
    names: Sequence[str | None] | None, shape: Sequence[int], rules: Mapping[str, str | None], mesh: Mesh, what: str = ""
) -> P:
    """The `PartitionSpec` of an array with logical axis `names`, replicating what cannot be split.

    A dimension stays whole when its name has no rule, maps to `None`, maps to a mesh axis that an
    earlier dimension already uses, or does not divide evenly by that mesh axis (logged).
    """
    if not names:
        return P()
    if len(names) != len(shape):
        raise ValueError(f"{what}: logical axes {tuple(names)} do not match shape {tuple(shape)}")
    used: set[str] = set()
    spec: list[str | None] = []
    for name, dim in zip(names, shape):
        axis = rules.get(name) if name is not None else None
        if axis is not None and (axis in used or dim % mesh.shape[axis]):
            if dim % mesh.shape[axis]:
                log.info("%s: dimension %r of size %d does not divide by mesh axis %r (%d); replicated",
                         what, name, dim, axis, mesh.shape[axis])
            axis = None
        if axis is not None:
            used.add(axis)
        spec.append(axis)
    while spec and spec[-1] is None:
        spec.pop()
    return P(*spec)


def _path_str(path: tuple[Any, ...]) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def variable_specs(variables: nnx.State, rules: Rules, mesh: Mesh) -> dict[str, Any]:
    """Pure dict of `PartitionSpec`s for an (abstract) `nnx.State` whose Variables carry logical names."""
    table = rules_dict(rules)

    def spec(path: tuple[Any, ...], var: nnx.Variable) -> P:
        names = var.get_metadata().get("out_sharding")
        return logical_to_spec(names, var.shape, table, mesh, what=_path_str(path))

    specs = jax.tree_util.tree_map_with_path(spec, variables, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.to_pure_dict(specs) if isinstance(specs, nnx.State) else specs


def follow_param_specs(tree: Any, param_specs: Any, params_abstract: Any) -> Any:
    """Specs for a tree that mirrors the parameters somewhere inside (optimizer state).

    A leaf whose path ends with a parameter's path and has that parameter's shape gets the
    parameter's spec (Adam moments, momentum); everything else (counts, factored second moments)
    is replicated.
    """
    by_path: dict[tuple[str, ...], tuple[tuple[int, ...], P]] = {}
    flat_specs = jax.tree_util.tree_flatten_with_path(param_specs, is_leaf=lambda x: isinstance(x, P))[0]
    flat_abs = jax.tree_util.tree_leaves(params_abstract)
    for (path, spec), leaf in zip(flat_specs, flat_abs):
        by_path[tuple(_path_str((k,)) for k in path)] = (tuple(leaf.shape), spec)
    longest = max((len(k) for k in by_path), default=0)

    def spec_of(path: tuple[Any, ...], leaf: Any) -> P:
        keys = tuple(_path_str((k,)) for k in path)
        for n in range(min(longest, len(keys)), 0, -1):
            hit = by_path.get(keys[-n:])
            if hit is not None and hit[0] == tuple(np.shape(leaf)):
                return hit[1]
        return P()

    return jax.tree_util.tree_map_with_path(spec_of, tree)


def named(mesh: Mesh, specs: Any) -> Any:
    """`PartitionSpec` tree -> `NamedSharding` tree on `mesh`."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches are split over `data` along their first axis and replicated over `model`."""
    return NamedSharding(mesh, P("data"))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_batch_size(batch_size: int, mesh: Mesh, process_count: int, grad_accum_steps: int = 1) -> None:
    """The global batch must split over the data axis (per microbatch) and over the processes."""
    per = mesh.shape["data"] * grad_accum_steps
    if batch_size % per:
        raise ValueError(
            f"batch_size: {batch_size} must be a multiple of mesh.data ({mesh.shape['data']})"
            f" x optimizer.grad_accum_steps ({grad_accum_steps}) = {per}"
        )
    if batch_size % process_count:
        raise ValueError(f"batch_size: {batch_size} must be a multiple of the process count {process_count}")


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's numpy slice of the global batch -> global arrays split over `data`."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def describe(specs: Any) -> list[str]:
    """One line per sharded leaf, `path: spec` (for logs)."""
    flat = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, P))[0]
    return [f"{_path_str(p)}: {s}" for p, s in flat if s != P()]
