"""Every preset in every model kind: builds, runs forward and backward; KV-cache decoding equals
the full pass for causal presets; beam search of width 1 is greedy; logical axis names; aux."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from sparseformer import attention
from sparseformer.attention import presets
from sparseformer.config import attention_uses
from sparseformer.models import MODEL_KINDS, build_model

L = 64  # 8 blocks of 8: rsa's budget of 8 key blocks fits
B = 2


def model_config(kind: str, preset: str, **overrides) -> ml_collections.ConfigDict:
    """A tiny `config` (only the `model` block) for `kind` with `preset` attention."""
    att = presets.get(preset)
    att.selection.block_size = 8
    att.compression.rank = 8
    m = ml_collections.ConfigDict(dict(
        kind=kind, vocab_size=11, num_classes=3, max_len=L, num_layers=1, num_heads=2, num_kv_heads=1,
        emb_dim=16, mlp_dim=32, dropout_rate=0.1, positions="learned", dtype="float32", param_dtype="float32",
        label_smoothing=0.0, pooling="mean",
    ))
    if kind == "seq2seq":
        m.update(max_target_len=L, num_decoder_layers=1, cross_attention="same", beam_size=1, length_penalty=0.0,
                 decode_len_ratio=0.0, decode_len_extra=10, bos_id=1, eos_id=2)
    m.attention = att
    m.update(overrides)
    return ml_collections.ConfigDict({"model": m})


def batch_for(kind: str, seed: int = 0) -> dict[str, jax.Array]:
    rng = np.random.default_rng(seed)
    ids = lambda: jnp.asarray(rng.integers(3, 11, (B, L)), jnp.int32)  # noqa: E731
    mask = jnp.ones((B, L), bool).at[1, L // 2 + 3:].set(False)
    b = {"example_mask": jnp.array([True, True]), "labels": jnp.array([0, 2], jnp.int32)}
    if kind == "dual_encoder":
        return {**b, "inputs1": ids(), "inputs1_mask": mask, "inputs2": ids(), "inputs2_mask": mask}
    if kind == "lm":
        return {"example_mask": b["example_mask"], "inputs": ids(), "targets": ids(), "targets_mask": mask}
    if kind == "seq2seq":
        return {"example_mask": b["example_mask"], "inputs": ids(), "inputs_mask": mask, "targets": ids(),
                "targets_mask": mask}
    return {**b, "inputs": ids(), "inputs_mask": mask}


def refusal(config: ml_collections.ConfigDict) -> str | None:
    """What `attention.validate` says against one of the model's attention uses, or None."""
    for what, att, kwargs in attention_uses(config.model):
        try:
            attention.validate(att, **kwargs)
        except ValueError as e:
            return f"{what}: {e}"
    return None


@pytest.mark.parametrize("kind", list(MODEL_KINDS))
@pytest.mark.parametrize("preset", presets.names())
def test_forward_backward(kind: str, preset: str):
    config = model_config(kind, preset)
    why = refusal(config)
    if why is not None:
        # only what attention refuses is skipped: causal uses of bidirectional-only components
        assert kind in ("lm", "seq2seq") and ("causal" in why or "bidirectional" in why), why
        model = build_model(config, nnx.Rngs(0))
        with pytest.raises(ValueError):  # the model's own call refuses it too (traced, not compiled)
            nnx.eval_shape(lambda m: MODEL_KINDS[kind].loss(m, batch_for(kind), rng=None, train=False), model)
        pytest.skip(f"attention.validate refuses {preset!r} in a {kind}: {why}")
    model = build_model(config, nnx.Rngs(0))
    k = MODEL_KINDS[kind]

    @nnx.jit
    def loss_and_grad(model, batch):
        return nnx.value_and_grad(lambda m: k.loss(m, batch, rng=jax.random.key(1), train=True), has_aux=True)(model)

    (loss, metrics), grads = loss_and_grad(model, batch_for(kind))
    assert np.isfinite(float(loss))
    for name in ("loss", "accuracy", "aux_loss", "fidelity"):
        assert name in metrics and all(np.isfinite(np.asarray(x)) for x in metrics[name])
    leaves = jax.tree.leaves(nnx.state(grads, nnx.Param))
    assert leaves and all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert any(float(jnp.abs(g).sum()) > 0 for g in leaves)


CAUSAL = [p for p in presets.names() if refusal(model_config("lm", p)) is None]


def test_causal_presets_cover_the_causal_capable_ones():
    assert {"dense", "local", "performer", "scatterbrain", "nsa", "rsa"} <= set(CAUSAL)


@pytest.mark.parametrize("preset", CAUSAL)
def test_kv_cache_decoding_equals_full_pass(preset: str):
    model = build_model(model_config("lm", preset, num_layers=2), nnx.Rngs(0))
    ids = batch_for("lm")["inputs"]
    full, cached = nnx.jit(lambda m, x: (m(x)[0], m.decode_logits(x)))(model, ids)
    np.testing.assert_allclose(np.asarray(cached), np.asarray(full), atol=2e-5, rtol=2e-5)


