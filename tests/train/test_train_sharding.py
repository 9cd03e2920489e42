"""Mesh, logical-axis rules, sharded creation, and a 2x4 run matching a single-device run."""

import json
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

sys.path.insert(0, str(Path(__file__).parent))
import toy  # noqa: E402

from sparseformer.train import loop, optim, sharding, train_and_evaluate  # noqa: E402


def test_mesh_shape_fills_and_refuses():
    assert sharding.mesh_shape(-1, 4, 8) == (2, 4)
    assert sharding.mesh_shape(2, -1, 8) == (2, 4)
    assert sharding.mesh_shape(1, 1, 1) == (1, 1)
    for bad in [(-1, -1), (3, -1), (2, 2), (0, 1)]:
        with pytest.raises(ValueError, match="mesh"):
            sharding.mesh_shape(*bad, 8)


def test_logical_to_spec_replicates_what_does_not_divide():
    mesh = sharding.make_mesh(2, 4)
    rules = sharding.rules_dict((("embed", None), ("mlp", "model"), ("heads", "model"), ("batch", "data")))
    assert sharding.logical_to_spec(("embed", "mlp"), (16, 32), rules, mesh) == P(None, "model")
    assert sharding.logical_to_spec(("embed", "mlp"), (16, 6), rules, mesh) == P()  # 6 % 4 != 0
    assert sharding.logical_to_spec(("mlp", "heads"), (8, 8), rules, mesh) == P("model")  # one use per axis
    assert sharding.logical_to_spec(None, (3,), rules, mesh) == P()
    with pytest.raises(ValueError, match="logical_axis_rules"):
        sharding.rules_dict((("embed", "tensor"),))


def test_state_is_created_sharded_by_the_rules():
    config = toy.toy_config(**{"mesh.data": 2, "mesh.model": 4})
    rt = loop._Runtime(config, toy.COMPONENTS, sharding.make_mesh(2, 4))
    state = rt.plan.init()
    params = state.params
    assert params["up"]["kernel"].sharding.spec == P(None, "model")  # ('embed', 'mlp')
    assert params["up"]["kernel"].addressable_shards[0].data.shape == (16, 8)
    assert params["up"]["bias"].sharding.spec == P("model")
    assert params["down"]["kernel"].sharding.spec == P("model")  # ('mlp', 'embed')
    assert params["embed"].sharding.spec == P("model")  # ('vocab', 'embed')
    assert params["qkv"].sharding.spec == P(None, "model")  # ('embed', 'heads', 'kv')
    assert params["norm"]["scale"].sharding.spec == P()  # no names: replicated
    adam = state.opt_state[1][0]  # chain(clip, adamw): the moments follow their parameters
    assert adam.mu["up"]["kernel"].sharding.spec == P(None, "model")
    assert adam.count.sharding.spec == P()


def _losses(workdir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (workdir / "log.jsonl").read_text().splitlines()]


def test_2x4_mesh_matches_one_device(tmp_path):
    overrides = {"num_train_steps": 5, "checkpoint_every_steps": 100, "data.eval_batches": 1}
    one = train_and_evaluate(toy.toy_config(**overrides, **{"mesh.data": 1}), tmp_path / "one",
                             components=toy.COMPONENTS, devices=jax.devices()[:1])
    big = train_and_evaluate(toy.toy_config(**overrides, **{"mesh.data": 2, "mesh.model": 4}), tmp_path / "big",
                             components=toy.COMPONENTS)
    assert big["mesh"] == {"data": 2, "model": 4} and one["mesh"] == {"data": 1, "model": 1}
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "big")
    assert len(a) == len(b) == 5
    np.testing.assert_allclose(a, b, rtol=2e-5)
    assert a[-1] < a[0] + 0.5
    for key in ("accuracy", "fidelity", "steps_per_second", "peak_memory_bytes", "num_params", "final_loss",
                "peak_rss_bytes", "eval_loss", "wall_seconds"):
        assert key in big, key
    assert big["peak_memory_bytes"] > 0
    assert json.loads((tmp_path / "big" / "metrics.json").read_text())["num_train_steps"] == 5
    assert list((tmp_path / "big" / "tensorboard").iterdir())


def test_optimizer_registries_refuse_unknown_names():
    opt = toy.toy_config().optimizer
    for name in optim.OPTIMIZERS:
        for schedule in optim.SCHEDULES:
            opt.name, opt.schedule = name, schedule
            tx, lr = optim.make_optimizer(opt, num_train_steps=10)
            assert float(lr(0)) == 0.0 and float(lr(2)) > 0
    opt.name = "lamb"
    with pytest.raises(ValueError, match="optimizer.name: 'lamb' is not one of adamw, adafactor, sgd"):
        optim.make_optimizer(opt, num_train_steps=10)


def test_gradient_accumulation_matches_one_big_batch():
    from sparseformer.train import step as step_lib

    config = toy.toy_config(**{"model.dropout": 0.0})
    rt = loop._Runtime(config, toy.COMPONENTS, sharding.make_mesh(8, 1))
    batch = rt.shard(next(toy.ToyTask().pipeline(config, "train", seed=0)))
    out = []
    for k in (1, 2, 4):
        fn = step_lib.make_train_step(rt.plan.graphdef, toy.COMPONENTS.kind, rt.tx, rt.schedule, grad_accum_steps=k)
        new, metrics = jax.jit(fn)(rt.plan.init(), batch, jax.random.key(0))
        out.append((jax.device_get(new.params), step_lib.finalize(jax.device_get(metrics))))
    for params, metrics in out[1:]:
        np.testing.assert_allclose(metrics["loss"], out[0][1]["loss"], rtol=1e-5)
        np.testing.assert_allclose(metrics["grad_norm"], out[0][1]["grad_norm"], rtol=1e-4)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), params, out[0][0])
