"""The merge rules through `correction.weighted_sum` (its own VJP): the same values and gradients as
the plain formulas, and what the backward pass keeps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src import ad_checkpoint

from sparseformer.attention import correction
from sparseformer.attention.correction import CORRECTIONS, Branch, weighted_sum
from tests.attention.helpers import rel_error

B, H, T, D = 2, 3, 8, 4


def _safe_divide(num, den):
    ok = den > 0
    return jnp.where(ok[..., None], num / jnp.where(ok, den, 1.0)[..., None], 0.0)


def _reference(rule, nums, dens, lss, gates):
    """The merges as written before `weighted_sum`: automatic differentiation of the formulas."""
    if rule == "lse":
        m = jax.lax.stop_gradient(jnp.max(jnp.stack(lss), axis=0))
        scales = [g * jnp.exp(ls - m) for ls, g in zip(lss, gates)]
        num = sum(w[..., None] * n.astype(jnp.float32) for w, n in zip(scales, nums))
        return _safe_divide(num, sum(w * d for w, d in zip(scales, dens)))
    gates = gates if rule == "gated_sum" else [1.0] * len(nums)
    return sum(jnp.asarray(g)[..., None] * _safe_divide(n.astype(jnp.float32), d) for n, d, g in zip(nums, dens, gates))


def _branches(dtype):
    keys = jax.random.split(jax.random.key(0), 6)
    nums = [jax.random.normal(keys[i], (B, H, T, D)).astype(dtype) for i in range(2)]
    # an exact branch (den 0 or 1: a row with nothing allowed) and a low-rank one whose
    # denominator is <= 0 on some rows (Scatterbrain's exclusion can do that)
    den0 = jnp.ones((B, H, T)).at[0, :, 2].set(0.0)
    den1 = jax.random.normal(keys[2], (B, H, T)) + 1.0
    lss = [jax.random.normal(keys[3 + i], (B, H, T)) for i in range(2)]
    gates = [jax.nn.sigmoid(jax.random.normal(keys[5], (1, H, 1))) * s for s in (1.0, 0.7)]
    return nums, [den0, den1], lss, gates


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("rule", ["lse", "gated_sum", "sum"])
def test_merge_rules_equal_the_plain_formulas_with_gradients(rule, dtype):
    nums, dens, lss, gates = _branches(dtype)
    w = jax.random.normal(jax.random.key(9), (B, H, T, D))

    def loss_new(nums, dens, lss, gates):
        out = CORRECTIONS.get(rule).fn([Branch(n, d, s) for n, d, s in zip(nums, dens, lss)], gates)
        return jnp.sum(out * w), out

    def loss_ref(nums, dens, lss, gates):
        out = _reference(rule, nums, dens, lss, gates)
        return jnp.sum(out * w), out

    (_, out_n), g_n = jax.value_and_grad(loss_new, argnums=(0, 1, 2, 3), has_aux=True)(nums, dens, lss, gates)
    (_, out_r), g_r = jax.value_and_grad(loss_ref, argnums=(0, 1, 2, 3), has_aux=True)(nums, dens, lss, gates)
    assert out_n.dtype == jnp.float32
    assert rel_error(out_n, out_r) < 1e-6
    for a, c in zip(jax.tree.leaves(g_n), jax.tree.leaves(g_r)):
        assert a.shape == c.shape and a.dtype == c.dtype
        tol = 1e-5 if dtype == jnp.float32 else 1e-2
        scale = float(jnp.max(jnp.abs(c.astype(jnp.float32)))) + 1e-6
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(c, np.float32), atol=tol * scale, rtol=0)


def test_a_row_no_branch_covers_is_zero_with_zero_gradients():
    nums, dens, lss, gates = _branches(jnp.float32)
    dens = [d.at[1, 0, 5].set(0.0) for d in dens]  # row (1, 0, 5): both branches give nothing

    def loss(nums):
        return jnp.sum(CORRECTIONS.get("lse").fn([Branch(n, d, s) for n, d, s in zip(nums, dens, lss)], gates))

    out = CORRECTIONS.get("lse").fn([Branch(n, d, s) for n, d, s in zip(nums, dens, lss)], gates)
    assert float(jnp.max(jnp.abs(out[1, 0, 5]))) == 0.0
    for g in jax.grad(loss)(nums):
        assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.max(jnp.abs(g[1, 0, 5]))) == 0.0


def test_the_merge_keeps_only_the_branch_outputs_and_row_weights():
    """Automatic differentiation of `num / den` kept float32 `[B, H, T, D]` products, quotients and
    masks; `weighted_sum` keeps the branch outputs (which their branches keep anyway) and `[B, H, T]`
    weights."""
    nums, dens, lss, gates = _branches(jnp.bfloat16)

    def loss(n0, n1):
        out = CORRECTIONS.get("lse").fn([Branch(n0, dens[0], lss[0]), Branch(n1, dens[1], lss[1])], gates)
        return jnp.sum(out)

    saved = ad_checkpoint.saved_residuals(loss, *nums)
    big = [(str(a), why) for a, why in saved if a.shape == (B, H, T, D) and not why.startswith("from the argument")]
    assert big == []
    assert correction.weighted_sum is weighted_sum
