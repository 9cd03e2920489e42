"""`EncoderDecoder`: translation, with greedy and beam-search decoding through a KV cache.

Cross-attention uses `model.cross_attention`: `dense` (default), or `same` (the model's
attention config). With `same`, a query block's selection is made from all of its queries,
including later target positions in the same block: teacher-forced training then sees a
little of the future through the choice of blocks, which decoding cannot; `dense` has no
such leak.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from sparseformer.attention import presets
from sparseformer.models.layers import Aux, Cache, Dense, Embed, Stack, concat_aux, finish_aux

CROSS_ATTENTION = ("dense", "same")


def cross_attention_config(model: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The attention config of the decoder's cross-attention."""
    if model.cross_attention not in CROSS_ATTENTION:
        raise ValueError(f"model.cross_attention: {model.cross_attention!r} is not one of {', '.join(CROSS_ATTENTION)}")
    return model.attention if model.cross_attention == "same" else presets.get("dense")


def length_penalty(length: jax.Array, alpha: float) -> jax.Array:
    """GNMT's `((5 + length) / 6) ** alpha`."""
    return ((5.0 + length.astype(jnp.float32)) / 6.0) ** alpha


class EncoderDecoder(nnx.Module):
    """`inputs [B, L]` -> logits over `targets [B, Lt]` (teacher forcing: targets shifted right with BOS)."""

    def __init__(self, model: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        dtype = jnp.dtype(model.dtype)
        embed = Embed(model.vocab_size, model.emb_dim, dtype=dtype, rngs=rngs)  # shared vocabulary
        self.encoder = Stack(model, embed=embed, num_layers=model.num_layers, length=model.max_len, causal=False,
                             rngs=rngs)
        self.decoder = Stack(model, embed=embed, num_layers=model.num_decoder_layers, length=model.max_target_len,
                             causal=True, cross_len=model.max_len, cross_attention=cross_attention_config(model),
                             rngs=rngs)
        self.head = Dense(model.emb_dim, model.vocab_size, ("embed", "vocab"), dtype=dtype, rngs=rngs, use_bias=False)
        self.bos_id, self.eos_id = model.bos_id, model.eos_id
        self.max_target_len = model.max_target_len
        self.beam_size, self.alpha = model.beam_size, float(model.length_penalty)
        self.len_ratio, self.len_extra = float(model.decode_len_ratio), int(model.decode_len_extra)

    def encode(self, inputs_BL: jax.Array, mask_BL: jax.Array, *, rng: jax.Array | None = None,
               train: bool = False) -> tuple[jax.Array, Aux]:
        return self.encoder.run(self.encoder.embed_tokens(inputs_BL), mask_BL=mask_BL, rng=rng, train=train)

    def __call__(self, inputs_BL: jax.Array, mask_BL: jax.Array, targets_BT: jax.Array, *,
                 rng: jax.Array | None = None, train: bool = False) -> tuple[jax.Array, Aux]:
        """Float32 logits `[B, Lt, V]` (position t predicts `targets[t]`), and aux."""
        r_enc, r_dec = (None, None) if rng is None else tuple(jax.random.split(rng))
        enc_BSE, aux_e = self.encode(inputs_BL, mask_BL, rng=r_enc, train=train)
        dec_in = jnp.concatenate([jnp.full_like(targets_BT[:, :1], self.bos_id), targets_BT[:, :-1]], 1)
        x_BTE, aux_d = self.decoder.run(self.decoder.embed_tokens(dec_in), mask_BL=None, rng=r_dec, train=train,
                                        enc_BSE=enc_BSE, enc_mask_BS=mask_BL)
        return self.head(x_BTE).astype(jnp.float32), finish_aux(concat_aux(aux_e, aux_d))

    def forward(self, batch: dict[str, jax.Array], *, rng: jax.Array | None, train: bool):
        logits, aux = self(batch["inputs"], batch["inputs_mask"], batch["targets"], rng=rng, train=train)
        w = batch["targets_mask"].astype(jnp.float32) * batch["example_mask"][:, None].astype(jnp.float32)
        return logits, batch["targets"], w, aux

    # --- decoding -----------------------------------------------------------------------------
    def _start(self, inputs_BL: jax.Array, mask_BL: jax.Array, copies: int):
        enc_BSE, _ = self.encode(inputs_BL, mask_BL)
        enc_BSE, mask_BL = jnp.repeat(enc_BSE, copies, 0), jnp.repeat(mask_BL, copies, 0)
        return self.decoder.init_cache(enc_BSE.shape[0], self.max_target_len, enc_BSE), mask_BL

    def length_limits(self, mask_BL: jax.Array) -> jax.Array | None:
        """`[B]` int32: the most tokens (EOS included) each row may decode, `decode_len_ratio x` its
        source's tokens `+ decode_len_extra`, at most `max_target_len`, so a model that does not emit
        EOS stops near a plausible length instead of running on. None when the ratio is 0: rows
        then run to `max_target_len` without a forced EOS."""
        T = self.max_target_len
        if self.len_ratio <= 0:
            return None
        src = jnp.sum(mask_BL.astype(jnp.float32), -1)
        return jnp.clip(jnp.floor(self.len_ratio * src).astype(jnp.int32) + self.len_extra, 1, T)

    def _step(self, ids_N: jax.Array, cache: list[dict[str, Cache]], t: jax.Array, mask_NS: jax.Array):
        x_NE, cache = self.decoder.decode(ids_N, cache, t, mask_NS)
        return jax.nn.log_softmax(self.head(x_NE).astype(jnp.float32)), cache

    def greedy(self, inputs_BL: jax.Array, mask_BL: jax.Array) -> jax.Array:
        """Greedy decoding: `[B, Lt]` ids, padding (0) after the first EOS.

        The loop stops as soon as every row has emitted EOS (the remaining steps would only
        write padding), so a batch of short outputs costs its longest output, not `Lt` steps. A
        row emits EOS at its `length_limits` at the latest.
        """
        B, T = inputs_BL.shape[0], self.max_target_len
        cache, mask = self._start(inputs_BL, mask_BL, 1)
        limit = self.length_limits(mask_BL)

        def step(carry):
            t, out, prev, done, cache = carry
            logp, cache = self._step(prev, cache, t, mask)
            tok = jnp.argmax(logp, -1).astype(jnp.int32)
            if limit is not None:
                tok = jnp.where(t + 1 >= limit, self.eos_id, tok)
            tok = jnp.where(done, 0, tok)
            out = jax.lax.dynamic_update_slice_in_dim(out, tok[:, None], t, 1)
            return t + 1, out, tok, done | (tok == self.eos_id), cache

        def running(carry):
            t, done = carry[0], carry[3]
            return (t < T) & ~jnp.all(done)

        init = (jnp.zeros((), jnp.int32), jnp.zeros((B, T), jnp.int32), jnp.full((B,), self.bos_id, jnp.int32),
                jnp.zeros((B,), bool), cache)
        return jax.lax.while_loop(running, step, init)[1]

    def beam_search(self, inputs_BL: jax.Array, mask_BL: jax.Array, beam_size: int | None = None,
                    alpha: float | None = None) -> jax.Array:
        """Beam search with GNMT's length penalty: the best `[B, Lt]` ids, padding after EOS.

        Keeps `K` live hypotheses and the `K` best finished ones; a live hypothesis that emits
        EOS moves to the finished pool with score `logp / length_penalty`. With `K = 1` and
        `alpha = 0` it is greedy decoding. At a row's `length_limits` every hypothesis must end
        (only EOS is allowed), so it is finished there.
        """
        K = self.beam_size if beam_size is None else beam_size
        alpha = self.alpha if alpha is None else alpha
        B, T = inputs_BL.shape[0], self.max_target_len
        cache, mask = self._start(inputs_BL, mask_BL, K)
        limit_B = self.length_limits(mask_BL)
        NEG = jnp.float32(-1e9)

        def gather(x, idx_BK):  # x [B*K, ...] -> rows idx per batch
            x = x.reshape(B, K, *x.shape[1:])
            return jnp.take_along_axis(x, idx_BK.reshape(B, K, *([1] * (x.ndim - 2))), 1).reshape(B * K, *x.shape[2:])

        def step(t, carry):
            seqs, logp_BK, fin_seqs, fin_scores, cache = carry
            prev = jnp.where(t == 0, self.bos_id, jax.lax.dynamic_index_in_dim(seqs, jnp.maximum(t - 1, 0), 2, False))
            lp_NV, cache = self._step(prev.reshape(B * K), cache, t, mask)
            V = lp_NV.shape[-1]
            if limit_B is not None:
                only_eos = (t + 1 >= jnp.repeat(limit_B, K))[:, None] & (jnp.arange(V) != self.eos_id)[None, :]
                lp_NV = jnp.where(only_eos, NEG, lp_NV)
            cand = (logp_BK[:, :, None] + lp_NV.reshape(B, K, V)).reshape(B, K * V)
            top_scores, top_idx = jax.lax.top_k(cand, 2 * K)
            beam, tok = top_idx // V, (top_idx % V).astype(jnp.int32)
            cand_seqs = jax.lax.dynamic_update_slice_in_dim(jnp.take_along_axis(seqs, beam[:, :, None], 1),
                                                            tok[:, :, None], t, 2)
            is_eos = tok == self.eos_id
            # finished pool: old finished plus the candidates that just emitted EOS
            new_fin = jnp.where(is_eos, top_scores / length_penalty(t + 1, alpha), NEG)
            all_scores = jnp.concatenate([fin_scores, new_fin], 1)
            all_seqs = jnp.concatenate([fin_seqs, cand_seqs], 1)
            fin_scores, keep = jax.lax.top_k(all_scores, K)
            fin_seqs = jnp.take_along_axis(all_seqs, keep[:, :, None], 1)
            # live: the best K candidates that did not emit EOS
            alive_scores, pick = jax.lax.top_k(jnp.where(is_eos, NEG, top_scores), K)
            seqs = jnp.take_along_axis(cand_seqs, pick[:, :, None], 1)
            cache = jax.tree.map(lambda x: gather(x, jnp.take_along_axis(beam, pick, 1)), cache)
            return seqs, alive_scores, fin_seqs, fin_scores, cache

        logp0 = jnp.where(jnp.arange(K)[None] == 0, 0.0, NEG) * jnp.ones((B, 1))  # one live beam at first
        init = (jnp.zeros((B, K, T), jnp.int32), logp0, jnp.zeros((B, K, T), jnp.int32),
                jnp.full((B, K), NEG), cache)
        seqs, logp_BK, fin_seqs, fin_scores, _ = jax.lax.fori_loop(0, T, step, init)
        alive_best = logp_BK[:, 0] / length_penalty(jnp.asarray(T), alpha)
        use_fin = fin_scores[:, 0] >= alive_best
        best = jnp.where(use_fin[:, None], fin_seqs[:, 0], seqs[:, 0])
        after_eos = jnp.cumsum(jnp.cumsum(best == self.eos_id, 1), 1) > 1  # positions past the first EOS
        return jnp.where(after_eos, 0, best)

    def predict(self, inputs_BL: jax.Array, mask_BL: jax.Array) -> jax.Array:
        """Decoded ids `[B, Lt]`: greedy when `beam_size == 1`, else beam search."""
        if self.beam_size == 1:
            return self.greedy(inputs_BL, mask_BL)
        return self.beam_search(inputs_BL, mask_BL)