def test_beam_of_one_is_greedy():
    config = model_config("seq2seq", "rsa", cross_attention="dense", dropout_rate=0.0)
    model = build_model(config, nnx.Rngs(3))
    b = batch_for("seq2seq")
    greedy, beam1, beam3 = nnx.jit(lambda m, x, mk: (m.greedy(x, mk), m.beam_search(x, mk, 1, 0.0),
                                                     m.beam_search(x, mk, 3, 0.6)))(model, b["inputs"], b["inputs_mask"])
    np.testing.assert_array_equal(np.asarray(beam1), np.asarray(greedy))
    assert beam3.shape == greedy.shape == (B, L)


@pytest.mark.parametrize("beam", [1, 3])
def test_decoding_ends_at_the_length_bound_of_its_source(monkeypatch, beam: int):
    """`decode_len_ratio`: each row ends (EOS) by ratio x its source's tokens + extra, shown on a
    model kept from ever choosing EOS on its own. Ratio 0 keeps max_target_len as the only bound."""
    from sparseformer.models.seq2seq import EncoderDecoder

    step = EncoderDecoder._step

    def never_eos(self, *args):
        logp, cache = step(self, *args)
        return logp.at[:, 10].add(-1e4), cache

    monkeypatch.setattr(EncoderDecoder, "_step", never_eos)
    config = model_config("seq2seq", "local", cross_attention="dense", dropout_rate=0.0, beam_size=beam,
                          decode_len_ratio=0.5, decode_len_extra=3, eos_id=10)
    model = build_model(config, nnx.Rngs(3))
    b = batch_for("seq2seq")
    mask = b["inputs_mask"].at[0, 20:].set(False)  # sources of 20 and of 64 tokens
    out = np.asarray(nnx.jit(lambda m, x, mk: m.predict(x, mk))(model, b["inputs"], mask))
    first_eos = [int(np.argmax(row == 10)) if np.any(row == 10) else None for row in out]
    limits = [13, 35]  # floor(0.5 * 20) + 3, floor(0.5 * 64) + 3
    for row, eos, limit in zip(out, first_eos, limits):
        assert eos is not None and eos < limit, (eos, limit)
        assert np.all(row[eos + 1 :] == 0)
    unbounded = config.model.copy_and_resolve_references()
    unbounded.decode_len_ratio = 0.0
    free = build_model(ml_collections.ConfigDict({"model": unbounded}), nnx.Rngs(3))
    out_free = np.asarray(nnx.jit(lambda m, x, mk: m.predict(x, mk))(free, b["inputs"], mask))
    assert not np.any(out_free == 10)  # without the bound it runs on to max_target_len


def test_every_param_has_logical_names_of_its_rank():
    allowed = {"embed", "heads", "kv_heads", "kv", "mlp", "vocab", None}
    for kind in MODEL_KINDS:
        model = build_model(model_config(kind, "nsa" if kind != "dual_encoder" else "linformer"), nnx.Rngs(0))
        for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
            names = var.get_metadata().get("out_sharding")
            assert names is not None and len(names) == var[...].ndim, (kind, path, names)
            assert set(names) <= allowed, (kind, path, names)


def test_aux_loss_reaches_the_loss():
    b = batch_for("classifier")
    losses = {}
    for weight in (0.0, 1.0):
        config = model_config("classifier", "rsa", dropout_rate=0.0)
        config.model.attention.correction.aux_weight = weight
        config.model.attention.selection.top_k = 3  # not every block: something left to approximate
        model = build_model(config, nnx.Rngs(0))
        loss, metrics = nnx.jit(lambda m, b: MODEL_KINDS["classifier"].loss(m, b, rng=None, train=False))(model, b)
        losses[weight] = (float(loss), float(metrics["aux_loss"][0]), float(metrics["fidelity"][0]))
    assert losses[0.0][1] == 0.0 and losses[1.0][1] > 0.0
    assert losses[1.0][0] == pytest.approx(losses[0.0][0] + losses[1.0][1], rel=1e-5)
    assert losses[0.0][2] == pytest.approx(losses[1.0][2], rel=1e-5) and losses[0.0][2] > 0.0


@pytest.mark.parametrize("preset", ["dense", "rsa"])
def test_prefill_then_cached_decoding_equals_full_pass(preset: str):
    """A prompt run at once (`prefill`) leaves the cache that step-by-step decoding continues from."""
    config = model_config("lm", preset, num_layers=2)
    if preset == "rsa":  # at the prompt's 4 blocks of 8, 1 top-k block fits beside the window and global
        config.model.attention.selection.top_k = 1
    model = build_model(config, nnx.Rngs(0))
    ids = batch_for("lm")["inputs"]
    P = 32  # a multiple of the block size, as the prefill's length buckets are

    def run(m, x):
        logits_p, cache = m.prefill(x[:, :P])

        def step(cache, t):  # one compiled decoding step for every position, as generation runs it
            logits_t, cache = m.decode_step(jax.lax.dynamic_index_in_dim(x, t, 1, keepdims=False), cache, t)
            return cache, logits_t

        _, rest_LBV = jax.lax.scan(step, cache, jnp.arange(P, L))
        return m(x)[0], jnp.concatenate([logits_p, jnp.swapaxes(rest_LBV, 0, 1)], 1)

    full, cached = nnx.jit(run)(model, ids)
    np.testing.assert_allclose(np.asarray(cached), np.asarray(full), atol=2e-5, rtol=2e-5)
