"""Sweep expansion: combinators, the standard sweeps, seeds and run names."""

from pathlib import Path

import pytest

from sparseformer.sweep import expand
from sparseformer.sweep.expand import ARG, LABEL, NAME

FAKE_CONFIG = str(Path(__file__).with_name("fake_config.py"))
ATT = "model.attention"


def test_axis_and_product_merge_keys_and_names():
    grid = expand.product(expand.axis("a", [1, 2], names=["a1", "a2"]),
                          expand.axis("b", ["x", "y", "z"], labels=["X", "Y", "Z"]))
    assert len(grid) == 6
    assert [(e["a"], e["b"]) for e in grid] == [(1, "x"), (1, "y"), (1, "z"), (2, "x"), (2, "y"), (2, "z")]
    assert grid[4][NAME] == "a2" and grid[4][LABEL] == "Y"


def test_product_merges_meta_keys_and_refuses_conflicts():
    merged = expand.product([{ARG: {"attention": "rsa"}, NAME: "r", LABEL: "R"}],
                            [{ARG: {"scale": "tiny"}, NAME: "t", LABEL: "T", "k": 1}])
    assert merged == [{ARG: {"attention": "rsa", "scale": "tiny"}, NAME: "r-t", LABEL: "R, T", "k": 1}]
    with pytest.raises(ValueError, match="conflicting overrides for 'k'"):
        expand.product([{"k": 1}], [{"k": 2}])
    with pytest.raises(ValueError, match="conflicting config argument 'attention'"):
        expand.product([{ARG: {"attention": "a"}}], [{ARG: {"attention": "b"}}])


def test_zip_pairs_elementwise_and_checks_lengths():
    zipped = expand.zip_(expand.axis("a", [1, 2]), expand.axis("b", [3, 4]))
    assert zipped == [{"a": 1, "b": 3}, {"a": 2, "b": 4}]
    with pytest.raises(ValueError, match="different lengths"):
        expand.zip_(expand.axis("a", [1, 2]), expand.axis("b", [3]))
    assert expand.chain(zipped, [{"c": 0}]) == [*zipped, {"c": 0}]


def test_pick_lists_known_sweeps():
    assert expand.pick("one", {"one": lambda: [{"a": 1}], "two": [{}]}) == [{"a": 1}]
    with pytest.raises(ValueError, match=r"unknown sweep 'three'; known sweeps: one, two"):
        expand.pick("three", {"one": [], "two": []})


def test_ablation_sweep_is_the_issue_list():
    entries = expand.ablation_sweep(default_estimator=None)
    by_name = {e[NAME]: e for e in entries}
    assert list(by_name) == ["dense", "selection", "compression", "sel-comp-naive", "sel-comp-corr-noreg",
                             "rsa", "rsa-pooled", "rsa-bound", "rsa-sampled"]
    assert all(e[ARG] == {"attention": "rsa"} for e in entries)
    sel, comp, corr = (f"{ATT}.selection.enabled", f"{ATT}.compression.enabled", f"{ATT}.correction.enabled")
    assert (by_name["dense"][sel], by_name["dense"][comp], by_name["dense"][corr]) == (False, False, False)
    assert (by_name["selection"][sel], by_name["selection"][comp], by_name["selection"][corr]) == (True, False, False)
    assert (by_name["compression"][sel], by_name["compression"][comp]) == (False, True)
    naive = {k: v for k, v in by_name["sel-comp-naive"].items() if k.startswith(ATT)}
    assert naive == {corr: False}
    noreg = {k: v for k, v in by_name["sel-comp-corr-noreg"].items() if k.startswith(ATT)}
    assert noreg == {corr: True, f"{ATT}.correction.aux_weight": 0.0}
    assert {k for k in by_name["rsa"] if k.startswith(ATT)} == set()
    for est in ("pooled", "bound", "sampled"):
        assert by_name[f"rsa-{est}"][f"{ATT}.selection.estimator"] == est
    assert len({e[LABEL] for e in entries}) == len(entries)
    # the estimator the preset already uses is not repeated: the full row stands for it
    known = expand.ablation_sweep(default_estimator="bound")
    assert [e[NAME] for e in known][-3:] == ["rsa", "rsa-pooled", "rsa-sampled"]
    assert [e[LABEL] for e in known][-3:] == ["rsa (bound)", "rsa (pooled)", "rsa (sampled)"]


