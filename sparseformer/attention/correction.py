"""Correction: making selection and compression add up.

Each branch returns its attention in a mergeable form, `Branch(num, den, ls)`: the branch's
unnormalised numerator is `exp(ls) * num` and its denominator `exp(ls) * den` (an exact
softmax branch has `num = out`, `den = 1`, `ls = log-sum-exp`). A merge rule combines the
branches; exclusion (leaving the selected blocks out of the compressed branch) is done by the
compressions themselves; the regulariser lives in `compose`.

Merge rules (registry `CORRECTIONS`, key `model.attention.correction.merge`), each with the
extras `shares(branches, gates)` (each branch's share of a row's mass, `[B, H, T]` each) and
`rows(logws, gates, lses)`: the merged rows' unnormalised log-weights `[B, H, R, C]` on a chunk
of keys, from each branch's absolute log-weights there `[B, H, R, C]` and its row normaliser
over all the keys `lses` `[B, H, R]` (the regulariser evaluates the keys chunk by chunk):
  lse        one softmax normaliser over both branches: exact where the compression is exact
  gated_sum  NSA's gated sum of separately normalised branch outputs
  sum        the naive sum used when correction is off: each branch normalised on its own and
             the outputs added, so the pairs both branches cover are counted twice
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp

from sparseformer.attention.dense import LOG0
from sparseformer.attention.registry import CORRECTIONS

LOG_FLOOR = -40.0  # log-probability given to keys an approximation leaves out, in the KL


class Branch(NamedTuple):
    num: jax.Array  # [B, H, T, D] float32, or the inputs' dtype (the fused kernel's output)
    den: jax.Array  # [B, H, T] float32 (may be <= 0 for a low-rank estimate after exclusion)
    ls: jax.Array  # [B, H, T] float32 log scale

    @classmethod
    def from_softmax(cls, out: jax.Array, lse: jax.Array) -> "Branch":
        return cls(out, (lse > LOG0 / 2).astype(jnp.float32), lse)

    def normalised(self) -> jax.Array:
        return weighted_sum((self.num,), (_inverse(self.den),))


def _inverse(den: jax.Array) -> jax.Array:
    """`1 / den` where `den > 0`, else 0 (a row the branch gives nothing)."""
    ok = den > 0
    return jnp.where(ok, 1.0 / jnp.where(ok, den, 1.0), 0.0)


@jax.custom_vjp
def weighted_sum(nums: tuple[jax.Array, ...], weights: tuple[jax.Array, ...]) -> jax.Array:
    """`sum_i weights_i[..., None] * nums_i` in float32: how every merge rule combines branches.

    `nums [B, H, T, D]` (any float dtype), `weights [B, H, T]` float32. Written with its own VJP
    so the backward pass keeps only the branch outputs (which the branches keep anyway) and the
    `[B, H, T]` weights: automatic differentiation of the merge kept several float32 `[B, H, T, D]`
    products and quotients (the merged numerator, the division, its mask), the largest part of
    the merge's memory. The weights themselves (softmax shares, gates, inverse denominators) are
    small and differentiated by JAX as usual."""
    return _weighted_sum(nums, weights)


def _weighted_sum(nums, weights):
    out = weights[0][..., None] * nums[0].astype(jnp.float32)
    for n, w in zip(nums[1:], weights[1:]):
        out = out + w[..., None] * n.astype(jnp.float32)
    return out


def _weighted_sum_fwd(nums, weights):
    return _weighted_sum(nums, weights), (nums, weights)


def _weighted_sum_bwd(res, d_out):
    nums, weights = res
    d_out = d_out.astype(jnp.float32)
    d_nums = tuple((w[..., None] * d_out).astype(n.dtype) for n, w in zip(nums, weights))
    d_weights = tuple(
        jnp.sum(d_out * n.astype(jnp.float32), axis=-1).astype(w.dtype)
        for n, w in zip(nums, weights)
    )
    return d_nums, d_weights


weighted_sum.defvjp(_weighted_sum_fwd, _weighted_sum_bwd)


def gate_values(gate_logits: jax.Array | None, n: int) -> list[jax.Array]:
    """Per-branch gates, each `[1, H, 1]`, from logits `[H, n]` (ones when there are no gates)."""
    if gate_logits is None:
        return [jnp.ones((1, 1, 1), jnp.float32)] * n
    g = jax.nn.sigmoid(gate_logits.astype(jnp.float32))
    return [g[None, :, i, None] for i in range(n)]


def _rows_lse(logws, gates, lses):
    """Approximate attention rows under one normaliser: absolute weights add up."""
    return jax.nn.logsumexp(jnp.stack([lw + jnp.log(g)[..., None] for lw, g in zip(logws, gates)]), axis=0)


def _rows_mixture(logws, gates, lses):
    """Rows of a (gated) sum of separately normalised branches (`lses`: each branch's normaliser)."""
    parts = [lw - ls[..., None] + jnp.log(g)[..., None] for lw, ls, g in zip(logws, lses, gates)]
    return jax.nn.logsumexp(jnp.stack(parts), axis=0)


def _shares_lse(branches, gates):
    """Each branch's share `[B, H, T]` of the merged row's mass under one normaliser."""
    m = jax.lax.stop_gradient(jnp.max(jnp.stack([br.ls for br in branches]), axis=0))
    w = [g * jnp.exp(br.ls - m) * jnp.maximum(br.den, 0.0) for br, g in zip(branches, gates)]
    total = sum(w)
    return [jnp.where(total > 0, wi / jnp.where(total > 0, total, 1.0), 0.0) for wi in w]


def _shares_mixture(branches, gates):
    """Each branch's share of a (gated) sum of separately normalised branches: its gate among the
    gates of the branches that attend to anything in that row."""
    w = [jnp.broadcast_to(g, br.den.shape) * (br.den > 0) for br, g in zip(branches, gates)]
    total = sum(w)
    return [jnp.where(total > 0, wi / jnp.where(total > 0, total, 1.0), 0.0) for wi in w]


@CORRECTIONS.register("lse", exact_when_full=True, extras={"rows": _rows_lse, "shares": _shares_lse})
def lse_merge(branches: Sequence[Branch], gates) -> jax.Array:
    """One normaliser: `sum_i g_i e^{ls_i} num_i / sum_i g_i e^{ls_i} den_i`."""
    m = jax.lax.stop_gradient(jnp.max(jnp.stack([br.ls for br in branches]), axis=0))
    scales = [g * jnp.exp(br.ls - m) for br, g in zip(branches, gates)]
    inv_den = _inverse(sum(w * br.den for w, br in zip(scales, branches)))
    return weighted_sum(tuple(br.num for br in branches), tuple(w * inv_den for w in scales))


@CORRECTIONS.register("gated_sum", extras={"rows": _rows_mixture, "shares": _shares_mixture})
def gated_sum(branches: Sequence[Branch], gates) -> jax.Array:
    """NSA: `sum_i g_i * out_i`, each branch normalised on its own."""
    weights = tuple(g * _inverse(br.den) for br, g in zip(branches, gates))
    return weighted_sum(tuple(br.num for br in branches), weights)


@CORRECTIONS.register("sum", extras={"rows": _rows_mixture, "shares": _shares_mixture})
def naive_sum(branches: Sequence[Branch], gates) -> jax.Array:
    """The naive sum (correction off): `sum_i out_i`; both branches count the selected pairs."""
    return weighted_sum(tuple(br.num for br in branches), tuple(_inverse(br.den) for br in branches))


def kl_terms(logp_dense: jax.Array, logp_approx: jax.Array, keys: jax.Array | None = None) -> jax.Array:
    """KL(dense || approx) summed over some keys of each row, `[B, H, R]`, from `[B, H, R, C]`
    log-probabilities normalised over all the keys (so that chunks of keys add up); `keys`
    `[C]` (None: all) picks the keys that count."""
    p = jnp.exp(logp_dense)
    use = p > 0 if keys is None else (p > 0) & keys
    return jnp.sum(jnp.where(use, p * (logp_dense - jnp.maximum(logp_approx, LOG_FLOOR)), 0.0), axis=-1)


def kl_rows(kl: jax.Array, row_ok: jax.Array, *, per_head: bool = False) -> jax.Array:
    """Mean over valid rows of the per-row KL(dense || approx) `[B, H, R]` (`kl_terms` over all
    keys). `per_head`: the mean of each head, `[H]`."""
    w = jnp.broadcast_to(row_ok, kl.shape).astype(jnp.float32)
    axes = (0, 2) if per_head else None
    return jnp.sum(kl * w, axis=axes) / jnp.maximum(jnp.sum(w, axis=axes), 1.0)
