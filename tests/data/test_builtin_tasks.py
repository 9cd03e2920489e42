"""Every built-in task end to end: prepare, the batch contract, determinism, resumption, sharding."""

from __future__ import annotations

import json
import math
import os
import time

import ml_collections
import numpy as np
import pytest

import sparseformer.data as data_lib
from sparseformer.data import SCALES, get_task

BUILTIN = ["listops", "retrieval", "mqar", "copy", "synth_translate"]
NUM_TRAIN, NUM_EVAL, BATCH = 60, 37, 8


def _config(name: str, data_dir, **overrides) -> ml_collections.ConfigDict:
    task = get_task(name)
    data = task.default_data_config("tiny")
    data.data_dir = str(data_dir)
    data.num_train, data.num_validation, data.num_test = NUM_TRAIN, NUM_EVAL, NUM_EVAL
    data.update(overrides)
    return ml_collections.ConfigDict(dict(task=name, scale="tiny", batch_size=BATCH, data=data))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tfds")
    for name in BUILTIN:
        get_task(name).prepare(_config(name, path))
    return path


def _take(it, n):
    return [next(it) for _ in range(n)]


def _rows(batches, key="inputs"):
    """The real examples of some batches, as bytes (identity of an example)."""
    out = []
    for b in batches:
        for i in np.flatnonzero(b["example_mask"]):
            parts = [b[key][i].tobytes()] + ([b["targets"][i].tobytes()] if "targets" in b else [])
            out.append(b"|".join(parts))
    return out


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


@pytest.mark.parametrize("name", BUILTIN)
def test_batches_follow_the_contract(name, data_dir):
    task = get_task(name)
    config = _config(name, data_dir)
    batch = next(task.pipeline(config, "train", seed=0))
    L = config.data.max_len
    expected = {
        "classifier": {"inputs", "inputs_mask", "labels"},
        "seq2seq": {"inputs", "inputs_mask", "targets", "targets_mask"},
        "lm": {"inputs", "targets", "targets_mask"},
    }[task.kind] | {"example_mask"}
    assert set(batch) == expected
    assert batch["example_mask"].shape == (BATCH,) and batch["example_mask"].all()
    assert batch["inputs"].shape == (BATCH, L) and batch["inputs"].dtype == np.int32
    for key, value in batch.items():
        if key.endswith("_mask"):
            assert value.dtype == np.bool_, key
        else:
            assert value.dtype == np.int32, key
    assert 0 <= batch["inputs"].min() and batch["inputs"].max() < task.vocab_size
    if "inputs_mask" in batch:
        assert (batch["inputs"][~batch["inputs_mask"]] == task.pad_id).all()
        assert (batch["inputs"][batch["inputs_mask"]] != task.pad_id).all()
    if task.kind == "classifier":
        assert batch["labels"].shape == (BATCH,)
        assert 0 <= batch["labels"].min() and batch["labels"].max() < task.num_classes
    if task.kind == "seq2seq":
        assert batch["targets"].shape == (BATCH, config.data.max_target_len)
        last = batch["targets_mask"].sum(1) - 1
        assert (batch["targets"][np.arange(BATCH), last] == task.eos_id).all()  # targets end in EOS
        assert (batch["targets"][~batch["targets_mask"]] == task.pad_id).all()
        assert task.decode(batch["targets"][0]) and task.eos_id not in batch["inputs"][0]
    if task.kind == "lm":
        assert batch["targets"].shape == (BATCH, L)
        np.testing.assert_array_equal(batch["targets"][:, :-1], batch["inputs"][:, 1:])  # next-token targets
        assert batch["targets_mask"].any(1).all()
    assert isinstance(task.decode(batch["inputs"][0]), str) and task.decode(batch["inputs"][0])


@pytest.mark.parametrize("name", BUILTIN)
def test_determinism_and_shuffle_seed(name, data_dir):
    task = get_task(name)
    config = _config(name, data_dir)
    a = _take(task.pipeline(config, "train", seed=1), 4)
    b = _take(task.pipeline(config, "train", seed=1), 4)
    c = _take(task.pipeline(config, "train", seed=2), 4)
    _assert_same(a, b)
    assert _rows(a) != _rows(c)


