"""Every task config x scale builds and validates; bad keys and values get one clear message;
every config of the standard sweeps validates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sparseformer import config as config_lib
from sparseformer.config import apply_overrides, validate_config
from sparseformer.sweep import expand

CONFIGS = sorted(p.stem for p in (Path(__file__).parents[2] / "configs").glob("*.py"))
ROOT = Path(__file__).parents[2]


def load(name: str):
    return expand.load_config_module(ROOT / "configs" / f"{name}.py")


def test_the_task_configs_exist():
    assert {"listops", "retrieval", "mqar", "synth_translate", "copy", "text", "image", "translate", "lm1b"} <= set(CONFIGS)


@pytest.mark.parametrize("scale", config_lib.SCALES)
@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_and_scale_validates(name: str, scale: str):
    module = load(name)
    config = module.get_config(f"attention=rsa,scale={scale},seed=3")
    validate_config(config)
    task = config.task if config.task.split("_")[0] != name else name  # files.py: files_classify, files_lm, ...
    assert (task, config.scale, config.seed, config.attention_name) == (name, scale, 3, "rsa")
    assert config.model.max_len == config.data.max_len
    assert "sparseformer train --config=configs/" in module.__doc__


def test_model_lengths_follow_the_data():
    config = load("listops").get_config("scale=tiny")
    config.data.max_len = 256
    assert config.model.max_len == 256
    validate_config(config)


@pytest.mark.parametrize("name", ["listops", "retrieval", "mqar", "synth_translate"])
@pytest.mark.parametrize("sweep", ["ablation", "presets", "top_k", "speed"])
def test_every_sweep_config_validates(name: str, sweep: str):
    module = load(name)
    for scale in ("tiny", "small"):
        entries = module.get_sweep(sweep, f"scale={scale}")
        assert entries
        for entry in entries:
            arg = {"scale": scale, **dict(entry.get(expand.ARG, {}))}
            config = module.get_config(expand.format_arg(arg))
            overrides = {k: v for k, v in entry.items() if k not in expand.META_KEYS}
            validate_config(apply_overrides(config, overrides))


def test_causal_presets_sweep_leaves_out_what_causal_attention_refuses():
    names = [e[expand.NAME] for e in load("mqar").get_sweep("presets", "scale=tiny")]
    assert {"rsa", "dense", "bigbird", "longformer"} <= set(names)  # global queries are a no-op when causal
    assert not {"linformer", "nystrom"} & set(names)
    assert len([e for e in load("listops").get_sweep("presets", "scale=tiny")]) == len(config_lib.presets.names())


BAD = [
    ({"model.attention.compression.kind": "nonsense"},
     "model.attention.compression.kind: 'nonsense' is not one of pool, performer, nystrom, linformer"),
    ({"model.positions": "rotary"}, "model.positions: 'rotary' is not one of learned, sinusoidal"),
    ({"optimizer.name": "lion"}, "optimizer.name: 'lion' is not one of"),
    ({"optimizer.schedule": "linear"}, "optimizer.schedule: 'linear' is not one of"),
    ({"model.num_heads": 3}, "model.num_heads: 3 is not allowed; must divide model.emb_dim=32"),
    ({"model.num_kv_heads": 4, "model.num_heads": 2}, "model.num_kv_heads: 4 is not allowed; must divide model.num_heads=2"),
    ({"model.dropout_rate": 1.5}, "model.dropout_rate: 1.5 is not allowed; must be in [0, 1)"),
    ({"batch_size": 0}, "batch_size: 0 is not allowed; must be >= 1"),
    # a budget that leaves nothing out at the run's own length would train dense attention: refused
    # (attend itself computes every block there, how a trained model runs shorter inputs)
    ({"data.max_len": 100}, "model.attention.selection.top_k: 7 is not allowed"),
    ({"model.attention.selection.top_k": 9}, "model.attention.selection.top_k: 9 is not allowed; top_k + random_blocks"),
    ({"model.attention.selection.top_k": -1}, "model.attention.selection.top_k: -1 is not allowed; must be >= 0"),
    ({"model.attention.selection.mass_threshold": 1.5}, "model.attention.selection.mass_threshold: 1.5 is not allowed"),
    ({"model.attention.correction.gate": True, "model.attention.correction.enabled": False},
     "model.attention.correction.gate: True is not allowed; gates need correction.enabled=True"),
    ({"num_eval_batches": 0}, "num_eval_batches: 0 is not allowed"),
    ({"optimizer.grad_accum_steps": 3}, "optimizer.grad_accum_steps: 3 is not allowed; must divide batch_size=8"),
    ({"model.pooling": "max"}, "model.pooling: 'max' is not one of mean, cls"),
    ({"mesh.data": 0}, "mesh.data: 0 is not allowed"),
    ({"distill.weight": 0.5}, "distill.weight: 0.5 is not allowed; needs distill.teacher_workdir"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[next(iter(o)) for o, _ in BAD])
def test_bad_values_give_one_clear_message(overrides, message):
    config = apply_overrides(load("listops").get_config("scale=tiny"), overrides)
    with pytest.raises(ValueError) as e:
        validate_config(config)
    assert message in str(e.value)


def test_unknown_and_mistyped_keys():
    config = load("listops").get_config("scale=tiny")
    config.model.num_layerz = 2
    with pytest.raises(ValueError, match=r"^model.num_layerz: unknown key; known: .*num_layers"):
        validate_config(config)
    config = load("listops").get_config("scale=tiny")
    config.unlock()
    config.model.attention.selection.windw = 2
    with pytest.raises(ValueError, match=r"model.attention.selection.windw: unknown key"):
        validate_config(config)
    with pytest.raises(ValueError, match=r"model.num_layerz: unknown key"):
        apply_overrides(load("listops").get_config("scale=tiny"), {"model.num_layerz": 1})


def test_causal_models_refuse_bidirectional_only_components():
    config = load("mqar").get_config("attention=linformer,scale=tiny")
    with pytest.raises(ValueError, match=r"model.attention.compression.kind: 'linformer' .*causal"):
        validate_config(config)
    config = load("copy").get_config("attention=nystrom,scale=tiny")
    with pytest.raises(ValueError, match=r"decoder self-attention"):
        validate_config(config)


def test_cross_attention_with_the_model_config_is_validated():
    config = load("copy").get_config("scale=tiny")
    config.model.cross_attention = "same"
    validate_config(config)
    config.model.cross_attention = "sparse"
    with pytest.raises(ValueError, match=r"model.cross_attention: 'sparse' is not one of dense, same"):
        validate_config(config)


@pytest.mark.parametrize("arg,message", [
    ("attention=nope", "attention: 'nope' is not one of dense"),
    ("scale=huge", "scale: 'huge' is not one of tiny, small, paper"),
    ("seed=x", "seed: 'x' is not an integer"),
    ("colour=red", "config argument 'colour'"),
])
def test_bad_arguments(arg: str, message: str):
    with pytest.raises(ValueError, match=message):
        config_lib.parse_arg(arg)


def test_parse_arg_defaults():
    assert config_lib.parse_arg("") == {"attention": "rsa", "scale": "small", "seed": 0}


def test_a_run_saved_before_new_attention_keys_loads_as_it_was_trained(tmp_path):
    """`config.json` of a run saved before `anchors`, `mass_threshold`, `causal_choice` and `kernel`
    existed: `load_config` fills the values it attended with (the causal choice was the previous
    block's, not today's default), and the result validates."""
    from sparseformer.attention import config as attention_config
    from sparseformer.train.loop import config_to_dict, load_config

    config = load("mqar").get_config("attention=rsa,scale=tiny")
    saved = config_to_dict(config)
    for dotted in attention_config.LEGACY_VALUES:
        section, key = dotted.split(".")
        del saved["model"]["attention"][section][key]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    loaded = load_config(tmp_path)
    sel = loaded.model.attention.selection
    assert (sel.anchors, sel.mass_threshold, sel.causal_choice, sel.kernel) == (1, 1.0, "previous_block", "auto")
    assert attention_config.default_config().selection.causal_choice != "previous_block"  # the fill is not the default
    validate_config(loaded)
    # a run saved with the keys keeps its own values
    (tmp_path / "config.json").write_text(json.dumps(config_to_dict(config)))
    assert load_config(tmp_path).model.attention.selection.to_dict() == config.model.attention.selection.to_dict()


def test_a_translation_run_saved_before_the_decode_length_keys_loads_unbounded(tmp_path):
    """A seq2seq `config.json` without `decode_len_ratio`/`decode_len_extra` loads with no length
    bound (how it decoded) and validates, also resized for inference; one with them keeps its own."""
    from sparseformer.infer.model import sized_config
    from sparseformer.train.loop import config_to_dict, load_config

    config = load("synth_translate").get_config("attention=rsa,scale=tiny")
    saved = config_to_dict(config)
    del saved["model"]["decode_len_ratio"], saved["model"]["decode_len_extra"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    loaded = load_config(tmp_path)
    assert (loaded.model.decode_len_ratio, loaded.model.decode_len_extra) == (0.0, 10)
    validate_config(loaded)
    sized_config(loaded, int(loaded.model.max_len))
    config.model.decode_len_ratio = 1.5
    (tmp_path / "config.json").write_text(json.dumps(config_to_dict(config)))
    assert load_config(tmp_path).model.decode_len_ratio == 1.5
