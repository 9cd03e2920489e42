"""The train step compiles with XLA's deterministic ops on a GPU (resumed runs equal uninterrupted
ones there too), and nowhere else."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from sparseformer.train.loop import DETERMINISTIC_GPU_OPTIONS, compile_step


def _scatter_step():
    # the gradient of a gather is a scatter-add: what atomics make non-deterministic on a GPU
    f = jax.jit(jax.grad(lambda table, ids: jnp.sum(table[ids] ** 2)))
    return f.lower(jnp.ones((8, 4)), jnp.array([1, 1, 3, 5]))


def test_the_option_is_one_this_xla_knows():
    # compiled with it for real (the option is shared by every backend's XLA) and without
    # compile_step's fallback, so a misspelt or retired option name fails here, not on a GPU
    compiled = _scatter_step().compile(compiler_options=DETERMINISTIC_GPU_OPTIONS)
    grad = compiled(jnp.ones((8, 4)), jnp.array([1, 1, 3, 5]))
    assert float(grad[1, 0]) == 4.0 and float(grad[0, 0]) == 0.0


class _Lowered:
    """Records its compile options; raises `error` with them (`always`: without them too)."""

    def __init__(self, error=None, always=False):
        self.calls, self.error, self.always = [], error, always

    def compile(self, compiler_options=None):
        self.calls.append(compiler_options)
        if self.error and (compiler_options or self.always):
            raise self.error
        return "compiled"


@pytest.mark.parametrize("backend, expected", [("gpu", DETERMINISTIC_GPU_OPTIONS), ("cpu", None), ("tpu", None)])
def test_only_the_gpu_step_asks_for_it(backend, expected):
    lowered = _Lowered()
    assert compile_step(lowered, backend=backend) == "compiled"
    assert lowered.calls == [expected]


def test_an_xla_without_the_option_compiles_without_it(capsys):
    lowered = _Lowered(RuntimeError("INVALID_ARGUMENT: No such compile option: 'xla_gpu_deterministic_ops'"))
    assert compile_step(lowered, backend="gpu") == "compiled"
    assert lowered.calls == [DETERMINISTIC_GPU_OPTIONS, None]
    assert "resumed run may differ" in capsys.readouterr().out


def test_an_error_of_the_step_itself_is_raised():
    lowered = _Lowered(RuntimeError("RESOURCE_EXHAUSTED: out of memory"), always=True)
    with pytest.raises(RuntimeError, match="RESOURCE_EXHAUSTED"):
        compile_step(lowered, backend="gpu")
    assert lowered.calls == [DETERMINISTIC_GPU_OPTIONS, None]