@pytest.mark.parametrize("name", BUILTIN)
@pytest.mark.parametrize("split", ["train", "validation"])
def test_state_restored_mid_epoch_continues_exactly(name, split, data_dir):
    task = get_task(name)
    config = _config(name, data_dir)
    it = task.pipeline(config, split, seed=3)
    _take(it, 2)
    state = json.loads(json.dumps(it.get_state()))  # the trainer stores it as JSON
    expected = _take(it, 3)
    resumed = task.pipeline(config, split, seed=3)
    resumed.set_state(state)
    _assert_same(_take(resumed, 3), expected)
    fresh = _take(task.pipeline(config, split, seed=3), 3)
    assert _rows(fresh) != _rows(expected)  # it continued: not the first batches again


@pytest.mark.parametrize("name", BUILTIN)
def test_two_processes_read_disjoint_slices_that_cover_the_split(name, data_dir):
    task = get_task(name)
    config = _config(name, data_dir)
    whole = _rows(list(task.pipeline(config, "validation", seed=0)))
    assert len(whole) == NUM_EVAL
    per_process = [list(task.pipeline(config, "validation", seed=0, process_index=i, process_count=2)) for i in range(2)]
    assert len(per_process[0]) == len(per_process[1]) == math.ceil(NUM_EVAL / BATCH)  # same number of steps
    assert all(b["inputs"].shape[0] == BATCH // 2 for p in per_process for b in p)
    rows = [_rows(p) for p in per_process]
    assert not set(rows[0]) & set(rows[1])
    assert sorted(rows[0] + rows[1]) == sorted(whole)
    # Train: each process's first epoch is its own half of the split.
    epoch = [_rows(_take(task.pipeline(config, "train", seed=0, process_index=i, process_count=2), 8))[: NUM_TRAIN // 2] for i in range(2)]
    assert not set(epoch[0]) & set(epoch[1])
    all_train = _rows(_take(task.pipeline(config, "train", seed=0), 8))[:NUM_TRAIN]
    assert sorted(epoch[0] + epoch[1]) == sorted(all_train)


@pytest.mark.parametrize("name", ["listops", "mqar"])
def test_eval_is_one_padded_pass_and_train_reshuffles_each_epoch(name, data_dir):
    task = get_task(name)
    config = _config(name, data_dir)
    batches = list(task.pipeline(config, "test", seed=0))
    assert len(batches) == math.ceil(NUM_EVAL / BATCH)
    assert batches[-1]["example_mask"].sum() == NUM_EVAL % BATCH
    assert batches[-1]["example_mask"][: NUM_EVAL % BATCH].all()
    padded = ~batches[-1]["example_mask"]
    assert (batches[-1]["inputs"][padded] == 0).all()
    rows = _rows(_take(task.pipeline(config, "train", seed=0), 2 * NUM_TRAIN // BATCH))
    first, second = rows[:NUM_TRAIN], rows[NUM_TRAIN : 2 * NUM_TRAIN]
    assert sorted(first) == sorted(second) and first != second


def test_data_seed_is_separate_from_the_training_seed(data_dir):
    task = get_task("listops")
    base = _config("listops", data_dir)
    other = _config("listops", data_dir, data_seed=1)
    task.prepare(other)
    assert task.builder(base).builder_config.name != task.builder(other).builder_config.name
    epochs = math.ceil(NUM_TRAIN / BATCH)
    rows_a = _rows(_take(task.pipeline(base, "train", seed=0), epochs))[:NUM_TRAIN]
    rows_b = _rows(_take(task.pipeline(base, "train", seed=5), epochs))[:NUM_TRAIN]
    rows_c = _rows(_take(task.pipeline(other, "train", seed=0), epochs))[:NUM_TRAIN]
    assert set(rows_a) == set(rows_b) and rows_a != rows_b  # another training seed: same data, new order
    assert not set(rows_a) & set(rows_c)  # another data seed: other data


def test_prepare_is_idempotent_and_files_are_byte_for_byte_reproducible(data_dir, tmp_path):
    task = get_task("listops")
    config = _config("listops", data_dir)
    where = task.prepare(config)
    files = sorted(f for f in os.listdir(where) if "array_record" in f)
    mtimes = [os.path.getmtime(os.path.join(where, f)) for f in files]
    start = time.perf_counter()
    assert task.prepare(config) == where
    assert time.perf_counter() - start < 1.0
    assert mtimes == [os.path.getmtime(os.path.join(where, f)) for f in files]
    again = task.prepare(_config("listops", tmp_path))
    for f in files:
        with open(os.path.join(where, f), "rb") as a, open(os.path.join(again, f), "rb") as b:
            assert a.read() == b.read(), f


def test_default_tiny_prepares_in_seconds(tmp_path):
    task = get_task("listops")
    config = _config("listops", tmp_path)
    config.data = task.default_data_config("tiny")
    config.data.data_dir = str(tmp_path)
    start = time.perf_counter()
    task.prepare(config)
    assert time.perf_counter() - start < 10.0  # ~1 s on an idle 2-core machine; generous under load
    assert task.builder(config).builder_config.name == "tiny_seed0"


@pytest.mark.parametrize("name", BUILTIN)
def test_lengths_are_multiples_of_64_at_every_scale(name):
    task = get_task(name)
    for scale in SCALES:
        data = task.default_data_config(scale)
        assert data.max_len % 64 == 0, (scale, data.max_len)
        assert data.get("max_target_len", 64) % 64 == 0


def test_retrieval_answer_is_far_from_the_query_and_matches_the_label():
    from sparseformer.data import retrieval

    for fmt in retrieval.PAIR_FORMATS:
        inputs, labels = retrieval.generate(200, seed=0, length=256, num_pairs=4, pair_format=fmt)
        for x, y in zip(inputs, labels):
            key = x[-1] - retrieval.KEY0
            if fmt == "adjacent":
                (pos,) = np.flatnonzero(x[:-1] == x[-1])
                assert x[pos + 1] - retrieval.VALUE0 == y
            else:
                (pos,) = np.flatnonzero((x >= retrieval.FUSED0) & ((x - retrieval.FUSED0) // retrieval.NUM_VALUES == key))
                assert (x[pos] - retrieval.FUSED0) % retrieval.NUM_VALUES == y
            assert len(x) - 1 - pos >= 128  # at least half the sequence away
        assert len(np.unique(labels)) == retrieval.NUM_VALUES


def test_retrieval_small_scale_format_few_keys_one_filler_answer_far_away():
    from sparseformer.data import retrieval

    data = get_task("retrieval").default_data_config("small")
    kwargs = dict(length=data.max_len, num_pairs=data.num_pairs, pair_format=data.pair_format,
                  pair_region=data.pair_region, num_keys=data.num_keys, num_fillers=data.num_fillers)
    inputs, labels = retrieval.generate(300, seed=(0, 0), **kwargs)
    again, labels_again = retrieval.generate(300, seed=(0, 0), **kwargs)
    other, _ = retrieval.generate(300, seed=(0, 1), **kwargs)
    assert np.array_equal(inputs, again) and np.array_equal(labels, labels_again)  # a pure function of the seed
    assert not np.array_equal(inputs, other)
    assert set(np.unique(inputs[:, :-2])) <= {retrieval.FILLER0, *range(retrieval.FUSED0, retrieval.VOCAB_SIZE)}
    for x, y in zip(inputs, labels):
        pairs = x[x >= retrieval.FUSED0] - retrieval.FUSED0
        keys = pairs // retrieval.NUM_VALUES
        assert len(pairs) == data.num_pairs and len(set(keys.tolist())) == data.num_pairs  # distinct keys
        assert keys.max() < data.num_keys
        key = x[-1] - retrieval.KEY0
        (pos,) = np.flatnonzero((x >= retrieval.FUSED0) & ((x - retrieval.FUSED0) // retrieval.NUM_VALUES == key))
        assert (x[pos] - retrieval.FUSED0) % retrieval.NUM_VALUES == y
        assert len(x) - 1 - pos >= data.max_len * (1 - data.pair_region)  # beyond any local window
    assert len(np.unique(labels)) == retrieval.NUM_VALUES


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(num_keys=0), r"config.data.num_keys: 0 must be in \[1, 16\]"),
        (dict(num_keys=17), r"config.data.num_keys: 17 must be in \[1, 16\]"),
        (dict(num_keys=4, num_pairs=5), r"config.data.num_pairs: 5 must be in \[1, num_keys=4\]"),
        (dict(num_fillers=0), r"config.data.num_fillers: 0 must be in \[1, 32\]"),
        (dict(pair_format="interleaved"), r"config.data.pair_format.*'interleaved'.*'adjacent'.*'fused'"),
        (dict(pair_region=1.0), r"config.data.pair_region: 1.0 leaves no room"),
    ],
)
def test_retrieval_rejects_bad_generation_keys(kwargs, message):
    from sparseformer.data import retrieval

    with pytest.raises(ValueError, match=message):
        retrieval.generate(4, seed=0, **{"length": 128, "num_pairs": 2, **kwargs})


def test_mqar_answers_are_the_values_of_earlier_keys():
    from sparseformer.data import mqar

    inputs, targets, mask = mqar.generate(50, seed=0, length=128, num_pairs=8, num_tokens=64)
    for x, y, m in zip(inputs, targets, mask):
        pairs = dict(zip(x[0:16:2].tolist(), x[1:16:2].tolist()))
        assert m.sum() == 8
        for t in np.flatnonzero(m):
            assert t >= 16 and pairs[int(x[t])] == y[t]


def test_synth_translate_is_a_reordering_of_a_fixed_lexicon():
    from sparseformer.data import synth_translate as st

    pairs = st.generate(100, seed=0, min_len=8, max_len=63)
    src_lex, tgt_lex = st.lexicon()
    to_target = {s: t for c in src_lex for s, t in zip(src_lex[c], tgt_lex[c])}
    for src, tgt in pairs:
        assert len(src) <= 63 and len(tgt) <= 63
        content_src = sorted(to_target[w] for w in src if w in to_target)
        content_tgt = sorted(w for w in tgt if w in to_target.values())
        assert content_src == content_tgt  # every content word translated once
    assert sum(s[:3] != t[:3] for s, t in pairs) > 90  # word order differs
    assert st.generate(5, seed=1, min_len=8, max_len=63) != st.generate(5, seed=2, min_len=8, max_len=63)


def test_errors_name_the_bad_value():
    with pytest.raises(ValueError, match=r"unknown task 'nope'.*listops.*retrieval"):
        get_task("nope")
    with pytest.raises(ValueError, match=r"scale: 'huge'.*'tiny'"):
        get_task("listops").default_data_config("huge")
    config = _config("copy", "/nonexistent-never-used")
    with pytest.raises(ValueError, match=r"split: 'dev'"):
        get_task("copy").pipeline(config, "dev", seed=0)
    assert data_lib.task_names()[:5] == BUILTIN


@pytest.mark.parametrize("name", BUILTIN)
def test_text_form_round_trips_the_ids(name, data_dir):
    """`task.codec`: an example's ids -> text -> the same ids (what `predict` reads)."""
    task = get_task(name)
    config = _config(name, data_dir)
    codec = task.codec(config)
    batch = next(task.pipeline(config, "test", seed=0))
    for row, mask in zip(batch["inputs"], batch.get("inputs_mask", np.ones_like(batch["inputs"], bool))):
        ids = row[mask].tolist() if "inputs_mask" in batch else row.tolist()
        assert codec.encode(codec.decode(ids)) == ids
        assert codec.decode(ids) == task.decode(row)
    with pytest.raises(ValueError, match=f"{name}: unknown token"):
        codec.encode("@@")
