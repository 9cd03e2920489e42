"""`measure_model`: the documented keys, on tiny configs (values are measured, never asserted fast)."""

from __future__ import annotations

import jax
import pytest

from sparseformer.infer import model as model_lib
from sparseformer.infer.speed import attention_kernel, measure_model
from sparseformer.sweep.expand import load_config_module

KEYS = {
    "kind", "length", "target_length", "attention", "kernel", "num_params", "backend", "repeats", "batch_sizes",
    "latency_ms_p50", "latency_ms_p95", "throughput_per_s", "best_batch_size", "throughput_by_batch",
    "compiled_bytes", "temp_bytes", "output_bytes", "argument_bytes", "peak_rss_bytes", "peak_device_bytes",
    "peak_how", "decode_ms_per_token_p50", "decode_ms_per_token_p95", "decode_compiled_bytes",
}


def _config(task: str, attention: str):
    return load_config_module(f"configs/{task}.py").get_config(f"attention={attention},scale=tiny")


def test_classifier_with_fresh_process_peak():
    config = _config("listops", "rsa")
    r = measure_model(config, length=128, batch_sizes=(2,), repeats=3, warmup=1)
    assert KEYS <= set(r)
    assert r["kind"] == "classifier" and r["length"] == 128 and r["attention"] == "rsa"
    assert r["kernel"] == "encoder self-attention: selection (masked) + pool"
    assert 0 < r["latency_ms_p50"] <= r["latency_ms_p95"]
    assert set(r["throughput_by_batch"]) == {"1", "2"} and r["best_batch_size"] in (1, 2)
    assert r["throughput_per_s"] == max(r["throughput_by_batch"].values())
    assert r["compiled_bytes"] == r["temp_bytes"] + r["output_bytes"] > 0
    assert r["peak_rss_bytes"] is not None and r["peak_rss_bytes"] >= 0, r.get("peak_error")
    assert r["decode_ms_per_token_p50"] is None


def test_lm_decoding_step_and_trained_params():
    config = _config("mqar", "dense")
    sized = model_lib.sized_config(config, 64)
    params = model_lib.random_model(sized, seed=1).params
    r = measure_model(config, length=64, params=params, repeats=2, warmup=1, rss=False)
    assert r["kind"] == "lm" and r["peak_rss_bytes"] is None
    assert r["decode_ms_per_token_p50"] > 0 and r["decode_compiled_bytes"] > 0
    assert r["num_params"] == sum(x.size for x in jax.tree.leaves(params))
    with pytest.raises(ValueError, match="positions are made for the length"):
        measure_model(config, length=128, params=params, rss=False)


def test_a_length_shorter_than_the_budget_is_exact_and_a_refused_one_names_the_key():
    config = _config("listops", "rsa")  # blocks of 16: 32 tokens are 2 blocks, fewer than rsa's budget
    assert attention_kernel(config, 32) == "encoder self-attention: exact (the budget exceeds the 2 key blocks)"
    with pytest.raises(ValueError, match="model.attention.selection.block_size: query length 36 is not a multiple of 16"):
        attention_kernel(_config("mqar", "rsa"), 36)  # causal, no padding mask: lengths must be whole blocks
