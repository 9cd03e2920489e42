"""`predict`: every model kind in order, batching that does not change predictions, bad lines named,
length buckets, and no recompilation per batch."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from sparseformer.infer import predict as predict_lib
from sparseformer.infer import runtime
from sparseformer.infer.cli import predict_main

KINDS = {"listops": "classifier", "lra_retrieval": "dual_encoder", "synth_translate": "seq2seq", "mqar": "lm"}


def write_inputs(path, backend, n: int, *, seed: int = 0) -> list[dict]:
    """`n` lines of random known tokens, lengths spread over the model's buckets."""
    rng = np.random.default_rng(seed)
    codec, max_len = backend.codec, backend.buckets[-1]
    records = []
    for i in range(n):
        rec = {"id": i}
        for field in runtime.FIELDS[backend.kind]:
            length = int(rng.integers(3, max_len - len(backend.prompt_prefix) - (8 if backend.kind == "lm" else 0)))
            if codec.kind == "bytes":
                rec[field] = "".join(chr(c) for c in rng.integers(97, 123, length))
            else:
                rec[field] = " ".join(codec.vocab[j] for j in rng.integers(0, min(len(codec.vocab), 40), length))
        records.append(rec)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def read(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("task", list(KINDS))
def test_each_kind_in_order_and_batching_changes_nothing(task, runs, tmp_path):
    backend = predict_lib.load_backend(str(runs[task]))
    assert backend.kind == KINDS[task]
    records = write_inputs(tmp_path / "in.jsonl", backend, 9)
    batched = runtime.predict_file(backend, str(tmp_path / "in.jsonl"), str(tmp_path / "b.jsonl"), batch_size=4,
                                   window=6, max_new_tokens=5, progress=False)
    single = runtime.predict_file(backend, str(tmp_path / "in.jsonl"), str(tmp_path / "s.jsonl"), batch_size=1,
                                  max_new_tokens=5, progress=False)
    assert batched.written == single.written == 9 and batched.batches < single.batches
    out_b, out_s = read(tmp_path / "b.jsonl"), read(tmp_path / "s.jsonl")
    assert [{k: r[k] for k in rec} for r, rec in zip(out_b, records)] == records  # input fields kept, in order
    for b, s in zip(out_b, out_s):
        if KINDS[task] in ("classifier", "dual_encoder"):
            p = np.asarray(b["probabilities"])
            assert b["prediction"] == int(np.argmax(p)) and abs(p.sum() - 1) < 1e-5
            np.testing.assert_allclose(p, s["probabilities"], atol=1e-5)
        else:
            assert isinstance(b["prediction"], str)
            assert b["prediction"] == s["prediction"]
            if KINDS[task] == "lm":
                assert len(b["prediction"].split()) <= 5


def test_buckets_match_padding_everything_to_max_len(runs, tmp_path):
    """A short input in its own bucket gets the probabilities it gets padded to max_len (rsa), to
    within what rsa's window does at a sequence's end: it slides inwards there, so an input that
    reaches its bucket's last block computes one earlier block exactly instead of its pooled summary
    (measured: up to 2e-5 here; the other inputs agree exactly)."""
    bucketed = predict_lib.load_backend(str(runs["listops"]))
    assert bucketed.buckets == [32, 64, 128]  # at 32 tokens (4 blocks of 8) rsa's budget of 6 covers all: exact
    padded = predict_lib.load_backend(str(runs["listops"]), buckets=[128])
    write_inputs(tmp_path / "in.jsonl", bucketed, 12, seed=1)
    a = runtime.predict_file(bucketed, str(tmp_path / "in.jsonl"), str(tmp_path / "a.jsonl"), batch_size=4, progress=False)
    b = runtime.predict_file(padded, str(tmp_path / "in.jsonl"), str(tmp_path / "b.jsonl"), batch_size=4, progress=False)
    assert a.padded_tokens < b.padded_tokens
    for x, y in zip(read(tmp_path / "a.jsonl"), read(tmp_path / "b.jsonl")):
        np.testing.assert_allclose(x["probabilities"], y["probabilities"], atol=1e-4)


def _dense_twin(m):
    """The same parameters under dense attention (rsa's pool and lse merge add no parameters)."""
    import copy

    import ml_collections
    from flax import nnx

    from sparseformer.attention import presets
    from sparseformer.infer import model as model_lib
    from sparseformer.models import build_model

    config = ml_collections.ConfigDict(copy.deepcopy(m.config.to_dict()))
    config.model.attention = presets.get("dense")
    with nnx.use_eager_sharding(False):
        graphdef, _, _ = nnx.split(nnx.eval_shape(lambda: build_model(config, nnx.Rngs(0))), nnx.Param, ...)
    return model_lib.Model(config, graphdef, m.params, m.extra, m.step)


def test_inputs_shorter_than_the_budget_run_exactly(runs, tmp_path):
    """rsa's budget here is 6 blocks of 8 (window 1, a global block, top-2): inputs of at most 32 tokens
    (4 blocks) used to be refused; they now run in the 32 bucket, and their attention is exact: the
    predictions equal dense attention's with the same parameters, and the batches reuse one program
    per shape."""
    rsa = predict_lib.load_backend(str(runs["listops"]))
    dense = predict_lib.ModelBackend(_dense_twin(rsa.model), buckets=[32, 128])
    assert rsa.buckets[0] == 32
    rng = np.random.default_rng(5)
    vocab = rsa.codec.vocab[:40]
    lines = [{"input": " ".join(vocab[j] for j in rng.integers(0, len(vocab), int(n)))} for n in rng.integers(2, 33, 12)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    for backend, name in ((rsa, "rsa"), (dense, "dense")):
        s = runtime.predict_file(backend, str(tmp_path / "in.jsonl"), str(tmp_path / f"{name}.jsonl"), batch_size=4,
                                 progress=False)
        assert s.batches == 3 and s.padded_tokens == 12 * 32  # every batch in the 32 bucket
    assert set(rsa.compiled) == {((4, 32), (4, 32))}  # three batches, one program
    for a, b in zip(read(tmp_path / "rsa.jsonl"), read(tmp_path / "dense.jsonl")):
        np.testing.assert_allclose(a["probabilities"], b["probabilities"], atol=1e-5)
    # and not what rsa's sparse attention computes at its full length with real keys past the budget:
    # the same model at 128 tokens still selects (16 blocks > 6)
    from sparseformer.infer.speed import attention_kernel

    assert attention_kernel(rsa.model.config, 32).endswith("exact (the budget exceeds the 4 key blocks)")
    assert "selection" in attention_kernel(rsa.model.config, 128)


def test_batches_are_full_and_padded_to_their_longest_members_bucket():
    items = [runtime.Item(i, i + 1, {}, [[5] * n]) for i, n in enumerate([70, 3, 40, 33, 31, 100, 2, 65, 30])]
    got = runtime.plan(items, [32, 64, 128], 4)
    assert [(b, [it.length for it in g]) for b, g in got] == [(32, [2, 3, 30, 31]), (128, [33, 40, 65, 70]), (128, [100])]


def test_bucket_choice():
    assert runtime.choose_bucket(1, [64, 128]) == 64 and runtime.choose_bucket(65, [64, 128]) == 128
    with pytest.raises(ValueError, match="more than the model's max_len 128"):
        runtime.choose_bucket(129, [64, 128])
    assert [runtime.row_bucket(n, 8) for n in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]
    assert runtime.row_bucket(9, 12) == 12


def test_no_recompilation_per_batch(runs, tmp_path):
    """Compiled shapes are bounded by buckets x row sizes, and a second pass compiles nothing."""
    lowered = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, *_a, **_k: lowered.append(event) if event == "/jax/core/compile/jaxpr_to_mlir_module_duration" else None
    )
    backend = predict_lib.load_backend(str(runs["listops"]))
    write_inputs(tmp_path / "in.jsonl", backend, 40, seed=2)
    first = runtime.predict_file(backend, str(tmp_path / "in.jsonl"), str(tmp_path / "o.jsonl"), batch_size=4,
                                 window=16, progress=False)
    n_first = len(lowered)
    second = runtime.predict_file(backend, str(tmp_path / "in.jsonl"), str(tmp_path / "o.jsonl"), batch_size=4,
                                  window=16, progress=False)
    assert first.batches == second.batches >= 10
    assert 1 <= len(backend.compiled) <= 3 * 3  # 3 buckets x rows 1, 2, 4
    assert n_first <= len(backend.compiled) and len(lowered) == n_first


def test_bad_lines_are_named_and_leave_no_output(runs, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"input": "[MAX 1 2 ]"}\n\nnot json\n{"text": "1"}\n{"input": "[FOO 1"}\n'
                   + json.dumps({"input": " ".join(["1"] * 129)}) + '\n{"input": "[MIN 3 4 ]"}\n')
    out = tmp_path / "out.jsonl"
    backend = predict_lib.load_backend(str(runs["listops"]))
    with pytest.raises(runtime.BadLine, match=r"in.jsonl:3: not valid JSON"):
        runtime.predict_file(backend, str(src), str(out), progress=False)
    assert not out.exists() and list(tmp_path.iterdir()) == [src]
    seen = []
    s = runtime.predict_file(backend, str(src), str(out), skip_bad=True, progress=False, report=seen.append)
    assert s.written == 2 and [m.split(": ", 1)[0].rsplit(":", 1)[1] for m in seen] == ["3", "4", "5", "6"]
    assert "lacks the field 'input'" in seen[1] and "unknown token '[FOO'" in seen[2]
    assert "129 tokens, more than the model's max_len 128" in seen[3]
    assert [r["input"] for r in read(out)] == ["[MAX 1 2 ]", "[MIN 3 4 ]"]
    # the command: exit 1 with the line named, and --skip-bad
    assert predict_main([f"--workdir={runs['listops']}", f"--input={src}", f"--output={out}.2", "--quiet"]) == 1
    assert predict_main([f"--workdir={runs['listops']}", f"--input={src}", f"--output={out}.2", "--quiet",
                         "--skip-bad", "--truncate"]) == 0
    assert len(read(tmp_path / "out.jsonl.2")) == 3  # the long line cut to max_len


