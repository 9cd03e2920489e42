"""Cheap counter-based randomness for the attention core.

`jax.random.uniform`/`normal` lower to the threefry hash, whose HLO takes XLA's CPU backend
several seconds to compile at every call site; attention draws random blocks, rows and
features in every layer, so that cost multiplied by layers dominated model compile times.
Here the key's raw bits seed an integer hash (Wellons' "lowbias32") of the element index:
one multiply-xorshift chain per element, statistically fine for choosing blocks, rows and
random features, and nearly free to compile. Same key, same draws; another key, other draws.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _mix(x: jax.Array) -> jax.Array:
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def seed(key: jax.Array, stream: int) -> jax.Array:
    """A uint32 scalar for one purpose (`stream`) of one key."""
    data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    data = data.reshape(-1).astype(jnp.uint32)
    s = jnp.uint32(stream * 0x9E3779B9 & 0xFFFFFFFF)
    for i in range(data.shape[0]):
        s = _mix(s ^ data[i])
    return s


def uniform_at(key: jax.Array, index: jax.Array, stream: int) -> jax.Array:
    """float32 in [0, 1): element `index` of the stream (any integer array; same shape out).

    `uniform(key, shape, stream)` is `uniform_at` of `arange(prod(shape))`, so a part of a large
    table (the rows of some query blocks, say) can be drawn without drawing the whole table."""
    bits = _mix(index.astype(jnp.uint32) * jnp.uint32(0x9E3779B9) + seed(key, stream))
    bits = _mix(bits ^ seed(key, stream + 0x5BD1E995))
    return (bits >> 8).astype(jnp.float32) * (1.0 / (1 << 24))


def uniform(key: jax.Array, shape: tuple[int, ...], stream: int) -> jax.Array:
    """float32 in [0, 1) of `shape`."""
    n = int(np.prod(shape)) if shape else 1
    return uniform_at(key, jnp.arange(n, dtype=jnp.uint32), stream).reshape(shape)


def normal(key: jax.Array, shape: tuple[int, ...], stream: int) -> jax.Array:
    """Standard normal float32 (Box-Muller)."""
    u1 = uniform(key, shape, stream)
    u2 = uniform(key, shape, stream + 1)
    return jnp.sqrt(-2.0 * jnp.log1p(-u1)) * jnp.cos(2.0 * jnp.pi * u2)


def stratified(key: jax.Array, total: int, count: int, stream: int, batch: tuple[int, ...] = ()) -> jax.Array:
    """`count` distinct sorted indices in `[0, total)`: one uniform draw in each of `count`
    equal strata (so they also spread over the range). Shape `batch + (count,)`."""
    width = total // count
    u = uniform(key, batch + (count,), stream)
    return jnp.arange(count) * width + jnp.minimum((u * width).astype(jnp.int32), width - 1)