def test_ablation_sweep_asks_the_preset_registry(monkeypatch):
    monkeypatch.setattr(expand, "preset_estimator", lambda preset: {"rsa": "sampled"}[preset])
    assert [e[LABEL] for e in expand.ablation_sweep()][-3:] == ["rsa (sampled)", "rsa (pooled)", "rsa (bound)"]


def test_presets_sweep_picks_through_the_config_argument():
    runs = expand.entries_to_runs(expand.presets_sweep(["dense", "rsa"]), "c.py",
                                  "attention=local,scale=small", [0])
    assert [r.arg for r in runs] == ["attention=dense,scale=small,seed=0", "attention=rsa,scale=small,seed=0"]
    assert [r.overrides for r in runs] == [{}, {}]
    assert [r.label for r in runs] == ["dense", "rsa"]


def test_seeds_multiply_entries_seed_major_with_readable_names():
    runs = expand.entries_to_runs(expand.ablation_sweep(default_estimator=None), "configs/t.py", "scale=tiny",
                                  expand.parse_seeds(3))
    assert len(runs) == 27
    assert [r.name for r in runs[:2]] == ["dense__seed0", "selection__seed0"]
    assert runs[9].name == "dense__seed1" and runs[9].seed == 1 and runs[9].index == 0
    assert runs[-1].name == "rsa-sampled__seed2" and runs[-1].label == "rsa (sampled)"
    assert runs[-1].config == "configs/t.py:scale=tiny,attention=rsa,seed=2"
    assert "__name__" not in runs[0].overrides and ARG not in runs[0].overrides
    assert len({r.name for r in runs}) == 27


def test_entry_names_without_name_are_built_from_overrides():
    assert expand.entry_name({f"{ATT}.selection.top_k": 8, ARG: {"attention": "nsa"}}) == "nsa-top_k=8"
    assert expand.entry_name({}) == "base"
    assert expand.entry_name({NAME: "a b/c"}) == "a_b_c"


def test_duplicate_names_are_refused():
    with pytest.raises(ValueError, match="several entries are named"):
        expand.entries_to_runs([{"a": 1, NAME: "x"}, {"a": 2, NAME: "x"}], "c.py", "", [0])


def test_parse_seeds_and_arg():
    assert expand.parse_seeds(3) == [0, 1, 2]
    assert expand.parse_seeds("2") == [0, 1]
    assert expand.parse_seeds("0,4,7") == [0, 4, 7]
    assert expand.parse_arg("attention=rsa, scale=small") == {"attention": "rsa", "scale": "small"}
    with pytest.raises(ValueError, match="is not key=value"):
        expand.parse_arg("rsa")


def test_expand_runs_from_a_config_file():
    runs = expand.expand_runs(f"{FAKE_CONFIG}:scale=tiny", "grid", 2)
    assert [r.name for r in runs[:4]] == ["a=1-b=x__seed0", "a=1-b=y__seed0", "a=2-b=x__seed0", "a=2-b=y__seed0"]
    assert len(runs) == 8 and runs[0].sweep == "grid"
    with pytest.raises(ValueError, match="known sweeps: ablation, grid, interrupt, mixed, presets"):
        expand.expand_runs(f"{FAKE_CONFIG}:scale=tiny", "nope", 1)
    with pytest.raises(FileNotFoundError):
        expand.expand_runs("configs/does_not_exist.py:", "ablation", 1)


def test_experiment_settings_parse_literals_and_refuse_malformed_items():
    from sparseformer.sweep.experiment import parse_settings

    assert parse_settings(["num_train_steps=200", "optimizer.learning_rate=2e-3", "model.pooling=last"]) == {
        "num_train_steps": 200, "optimizer.learning_rate": 0.002, "model.pooling": "last"}
    with pytest.raises(ValueError, match="is not KEY=VALUE"):
        parse_settings(["num_train_steps"])
    with pytest.raises(ValueError, match="is not KEY=VALUE"):
        parse_settings([":num_train_steps=3"])


def test_task_qualified_settings_reach_only_that_task():
    from sparseformer.sweep.experiment import parse_settings

    items = ["listops:num_train_steps=150", "retrieval:num_train_steps=200", "log_every_steps=10"]
    assert parse_settings(items, "listops") == {"num_train_steps": 150, "log_every_steps": 10}
    assert parse_settings(items, "retrieval") == {"num_train_steps": 200, "log_every_steps": 10}
    assert parse_settings(items, "mqar") == {"log_every_steps": 10}