def test_beam_size_is_a_decoding_choice_of_the_loaded_model(runs):
    from sparseformer.infer import model as model_lib

    m = model_lib.trained_model(str(runs["synth_translate"]))
    beam = predict_lib.with_decoding(m, beam_size=3)
    assert beam.merge().beam_size == 3 and m.merge().beam_size == 1 and beam.params is m.params
    with pytest.raises(ValueError, match="--beam-size: 0 must be >= 1"):
        predict_lib.with_decoding(m, beam_size=0)
    bounded = predict_lib.with_decoding(m, decode_len_ratio=1.5, decode_len_extra=4)
    assert bounded.merge().len_ratio == 1.5 and bounded.merge().len_extra == 4 and m.merge().len_ratio == 0.0
    with pytest.raises(ValueError, match="--decode-len-ratio: -1.0 must be >= 0"):
        predict_lib.with_decoding(m, decode_len_ratio=-1.0)


def test_predict_bounds_translation_length_from_the_command_line(runs, tmp_path):
    """`--decode-len-ratio/--decode-len-extra`: with room for one token (EOS) every output is empty;
    the run's own setting (no bound) decodes text."""
    run = str(runs["synth_translate"])
    write_inputs(tmp_path / "in.jsonl", predict_lib.load_backend(run), 6, seed=2)
    args = [f"--workdir={run}", f"--input={tmp_path / 'in.jsonl'}", "--quiet"]
    assert predict_main([*args, f"--output={tmp_path / 'free.jsonl'}"]) == 0
    assert predict_main([*args, f"--output={tmp_path / 'short.jsonl'}", "--decode-len-ratio=0.01",
                         "--decode-len-extra=1"]) == 0
    assert any(r["prediction"] for r in read(tmp_path / "free.jsonl"))
    assert all(r["prediction"] == "" for r in read(tmp_path / "short.jsonl"))
    assert predict_main([*args, f"--output={tmp_path / 'bad.jsonl'}", "--decode-len-extra=0"]) == 2
