"""Building blocks shared by every model: embeddings, positions, MLP, attention, blocks.

Every parameter is created with `nnx.with_partitioning(init, names)`, with logical axis names
from `embed`, `heads`, `kv_heads`, `kv`, `mlp`, `vocab` (or None): the trainer maps them to
mesh axes with `config.logical_axis_rules`.

Randomness is explicit: each `__call__` takes `rng` (a PRNG key, or None) and `train`.
Dropout draws from `rng` when `train` is True; the attention core gets its own key (random
blocks, random features, the regulariser's rows) when `train` is True and None otherwise,
so evaluation is deterministic. Nothing random lives in the modules.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from sparseformer import attention as attention_lib

Aux = dict[str, jax.Array]
Cache = dict[str, jax.Array]

_normal = nnx.initializers.normal
_lecun = nnx.initializers.lecun_normal()


def param(rngs: nnx.Rngs, init: Any, shape: Sequence[int], names: Sequence[str | None]) -> nnx.Param:
    """A float32 parameter carrying logical axis names (one per dimension)."""
    if len(names) != len(shape):
        raise ValueError(f"logical names {tuple(names)} do not match shape {tuple(shape)}")
    return nnx.Param(nnx.with_partitioning(init, tuple(names))(rngs.params(), tuple(shape), jnp.float32))


def dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
    """Inverted dropout; identity when `rng` is None or `rate` is 0."""
    if rng is None or rate <= 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def split(rng: jax.Array | None, n: int) -> list[jax.Array | None]:
    """`n` keys from `rng`, or `n` Nones."""
    return [None] * n if rng is None else list(jax.random.split(rng, n))


def empty_aux() -> Aux:
    """Per-model totals: the summed `aux_loss`, the summed `fidelity` and the number of calls."""
    z = jnp.zeros((), jnp.float32)
    return {"aux_loss": z, "fidelity": z, "calls": z}


def add_aux(total: Aux, aux: Aux) -> Aux:
    return {"aux_loss": total["aux_loss"] + aux["aux_loss"], "fidelity": total["fidelity"] + aux["fidelity"],
            "calls": total["calls"] + 1.0}


def finish_aux(total: Aux) -> Aux:
    """`aux_loss` summed over the layers, `fidelity` averaged over them."""
    return {"aux_loss": total["aux_loss"], "fidelity": total["fidelity"] / jnp.maximum(total["calls"], 1.0)}


class LayerNorm(nnx.Module):
    """Layer normalisation computed in float32, returned in `dtype`."""

    def __init__(self, dim: int, *, dtype: Any, rngs: nnx.Rngs):
        self.scale = param(rngs, nnx.initializers.ones, (dim,), ("embed",))
        self.bias = param(rngs, nnx.initializers.zeros, (dim,), ("embed",))
        self.dtype = dtype

    def __call__(self, x_BLE: jax.Array) -> jax.Array:
        x = x_BLE.astype(jnp.float32)
        mean = jnp.mean(x, -1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), -1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + 1e-6) * self.scale[...] + self.bias[...]
        return y.astype(self.dtype)


class Embed(nnx.Module):
    """Token embeddings `[vocab, embed]`, scaled by sqrt(embed) as in the Transformer."""

    def __init__(self, vocab_size: int, dim: int, *, dtype: Any, rngs: nnx.Rngs):
        self.table = param(rngs, _normal(1.0), (vocab_size, dim), ("vocab", "embed"))
        self.dim, self.dtype = dim, dtype

    def __call__(self, ids_BL: jax.Array) -> jax.Array:
        return (jnp.take(self.table[...], ids_BL, axis=0) * math.sqrt(self.dim)).astype(self.dtype)


def sinusoidal_table(length: int, dim: int) -> jax.Array:
    """The fixed `[length, dim]` sine/cosine position table of Vaswani et al."""
    pos = jnp.arange(length, dtype=jnp.float32)[:, None]
    inv = jnp.exp(-math.log(10000.0) * jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
    table = jnp.zeros((length, dim), jnp.float32)
    table = table.at[:, 0::2].set(jnp.sin(pos * inv))
    return table.at[:, 1::2].set(jnp.cos(pos * inv[: dim // 2]))


class Positions(nnx.Module):
    """Position embeddings added to the tokens: `learned` (a parameter) or `sinusoidal`."""

    KINDS = ("learned", "sinusoidal")

    def __init__(self, kind: str, max_len: int, dim: int, *, dtype: Any, rngs: nnx.Rngs):
        if kind not in self.KINDS:
            raise ValueError(f"model.positions: {kind!r} is not one of {', '.join(self.KINDS)}")
        self.kind, self.max_len, self.dim, self.dtype = kind, max_len, dim, dtype
        self.table = param(rngs, _normal(0.02), (max_len, dim), (None, "embed")) if kind == "learned" else None

    def __call__(self, x_BLE: jax.Array, offset: jax.Array | int = 0) -> jax.Array:
        """`x + position(offset + i)` for i along the length."""
        L = x_BLE.shape[1]
        table = self.table[...] if self.kind == "learned" else sinusoidal_table(self.max_len, self.dim)
        pos_LE = jax.lax.dynamic_slice_in_dim(table, offset, L, axis=0)
        return x_BLE + pos_LE[None].astype(self.dtype)


class Dense(nnx.Module):
    """`x @ kernel (+ bias)` with named axes, computed in `dtype`."""

    def __init__(self, d_in: int, d_out: int, names: tuple[str | None, str | None], *, dtype: Any,
                 rngs: nnx.Rngs, use_bias: bool = True):
        self.kernel = param(rngs, _lecun, (d_in, d_out), names)
        self.bias = param(rngs, nnx.initializers.zeros, (d_out,), names[1:]) if use_bias else None
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        return y if self.bias is None else y + self.bias[...].astype(self.dtype)


class MLP(nnx.Module):
    """embed -> mlp (GELU) -> embed."""

    def __init__(self, dim: int, mlp_dim: int, dropout_rate: float, *, dtype: Any, rngs: nnx.Rngs):
        self.up = Dense(dim, mlp_dim, ("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.down = Dense(mlp_dim, dim, ("mlp", "embed"), dtype=dtype, rngs=rngs)
        self.dropout_rate = dropout_rate

    def __call__(self, x_BLE: jax.Array, *, rng: jax.Array | None) -> jax.Array:
        return self.down(dropout(jax.nn.gelu(self.up(x_BLE)), self.dropout_rate, rng))


def freeze(config: ml_collections.ConfigDict) -> ml_collections.FrozenConfigDict:
    """A hashable copy (module attributes must be hashable to be static under `nnx.jit`)."""
    return ml_collections.FrozenConfigDict(config)


class MultiHeadAttention(nnx.Module):
    """Projections q/k/v/o around the attention core (`sparseformer.attention.attend`).

    Owns the core's learned parameters too (`init_params`: Linformer projections, gates).
    `kv_len` is the key length the core's parameters are made for.
    """

    def __init__(self, attn: ml_collections.ConfigDict, *, dim: int, num_heads: int, num_kv_heads: int,
                 kv_len: int, causal: bool, dtype: Any, rngs: nnx.Rngs):
        if dim % num_heads:
            raise ValueError(f"model.emb_dim: {dim} is not a multiple of model.num_heads={num_heads}")
        if num_heads % num_kv_heads:
            raise ValueError(f"model.num_heads: {num_heads} is not a multiple of model.num_kv_heads={num_kv_heads}")
        D = dim // num_heads
        self.attn, self.causal, self.dtype = freeze(attn), causal, dtype
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, D
        self.multiple = attention_lib.block_multiple(attn, causal=causal)
        self.q = param(rngs, _lecun, (dim, num_heads, D), ("embed", "heads", "kv"))
        self.k = param(rngs, _lecun, (dim, num_kv_heads, D), ("embed", "kv_heads", "kv"))
        self.v = param(rngs, _lecun, (dim, num_kv_heads, D), ("embed", "kv_heads", "kv"))
        self.o = param(rngs, _lecun, (num_heads, D, dim), ("heads", "kv", "embed"))
        core = attention_lib.init_params(attn, rngs.params(), num_heads=num_heads, head_dim=D, max_len=kv_len)
        self.core = nnx.data({name: nnx.Param(nnx.with_partitioning(lambda *_, v=v: v, (None,) * v.ndim)(None))
                              for name, v in core.items()})

    def _proj(self, x_BLE: jax.Array, w: nnx.Param) -> jax.Array:
        return jnp.einsum("ble,ehd->blhd", x_BLE.astype(self.dtype), w[...].astype(self.dtype))

    def _out(self, y_BLHD: jax.Array) -> jax.Array:
        return jnp.einsum("blhd,hde->ble", y_BLHD, self.o[...].astype(self.dtype))

    def _params(self) -> dict[str, jax.Array]:
        return {name: p[...] for name, p in self.core.items()}

    def __call__(self, x_BTE: jax.Array, kv_BSE: jax.Array | None = None, *, kv_mask_BS: jax.Array | None = None,
                 rng: jax.Array | None = None) -> tuple[jax.Array, Aux]:
        """Self-attention (`kv_BSE` None) or cross-attention over `kv_BSE`; returns `[B, T, E]` and aux."""
        kv = x_BTE if kv_BSE is None else kv_BSE
        q, k, v = self._proj(x_BTE, self.q), self._proj(kv, self.k), self._proj(kv, self.v)
        y, aux = attention_lib.attend(q, k, v, self.attn, params=self._params(), causal=self.causal,
                                      kv_mask=kv_mask_BS, rng=rng)
        return self._out(y), aux

    # --- decoding -----------------------------------------------------------------------------
    def init_cache(self, batch: int, length: int) -> Cache:
        """Zero caches of queries `[B, L, H, D]` and keys/values `[B, L, Hk, D]`."""
        z = lambda h: jnp.zeros((batch, length, h, self.head_dim), self.dtype)  # noqa: E731
        return {"q": z(self.num_heads), "k": z(self.num_kv_heads), "v": z(self.num_kv_heads)}

    def decode_self(self, x_B1E: jax.Array, cache: Cache, t: jax.Array) -> tuple[jax.Array, Cache]:
        """Causal self-attention for position `t` alone, reading and extending the cache.

        The whole query block of `t` is computed from the cache (`attend(..., query_block=t // m)`)
        and row `t % m` kept: the core guarantees the full causal pass's selection and compression.
        """
        new = {name: jax.lax.dynamic_update_slice_in_dim(cache[name], self._proj(x_B1E, w).astype(cache[name].dtype), t, 1)
               for name, w in (("q", self.q), ("k", self.k), ("v", self.v))}
        y_BmHD, _ = attention_lib.attend(new["q"], new["k"], new["v"], self.attn, params=self._params(),
                                         causal=True, query_block=t // self.multiple)
        return self._out(jax.lax.dynamic_slice_in_dim(y_BmHD, t % self.multiple, 1, axis=1)), new

    def prefill_self(self, x_BLE: jax.Array, length: int) -> tuple[jax.Array, Cache]:
        """Causal self-attention over a whole prompt (`L <= length` positions) at once, and the cache
        of `length` positions it leaves (the prompt's queries, keys and values at `0..L-1`).

        Causal attention at a position depends only on the positions before it, so the outputs and
        the cache equal those of feeding the prompt one position at a time through `decode_self`.
        """
        proj = {name: self._proj(x_BLE, w) for name, w in (("q", self.q), ("k", self.k), ("v", self.v))}
        y, _ = attention_lib.attend(proj["q"], proj["k"], proj["v"], self.attn, params=self._params(), causal=True)
        cache = self.init_cache(x_BLE.shape[0], length)
        cache = {name: jax.lax.dynamic_update_slice_in_dim(cache[name], proj[name].astype(cache[name].dtype), 0, 1)
                 for name in cache}
        return self._out(y), cache

    def cross_cache(self, kv_BSE: jax.Array, batch: int, length: int) -> Cache:
        """Keys and values of the encoder output, and an empty query cache (decoder length)."""
        return {"q": jnp.zeros((batch, length, self.num_heads, self.head_dim), self.dtype),
                "k": self._proj(kv_BSE, self.k), "v": self._proj(kv_BSE, self.v)}

    def decode_cross(self, x_B1E: jax.Array, cache: Cache, t: jax.Array, kv_mask_BS: jax.Array) -> tuple[jax.Array, Cache]:
        """Cross-attention for decoder position `t` over the cached encoder keys and values."""
        q = self._proj(x_B1E, self.q).astype(cache["q"].dtype)
        if self.multiple == 1:  # dense-like cores: one query row is enough
            y, _ = attention_lib.attend(q, cache["k"], cache["v"], self.attn, params=self._params(), kv_mask=kv_mask_BS)
            return self._out(y), cache
        new = dict(cache, q=jax.lax.dynamic_update_slice_in_dim(cache["q"], q, t, 1))
        y_BmHD, _ = attention_lib.attend(new["q"], new["k"], new["v"], self.attn, params=self._params(),
                                         kv_mask=kv_mask_BS, query_block=t // self.multiple)
        return self._out(jax.lax.dynamic_slice_in_dim(y_BmHD, t % self.multiple, 1, axis=1)), new


class Block(nnx.Module):
    """A pre-norm Transformer block: self-attention, optional cross-attention, MLP."""

    def __init__(self, model: ml_collections.ConfigDict, *, length: int, causal: bool, cross_len: int = 0,
                 cross_attention: ml_collections.ConfigDict | None = None, rngs: nnx.Rngs):
        dtype = jnp.dtype(model.dtype)
        E = model.emb_dim
        heads = dict(dim=E, num_heads=model.num_heads, num_kv_heads=model.num_kv_heads, dtype=dtype, rngs=rngs)
        self.norm1 = LayerNorm(E, dtype=dtype, rngs=rngs)
        self.self_attn = MultiHeadAttention(model.attention, kv_len=length, causal=causal, **heads)
        self.norm_x = LayerNorm(E, dtype=dtype, rngs=rngs) if cross_len else None
        self.cross_attn = (MultiHeadAttention(cross_attention, kv_len=cross_len, causal=False, **heads)
                           if cross_len else None)
        # the cross-attention's aux counts only when it uses the model's attention config
        self.cross_counts = bool(cross_len) and cross_attention is model.attention
        self.norm2 = LayerNorm(E, dtype=dtype, rngs=rngs)
        self.mlp = MLP(E, model.mlp_dim, model.dropout_rate, dtype=dtype, rngs=rngs)
        self.dropout_rate = model.dropout_rate

    def __call__(self, x_BLE: jax.Array, *, mask_BL: jax.Array | None, enc_BSE: jax.Array | None = None,
                 enc_mask_BS: jax.Array | None = None, rng: jax.Array | None, train: bool,
                 aux: Aux) -> tuple[jax.Array, Aux]:
        r = split(rng if train else None, 6)
        y, a = self.self_attn(self.norm1(x_BLE), kv_mask_BS=mask_BL, rng=r[0])
        aux = add_aux(aux, a)
        x_BLE = x_BLE + dropout(y, self.dropout_rate, r[1])
        if self.cross_attn is not None:
            y, a = self.cross_attn(self.norm_x(x_BLE), enc_BSE, kv_mask_BS=enc_mask_BS, rng=r[2])
            aux = add_aux(aux, a) if self.cross_counts else aux
            x_BLE = x_BLE + dropout(y, self.dropout_rate, r[3])
        y = self.mlp(self.norm2(x_BLE), rng=r[4])
        return x_BLE + dropout(y, self.dropout_rate, r[5]), aux

    def init_cache(self, batch: int, length: int, enc_BSE: jax.Array | None = None) -> dict[str, Cache]:
        cache = {"self": self.self_attn.init_cache(batch, length)}
        if self.cross_attn is not None:
            cache["cross"] = self.cross_attn.cross_cache(enc_BSE, batch, length)
        return cache

    def prefill(self, x_BLE: jax.Array, length: int) -> tuple[jax.Array, dict[str, Cache]]:
        """A causal prompt through the block at once (no cross-attention, no dropout), and its cache."""
        y, self_cache = self.self_attn.prefill_self(self.norm1(x_BLE), length)
        x_BLE = x_BLE + y
        return x_BLE + self.mlp(self.norm2(x_BLE), rng=None), {"self": self_cache}

    def decode(self, x_B1E: jax.Array, cache: dict[str, Cache], t: jax.Array,
               enc_mask_BS: jax.Array | None = None) -> tuple[jax.Array, dict[str, Cache]]:
        """One decoding position through the block (no dropout)."""
        y, self_cache = self.self_attn.decode_self(self.norm1(x_B1E), cache["self"], t)
        x_B1E = x_B1E + y
        new = {"self": self_cache}
        if self.cross_attn is not None:
            y, new["cross"] = self.cross_attn.decode_cross(self.norm_x(x_B1E), cache["cross"], t, enc_mask_BS)
            x_B1E = x_B1E + y
        return x_B1E + self.mlp(self.norm2(x_B1E), rng=None), new


class Stack(nnx.Module):
    """Token embedding (shared or own), positions, blocks, final norm."""

    def __init__(self, model: ml_collections.ConfigDict, *, embed: Embed, num_layers: int, length: int,
                 causal: bool, cross_len: int = 0, cross_attention: ml_collections.ConfigDict | None = None,
                 rngs: nnx.Rngs):
        dtype = jnp.dtype(model.dtype)
        self.embed = embed
        self.positions = Positions(model.positions, length, model.emb_dim, dtype=dtype, rngs=rngs)
        self.blocks = nnx.List([
            Block(model, length=length, causal=causal, cross_len=cross_len, cross_attention=cross_attention, rngs=rngs)
            for _ in range(num_layers)
        ])
        self.norm = LayerNorm(model.emb_dim, dtype=dtype, rngs=rngs)
        self.dropout_rate = model.dropout_rate

    def embed_tokens(self, ids_BL: jax.Array, offset: jax.Array | int = 0) -> jax.Array:
        return self.positions(self.embed(ids_BL), offset)

    def run(self, x_BLE: jax.Array, *, mask_BL: jax.Array | None, rng: jax.Array | None, train: bool,
            enc_BSE: jax.Array | None = None, enc_mask_BS: jax.Array | None = None) -> tuple[jax.Array, Aux]:
        """Embedded inputs through the blocks; returns the normalised output and the layers' aux totals."""
        r = split(rng if train else None, len(self.blocks) + 1)
        x_BLE = dropout(x_BLE, self.dropout_rate, r[-1])
        aux = empty_aux()
        for block, rb in zip(self.blocks, r):
            x_BLE, aux = block(x_BLE, mask_BL=mask_BL, enc_BSE=enc_BSE, enc_mask_BS=enc_mask_BS, rng=rb,
                               train=train, aux=aux)
        return self.norm(x_BLE), aux

    def init_cache(self, batch: int, length: int, enc_BSE: jax.Array | None = None) -> list[dict[str, Cache]]:
        return [block.init_cache(batch, length, enc_BSE) for block in self.blocks]

    def prefill(self, ids_BL: jax.Array, length: int) -> tuple[jax.Array, list[dict[str, Cache]]]:
        """A causal prompt through the stack at once: the normalised `[B, L, E]` output and caches of
        `length` positions (decoder-only stacks)."""
        x = self.embed_tokens(ids_BL)
        caches = []
        for block in self.blocks:
            x, c = block.prefill(x, length)
            caches.append(c)
        return self.norm(x), caches

    def decode(self, ids_B: jax.Array, cache: list[dict[str, Cache]], t: jax.Array,
               enc_mask_BS: jax.Array | None = None) -> tuple[jax.Array, list[dict[str, Cache]]]:
        """The token at position `t` through the stack; returns the normalised `[B, E]` output."""
        x = self.embed_tokens(ids_B[:, None], t)
        new = []
        for block, c in zip(self.blocks, cache):
            x, c = block.decode(x, c, t, enc_mask_BS)
            new.append(c)
        return self.norm(x)[:, 0], new
