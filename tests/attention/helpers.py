"""Reusable checks for attention variants (the tests and the notebooks both use them)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from sparseformer.attention import attend, init_params


def random_qkv(key, B=2, T=64, H=2, D=16, scale=1.5, dtype=jnp.float32, S=None):
    kq, kk, kv = jax.random.split(key, 3)
    S = T if S is None else S
    q = jax.random.normal(kq, (B, T, H, D)) * scale
    k = jax.random.normal(kk, (B, S, H, D)) * scale
    v = jax.random.normal(kv, (B, S, H, D))
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)


def rel_error(a, b) -> float:
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def run(config, q, k, v, *, causal=False, kv_mask=None, rng=None, query_block=None):
    """`attend` under `jax.jit` (one compilation instead of many eager dispatches)."""
    params = init_params(config, jax.random.key(7), num_heads=q.shape[2], head_dim=q.shape[3], max_len=k.shape[1])

    @jax.jit
    def f(q, k, v, kv_mask, rng, params):
        return attend(q, k, v, config, params=params, causal=causal, kv_mask=kv_mask, rng=rng, query_block=query_block)

    return f(q, k, v, kv_mask, rng, params)


def loss_by_kernel(config, q, k, v, *, causal=False, kv_mask=None, kernels=("pallas", "scan")):
    """For each exact kernel: the jaxpr text of one loss through `attend` (`sum(out * arange(D))`
    plus the regulariser), its output and its (q, k, v) gradients, from the same parameters and rng,
    so kernels (and what they fuse) are held to each other."""
    params = init_params(config, jax.random.key(7), num_heads=q.shape[2], head_dim=q.shape[3], max_len=k.shape[1])
    results = {}
    for kernel in kernels:
        config.selection.kernel = kernel

        def loss(q, k, v):
            out, aux = attend(q, k, v, config, params=params, causal=causal, kv_mask=kv_mask, rng=jax.random.key(4))
            return jnp.sum(out * jnp.arange(q.shape[-1])) + aux["aux_loss"], out

        jaxpr = str(jax.make_jaxpr(loss)(q, k, v))
        (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
        results[kernel] = jaxpr, out, grads
    return results


def reference(q, k, v, *, causal=False, kv_mask=None):
    """`jax.nn.dot_product_attention`, with fully masked rows set to zero (its convention differs)."""
    mask = None if kv_mask is None else kv_mask[:, None, None, :]
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal)
    if kv_mask is not None:
        out = jnp.where(jnp.any(kv_mask, -1)[:, None, None, None], out, 0.0)
    return out


def full_budget(config: ml_collections.ConfigDict, seq_len: int) -> ml_collections.ConfigDict:
    """The same config with a window that covers every block."""
    config = ml_collections.ConfigDict(config.to_dict())
    config.selection.window = seq_len // config.selection.block_size - 1
    config.selection.top_k = 0
    config.selection.random_blocks = 0
    return config


def future_gradient(config, q, k, v, t, *, params=None, kv_mask=None):
    """Largest |d out[t] / d (q, k, v)[t+1:]|: exactly zero for causal attention. `t` is a row or
    a sequence of rows (the largest over them); the gradient is one compiled program whose row is
    an argument, so every row reuses it (eager dispatch of the backward pass is many times slower)."""

    @jax.jit
    def largest(q, k, v, row, params, kv_mask):
        def f(q, k, v):
            out, _ = attend(q, k, v, config, params=params, causal=True, kv_mask=kv_mask)
            return jnp.sum(jax.lax.dynamic_index_in_dim(out, row, 1, keepdims=False) * jnp.arange(1, out.shape[-1] + 1))

        def after_row(g):  # the largest |g| at positions after `row` (axis 1)
            return jnp.max(jnp.where((jnp.arange(g.shape[1]) > row)[None, :, None, None], jnp.abs(g), 0))

        return jnp.max(jnp.stack([after_row(g) for g in jax.grad(f, argnums=(0, 1, 2))(q, k, v)]))

    rows = [t] if isinstance(t, int) else list(t)
    return max(float(largest(q, k, v, jnp.int32(row), params, kv_mask)) for row in rows)


def causal_presets(make_config, seq_len: int) -> list[str]:
    """The presets whose config `make_config(name)` validates for a causal call of `seq_len`."""
    from sparseformer.attention import presets, validate

    out = []
    for name in presets.names():
        try:
            validate(make_config(name), causal=True, seq_len=seq_len)
        except ValueError:
            continue
        out.append(name)
    return out
