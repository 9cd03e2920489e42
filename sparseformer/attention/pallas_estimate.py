"""The key-exact importance estimates (`maxkey`, `lsekey`) fused into one Pallas (Triton) kernel.

Both score a mean query (one per query block, or per anchor sub-block) against every key, then
reduce each key block's `b` scores to one (max, or log-sum-exp). Written in XLA that is a matmul
holding `rows x S` scores per query block and a reduction after it, so `choose_blocks` scores a
few query blocks at a time in a loop: at 64K tokens a GPU ran 256 trips of it (about 7 kernels
each) for rsa. Here one program holds `ROWS` mean queries and walks the key blocks, reducing
each `[ROWS, b]` tile of scores on chip: one launch per choice chunk, and only the `[rows, m]`
result reaches memory. Same scores as `selection.maxkey_estimator` / `lsekey_estimator` (the same
products in float32; the sums in another order). Compiled on a GPU, interpreted elsewhere
(tests), like the exact kernel; the TPU keeps the XLA estimators.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from sparseformer.attention.dense import LOG0
from sparseformer.attention.pallas_kernel import _dot_t, _next_pow2, fixed_params, kernel_target, unsupported_reason

REDUCTIONS = {"maxkey": "max", "lsekey": "lse"}
"""Estimators this kernel computes, and how each reduces a key block's scores."""

ROWS = 64
"""Mean queries one program scores at most (fewer when the call has fewer)."""


def fused_estimator(estimator: str, block_size: int, head_dim: int) -> bool:
    """Whether `estimator` runs as this kernel: a key-exact one, with Triton at hand (the exact
    kernel's family, compiled or interpreted) and shapes a Triton tile takes."""
    family, _ = kernel_target()
    return (estimator in REDUCTIONS and family == "triton"
            and unsupported_reason(block_size, head_dim) is None)


def _kernel(q_ref, k_ref, *refs, block: int, num_key_blocks: int, reduction: str, has_mask: bool):
    """One program: `[rows, D]` mean queries against every key block, each block's scores reduced."""
    kmask_ref = refs[0] if has_mask else None
    o_ref = refs[-1]  # [m, rows]: one key block's reduced scores a row (a contiguous store)
    q = q_ref[...]

    def body(j, carry):
        keys = pl.ds(j * block, block)
        s = _dot_t(q, k_ref[keys, :])  # [rows, b], float32
        if has_mask:  # a padded key is never a block's best key, and adds no mass
            s = jnp.where(kmask_ref[keys][None, :] != 0, s, LOG0)
        top = jnp.max(s, axis=1)
        if reduction == "lse":
            top = top + jnp.log(jnp.sum(jnp.exp(s - top[:, None]), axis=1))
        o_ref[pl.ds(j, 1), :] = top[None, :]
        return carry

    lax.fori_loop(0, num_key_blocks, body, 0)


def block_scores(estimator: str, q_mean: jax.Array, k: jax.Array, kmask: jax.Array | None, block: int) -> jax.Array:
    """Scores `[B, H, N, m]` of `N` mean queries `q_mean` `[B, H, N, D]` against keys `k`
    `[B, H, S, D]` (`kmask` `[B, S]` or None), reduced per key block of `block` keys."""
    B, H, N, D = q_mean.shape
    S = k.shape[2]
    m = S // block
    rows = min(ROWS, max(16, _next_pow2(N)))  # a power of two, >= 16 for the matmul
    n_pad = -(-N // rows) * rows
    q_p = jnp.pad(q_mean, ((0, 0), (0, 0), (0, n_pad - N), (0, 0))) if n_pad > N else q_mean
    _, interpret = kernel_target()
    in_specs = [pl.BlockSpec((None, None, rows, D), lambda i, bb, h: (bb, h, i, 0)),
                pl.BlockSpec((None, None, S, D), lambda i, bb, h: (bb, h, 0, 0))]
    args = [q_p, k]
    if kmask is not None:
        in_specs.append(pl.BlockSpec((None, S), lambda i, bb, h: (bb, 0)))
        args.append(kmask.astype(jnp.int32))
    out = pl.pallas_call(
        functools.partial(_kernel, block=block, num_key_blocks=m, reduction=REDUCTIONS[estimator],
                          has_mask=kmask is not None),
        grid=(n_pad // rows, B, H),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, None, m, rows), lambda i, bb, h: (bb, h, 0, i)),
        out_shape=jax.ShapeDtypeStruct((B, H, m, n_pad), jnp.float32),
        interpret=interpret,
        compiler_params=fixed_params(interpret),
        name=f"sparseformer_{estimator}_scores",
    )(*args)
    return jnp.swapaxes(out[..., :N], 2, 3)


def sub_block_scores(estimator: str, q_est: jax.Array, p: int, kb: jax.Array, kmask_b: jax.Array | None) -> jax.Array:
    """`selection.sub_block_scores` of a key-exact estimator, fused: `[B, H, n, p, m]` for query
    rows `q_est` `[B, H, n, r, D]` cut into `p` sub-blocks, key blocks `kb` `[B, H, m, b, D]`."""
    B, H, n, r, D = q_est.shape
    m, b = kb.shape[2], kb.shape[3]
    q_mean = jnp.mean(q_est.reshape(B, H, n * p, r // p, D), axis=3)  # as the XLA estimators take it
    kmask = None if kmask_b is None else kmask_b.reshape(B, m * b)
    scores = block_scores(estimator, q_mean, kb.reshape(B, H, m * b, D), kmask, b)
    return scores.reshape(B, H, n, p, m)
