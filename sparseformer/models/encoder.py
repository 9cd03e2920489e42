"""Encoder models: `EncoderClassifier` (ListOps, text, image, retrieval) and `DualEncoder`
(document matching, as in LRA's retrieval task)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from sparseformer.models.layers import Aux, Dense, Embed, Stack, finish_aux, param

POOLINGS = ("mean", "cls", "last")


class Encoder(nnx.Module):
    """Embeddings, positions, bidirectional pre-norm blocks and pooling (`mean`, `cls`, or `last`:
    the last unpadded token, where tasks that ask their question at the end put it).

    With `cls` pooling a learned token is put in front of the sequence, so the blocks see
    `max_len + 1` positions (the attention core pads to its block multiple under the mask).
    """

    def __init__(self, model: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        if model.pooling not in POOLINGS:
            raise ValueError(f"model.pooling: {model.pooling!r} is not one of {', '.join(POOLINGS)}")
        self.pooling = model.pooling
        length = encoder_length(model)
        dtype = jnp.dtype(model.dtype)
        embed = Embed(model.vocab_size, model.emb_dim, dtype=dtype, rngs=rngs)
        self.stack = Stack(model, embed=embed, num_layers=model.num_layers, length=length, causal=False, rngs=rngs)
        self.cls = param(rngs, nnx.initializers.normal(0.02), (1, 1, model.emb_dim), (None, None, "embed")) \
            if model.pooling == "cls" else None

    def __call__(self, ids_BL: jax.Array, mask_BL: jax.Array, *, rng: jax.Array | None,
                 train: bool) -> tuple[jax.Array, Aux]:
        """Pooled `[B, E]` representation and the layers' aux totals."""
        x_BLE = self.stack.embed(ids_BL)
        if self.cls is not None:
            B = ids_BL.shape[0]
            x_BLE = jnp.concatenate([jnp.broadcast_to(self.cls[...].astype(x_BLE.dtype), (B, 1, x_BLE.shape[-1])), x_BLE], 1)
            mask_BL = jnp.concatenate([jnp.ones((B, 1), bool), mask_BL], 1)
        x_BLE = self.stack.positions(x_BLE)
        x_BLE, aux = self.stack.run(x_BLE, mask_BL=mask_BL, rng=rng, train=train)
        if self.cls is not None:
            return x_BLE[:, 0], aux
        if self.pooling == "last":
            last_B = jnp.maximum(jnp.sum(mask_BL, 1) - 1, 0)
            return jnp.take_along_axis(x_BLE, last_B[:, None, None], axis=1)[:, 0], aux
        w_BL1 = mask_BL[..., None].astype(x_BLE.dtype)
        return jnp.sum(x_BLE * w_BL1, 1) / jnp.maximum(jnp.sum(w_BL1, 1), 1.0), aux


def encoder_length(model: ml_collections.ConfigDict) -> int:
    """Positions the encoder blocks see: `max_len`, plus one for a CLS token."""
    return model.max_len + (1 if model.pooling == "cls" else 0)


class Head(nnx.Module):
    """Pooled features -> hidden (GELU) -> class logits, as LRA's classifier heads."""

    def __init__(self, d_in: int, hidden: int, num_classes: int, *, dtype: Any, rngs: nnx.Rngs):
        self.hidden = Dense(d_in, hidden, ("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.out = Dense(hidden, num_classes, ("mlp", None), dtype=dtype, rngs=rngs)

    def __call__(self, x_BE: jax.Array) -> jax.Array:
        return self.out(jax.nn.gelu(self.hidden(x_BE))).astype(jnp.float32)


class EncoderClassifier(nnx.Module):
    """A sequence classifier: `inputs [B, L]` (with `inputs_mask`) -> logits `[B, num_classes]`."""

    def __init__(self, model: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        self.encoder = Encoder(model, rngs=rngs)
        self.head = Head(model.emb_dim, model.mlp_dim, model.num_classes, dtype=jnp.dtype(model.dtype), rngs=rngs)

    def __call__(self, inputs_BL: jax.Array, mask_BL: jax.Array, *, rng: jax.Array | None = None,
                 train: bool = False) -> tuple[jax.Array, Aux]:
        """Float32 logits `[B, C]` and aux (`aux_loss` summed over layers, `fidelity` averaged)."""
        pooled, aux = self.encoder(inputs_BL, mask_BL, rng=rng, train=train)
        return self.head(pooled), finish_aux(aux)

    def forward(self, batch: dict[str, jax.Array], *, rng: jax.Array | None, train: bool):
        """`(logits [B, C], labels [B], weights [B], aux)` for the shared losses."""
        logits, aux = self(batch["inputs"], batch["inputs_mask"], rng=rng, train=train)
        return logits, batch["labels"], batch["example_mask"].astype(jnp.float32), aux


class DualEncoder(nnx.Module):
    """Document matching: one shared encoder for both documents; the head sees `[u, v, u*v, u-v]`."""

    def __init__(self, model: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        self.encoder = Encoder(model, rngs=rngs)
        E = model.emb_dim
        self.head = Head(4 * E, model.mlp_dim, model.num_classes, dtype=jnp.dtype(model.dtype), rngs=rngs)

    def __call__(self, inputs1_BL: jax.Array, mask1_BL: jax.Array, inputs2_BL: jax.Array, mask2_BL: jax.Array, *,
                 rng: jax.Array | None = None, train: bool = False) -> tuple[jax.Array, Aux]:
        r1, r2 = (None, None) if rng is None else tuple(jax.random.split(rng))
        u, aux1 = self.encoder(inputs1_BL, mask1_BL, rng=r1, train=train)
        v, aux2 = self.encoder(inputs2_BL, mask2_BL, rng=r2, train=train)
        aux = jax.tree.map(jnp.add, aux1, aux2)
        return self.head(jnp.concatenate([u, v, u * v, u - v], -1)), finish_aux(aux)

    def forward(self, batch: dict[str, jax.Array], *, rng: jax.Array | None, train: bool):
        logits, aux = self(batch["inputs1"], batch["inputs1_mask"], batch["inputs2"], batch["inputs2_mask"],
                           rng=rng, train=train)
        return logits, batch["labels"], batch["example_mask"].astype(jnp.float32), aux
