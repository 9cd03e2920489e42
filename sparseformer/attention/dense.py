"""Exact softmax attention: the reference every component is tested against.

Layout inside the package is head-major, `[B, H, T, D]`; `attend` transposes from the
public `[B, T, H, D]` layout once. Logits and softmax statistics are float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# "log of zero" as a finite number: -inf would turn 0 * inf into NaN in gradients.
LOG0 = -1e30


def key_masks(
    q_pos: jax.Array, k_pos: jax.Array, *, causal: bool, kv_mask: jax.Array | None
) -> jax.Array | None:
    """Boolean `[B or 1, 1, T, S]` mask of allowed pairs (None when all are allowed)."""
    mask = None
    if causal:
        mask = (q_pos[:, None] >= k_pos[None, :])[None, None]
    if kv_mask is not None:
        km = kv_mask[:, None, None, :]
        mask = km if mask is None else mask & km
    return mask


def masked_softmax(
    s: jax.Array, mask: jax.Array | None, values: jax.Array, spec: str
) -> tuple[jax.Array, jax.Array]:
    """Softmax of logits `s` over their last axis (masked), applied to `values` by `spec`.

    Returns the float32 output (zero on rows with nothing allowed) and the row log-sum-exp
    (LOG0 on such rows), which is what an exact merge of several branches needs.
    """
    if mask is not None:
        s = jnp.where(mask, s, LOG0)
    m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
    p = jnp.exp(s - m)
    if mask is not None:
        p = jnp.where(mask, p, 0.0)
    l = jnp.sum(p, axis=-1)
    out = jnp.einsum(spec, p, values.astype(jnp.float32))
    has = l > 0
    safe = jnp.where(has, l, 1.0)
    return out / safe[..., None], jnp.where(has, m[..., 0] + jnp.log(safe), LOG0)


def softmax_delta(out: jax.Array, d_out: jax.Array, d_lse: jax.Array) -> jax.Array:
    """Flash attention's backward statistic `rowsum(d_out * out)` minus the log-sum-exp's own
    cotangent, float32 `[..., T]` (any input dtype): `ds = p * (d_out . v - softmax_delta)`."""
    return jnp.einsum("...d,...d->...", d_out, out, preferred_element_type=jnp.float32) - d_lse


def dense_attention(
    q_BHTD: jax.Array,
    k_BHSD: jax.Array,
    v_BHSD: jax.Array,
    *,
    causal: bool = False,
    kv_mask: jax.Array | None = None,
    q_offset: jax.Array | int = 0,
) -> tuple[jax.Array, jax.Array]:
    """Exact attention. `q` must already be scaled by 1/sqrt(D).

    Returns:
      out `[B, H, T, D]` float32 (zeros on rows with no allowed key) and the row
      log-sum-exp `[B, H, T]` (LOG0 on such rows).
    """
    T, S = q_BHTD.shape[2], k_BHSD.shape[2]
    s_BHTS = jnp.einsum("bhtd,bhsd->bhts", q_BHTD, k_BHSD, preferred_element_type=jnp.float32)
    mask = key_masks(jnp.arange(T) + q_offset, jnp.arange(S), causal=causal, kv_mask=kv_mask)
    return masked_softmax(s_BHTS, mask, v_BHSD, "bhts,bhsd->bhtd")


# `dense_attention_chunked` splits the keys into this many chunks (a fixed count: the transient
# logits are 1/16 of the rows' full `R x S`, and a GPU runs a short loop of 16 steps at any length).
KEY_CHUNKS = 16


def dense_attention_chunked(
    q_BHRD: jax.Array, k_BSHD: jax.Array, v_BSHD: jax.Array, *, kv_mask: jax.Array | None = None, chunk: int | None = None
) -> tuple[jax.Array, jax.Array]:
    """`dense_attention` (bidirectional) for a few query rows against many keys, in chunks of keys.

    `q [B, H, R, D]` scaled by 1/sqrt(D); `k, v [B, S, Hk, D]` in the public layout (`H % Hk == 0`).
    Each chunk is an exact softmax over its keys, read from `k`/`v` in place by a dynamic slice (made
    head-major inside the chunk) and rematerialised in the backward pass; the chunks are merged by
    their log-sum-exps. So the backward pass keeps the caller's k and v and each chunk's
    `[B, H, R, D]` output and `[B, H, R]` log-sum-exp, not the `R x S` probabilities (BigBird's
    global query rows see every key: 256 MiB of float32 probabilities for 128 rows at 64K tokens
    and 8 heads) nor head-major copies of k and v. `chunk` divides S; by default `S / KEY_CHUNKS`
    (one chunk when S is not a multiple of `KEY_CHUNKS` or under 1024 keys)."""
    S = k_BSHD.shape[1]
    group = q_BHRD.shape[1] // k_BSHD.shape[2]
    if chunk is None:
        chunk = S // KEY_CHUNKS if S % KEY_CHUNKS == 0 and S >= 1024 else S
    if S % chunk:
        raise ValueError(f"dense_attention_chunked: chunk {chunk} does not divide {S} keys")

    @jax.checkpoint
    def one(c):
        sl = lambda x: jax.lax.dynamic_slice_in_dim(x, c * chunk, chunk, axis=1)  # noqa: E731
        k_c, v_c = (jnp.repeat(jnp.swapaxes(sl(x), 1, 2), group, axis=1) for x in (k_BSHD, v_BSHD))
        return dense_attention(q_BHRD, k_c, v_c, kv_mask=None if kv_mask is None else sl(kv_mask))

    if chunk >= S:
        return one(0)
    outs, lses = jax.lax.map(one, jnp.arange(S // chunk))  # [C, B, H, R, D], [C, B, H, R]
    lse = jax.scipy.special.logsumexp(lses, axis=0)
    has = lse > LOG0 / 2
    w = jnp.where(has[None], jnp.exp(lses - jnp.where(has, lse, 0.0)[None]), 0.0)
    return jnp.sum(w[..., None] * outs, axis=0), jnp.where(has, lse, LOG0)
