"""`DecoderLM`: a causal language model with a KV cache for decoding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from sparseformer.models.layers import Aux, Cache, Dense, Embed, Stack, finish_aux


class DecoderLM(nnx.Module):
    """Embeddings, positions, causal pre-norm blocks, logits over the vocabulary.

    `decode_step` runs one position against a cache and gives the logits of the full forward
    pass at that position (the attention core recomputes the query block of `t` from the
    cached queries, keys and values, with the full pass's selection and compression).
    """

    def __init__(self, model: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        dtype = jnp.dtype(model.dtype)
        embed = Embed(model.vocab_size, model.emb_dim, dtype=dtype, rngs=rngs)
        self.max_len = model.max_len
        self.stack = Stack(model, embed=embed, num_layers=model.num_layers, length=model.max_len, causal=True, rngs=rngs)
        self.head = Dense(model.emb_dim, model.vocab_size, ("embed", "vocab"), dtype=dtype, rngs=rngs, use_bias=False)

    def __call__(self, ids_BL: jax.Array, *, rng: jax.Array | None = None, train: bool = False) -> tuple[jax.Array, Aux]:
        """Float32 logits `[B, L, V]` of the next token at every position, and aux."""
        x_BLE, aux = self.stack.run(self.stack.embed_tokens(ids_BL), mask_BL=None, rng=rng, train=train)
        return self.head(x_BLE).astype(jnp.float32), finish_aux(aux)

    def forward(self, batch: dict[str, jax.Array], *, rng: jax.Array | None, train: bool):
        logits, aux = self(batch["inputs"], rng=rng, train=train)
        w = batch["targets_mask"].astype(jnp.float32) * batch["example_mask"][:, None].astype(jnp.float32)
        return logits, batch["targets"], w, aux

    def init_cache(self, batch: int) -> list[dict[str, Cache]]:
        """Zero caches for `max_len` positions, one per layer."""
        return self.stack.init_cache(batch, self.max_len)

    def decode_step(self, ids_B: jax.Array, cache: list[dict[str, Cache]],
                    t: jax.Array) -> tuple[jax.Array, list[dict[str, Cache]]]:
        """Logits `[B, V]` at position `t` given token `ids_B` there (and the cache of 0..t-1)."""
        x_BE, cache = self.stack.decode(ids_B, cache, t)
        return self.head(x_BE).astype(jnp.float32), cache

    def prefill(self, ids_BL: jax.Array) -> tuple[jax.Array, list[dict[str, Cache]]]:
        """A prompt at once: the logits `[B, L, V]` at every position and the cache (`max_len`
        positions) that `decode_step` continues from position `L`; the same as feeding the prompt
        through `decode_step` one position at a time, in one pass."""
        x_BLE, cache = self.stack.prefill(ids_BL, self.max_len)
        return self.head(x_BLE).astype(jnp.float32), cache

    def decode_logits(self, ids_BL: jax.Array) -> jax.Array:
        """All positions one at a time through the cache (what generation does): `[B, L, V]`."""
        B, L = ids_BL.shape

        def step(cache, t):
            logits, cache = self.decode_step(jax.lax.dynamic_index_in_dim(ids_BL, t, 1, keepdims=False), cache, t)
            return cache, logits

        _, logits_LBV = jax.lax.scan(step, self.init_cache(B), jnp.arange(L))
        return jnp.swapaxes(logits_LBV, 0, 1)

    def generate(self, prompt_BP: jax.Array, num_new: int) -> jax.Array:
        """Greedy continuation of a prompt: `[B, P + num_new]` ids (at most `max_len`)."""
        B, P = prompt_BP.shape
        total = min(P + num_new, self.max_len)
        ids = jnp.zeros((B, total), jnp.int32).at[:, :P].set(prompt_BP)

        def step(t, carry):
            ids, cache = carry
            logits, cache = self.decode_step(ids[:, t], cache, t)
            nxt = jnp.where(t + 1 < P, ids[:, jnp.minimum(t + 1, total - 1)], jnp.argmax(logits, -1).astype(jnp.int32))
            ids = jax.lax.dynamic_update_slice_in_dim(ids, nxt[:, None], jnp.minimum(t + 1, total - 1), 1) \
                if total > 1 else ids
            return ids, cache

        ids, _ = jax.lax.fori_loop(0, total - 1, step, (ids, self.init_cache(B)))
        return ids
